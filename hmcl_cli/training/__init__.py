"""Training: the trainer, its batches, memory plan and cross-process helpers.

What a relaunched training needs to know of its launch is here, without torch (``hmcl_cli.stages``
imports it when any command starts)."""

import os

# set for the `hmcl train` that `accelerate launch` runs for hmcl: the command the user ran (train, run)
RELAUNCHED_ENV = "HMCL_RELAUNCHED"


def user_command() -> str:
    """The hmcl command the user ran to train (`train`, or `run` that relaunched its training)."""
    return "run" if os.environ.get(RELAUNCHED_ENV) == "run" else "train"
