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


class StorageError(HmclError):
    """A write failed (disk full, no permission); earlier outputs are left intact."""

    exit_code = 10
    kind = "storage error"


class PushError(HmclError):
    """The upload to the Hugging Face Hub (export.push_to_hub) cannot be made or failed."""

    exit_code = 11
    kind = "push error"


class ProcessLostError(HmclError):
    """A process of a multi-process training ended without finishing (killed, crashed), so the
    others could not go on."""

    exit_code = 12
    kind = "process lost"


PROCESS_LOST_HINT = ("a process that ends without a message was killed by a signal it cannot catch: SIGKILL from "
                     "the kernel's out-of-memory killer when the machine's RAM runs out (`dmesg` says so), or a job "
                     "scheduler's hard kill; `--resume` continues from the last checkpoint")

# what the communication layers say when a peer process is gone or out of reach (gloo; NCCL's
# ncclRemoteError, and torch's words once its watchdog aborted a communicator)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "remote worker crashing",
              "remote process exited", "communicator was aborted")


MEMORY_HINT = ("lower train.batch_size or train.group_size or model.max_length, set train.grad_cache_chunk "
               "(e.g. 32), enable model.gradient_checkpointing or model.lora.enabled; for mine/eval lower "
               "mine.batch_size / eval.batch_size")


def from_system_error(e: BaseException) -> HmclError | None:
    """Map an out-of-memory or a failed write from any stage to its user-facing error (else None)."""
    import errno
    import os
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return OutOfMemoryError(f"out of GPU memory: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "),
                                hint=MEMORY_HINT)
    if isinstance(e, MemoryError):
        return OutOfMemoryError("out of host memory (RAM)", hint=MEMORY_HINT)
    if (isinstance(e, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and any(m in str(e).lower() for m in _PEER_GONE)):
        rank = os.environ.get("RANK", "?")
        return ProcessLostError(f"process rank {rank}: lost its connection to another process of this training, which "
                                "ended (its message, or the launcher's report of it, is nearby) or could not be reached "
                                "(the network between machines; a collective past its timeout); this one cannot go on alone",
                                hint=PROCESS_LOST_HINT)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}[e.errno]
        where = f": {e.filename}" if e.filename else ""
        hint = ("check the file's permissions, or choose another output_dir (--set output_dir=...)"
                if e.errno in (errno.EACCES, errno.EROFS) else "free space or choose another output_dir (--set output_dir=...)")
        return StorageError(f"{what}{where}", hint=hint + "; outputs are written to temporary files and renamed, "
                            "so earlier outputs are intact")
    return None


class InterruptedRun(HmclError):
    """Stopped by Ctrl-C or SIGTERM (after saving what could be saved)."""

    exit_code = 130
    kind = "interrupted"


def error_of_exit_code(code: int, message: str, hint: str | None = None) -> HmclError:
    """The error class whose exit code is ``code`` (a relaunched process's, which printed its own
    message), holding ``message``; a plain :class:`HmclError` with that code for any other."""
    classes, seen = [HmclError], []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        classes.extend(cls.__subclasses__())
    match = next((cls for cls in seen if cls.exit_code == code), None)
    if match is not None:
        return match(message, hint=hint)
    error = HmclError(message, hint=hint)
    error.exit_code = code
    return error


def import_optional(module: str, *, need: str, install: str, error: type[HmclError], pip: str | None = None,
                    instead: str | None = None):
    """Import an optional package, or raise ``error`` saying what needs it and what to do.

    A package that is not installed and one that is installed but fails to import (built against
    another numpy, a missing shared library) get different messages: for the second, ``install``
    would keep the broken version, so the message gives the import's own error and says to upgrade
    (``pip``: the name pip knows the package by, if not the module's). ``instead``: a way around the
    package, offered in both hints."""
    import importlib
    import platform

    top = module.split(".")[0]
    around = f", or {instead}" if instead else ""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top:
            raise error(f"{need} the {top} package, which is not installed", hint=install + around) from None
        raise error(f"{need} {top}, which is installed but failed to import ({_first_message(e)})",
                    hint=f"its build may not fit this environment (numpy {_version('numpy')}, Python "
                         f"{platform.python_version()}): pip install --upgrade {pip or top}{around}") from None


def _first_message(e: BaseException) -> str:
    """``Type: message`` of ``e``, or of the first exception it was raised from that has one."""
    seen = e
    for _ in range(5):
        lines = [ln.strip() for ln in str(seen).splitlines() if ln.strip()]
        if lines:
            return f"{type(seen).__name__}: {lines[-1][:300]}"
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return type(e).__name__


def _version(dist: str) -> str:
    from hmcl_cli.environment import package_version

    return package_version(dist) or "not installed"
