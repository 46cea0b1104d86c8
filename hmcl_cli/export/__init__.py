"""Deployable outputs of a trained model: merged sentence-transformers folder, ONNX, the Hub."""

from pathlib import Path
from typing import Any


def export_folder(fmt: str) -> str:
    """The folder an export format is written to under the export directory (``onnx-int8`` ->
    ``onnx_int8``)."""
    return fmt.replace("-", "_")


def is_onnx_export(folder: Any) -> bool:
    """Whether ``folder`` is an ONNX export of hmcl's (a graph, its tokenizer and hmcl_config.json);
    here, not in export.onnx, so that asking does not import torch."""
    folder = Path(folder)
    return folder.is_dir() and (folder / "hmcl_config.json").is_file() and any(folder.glob("*.onnx"))
