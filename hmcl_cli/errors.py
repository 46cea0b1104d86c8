"""User-facing errors: one readable message and a distinct exit code per class.

Library code raises these; the CLI prints ``str(error)`` (plus a hint) and exits with
``error.exit_code``. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class HmclError(Exception):
    """Base class. ``hint`` says what to do about it."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class RecipeError(HmclError):
    """The recipe (YAML, keys, types, --set overrides) is invalid."""

    exit_code = 2
    kind = "recipe error"


class DataError(HmclError):
    """Input data is missing, malformed or unusable."""

    exit_code = 3
    kind = "data error"


class ModelNotFoundError(HmclError):
    """A model could not be resolved or loaded."""

    exit_code = 4
    kind = "model error"


class OutOfMemoryError(HmclError):
    """The device ran out of memory."""

    exit_code = 5
    kind = "out of memory"


class GateFailedError(HmclError):
    """An evaluation gate (quality floor) was not met."""

    exit_code = 6
    kind = "gate failed"


class ExportError(HmclError):
    """An export did not verify against the trained model."""

    exit_code = 7
    kind = "export error"


class RunLockedError(HmclError):
    """Another hmcl process is writing into the same run directory."""

    exit_code = 8
    kind = "run locked"


class TrainingDivergedError(HmclError):
    """The loss became NaN or infinite."""

    exit_code = 9
    kind = "training diverged"


class InterruptedRun(HmclError):
    """Stopped by Ctrl-C or SIGTERM (after saving what could be saved)."""

    exit_code = 130
    kind = "interrupted"
