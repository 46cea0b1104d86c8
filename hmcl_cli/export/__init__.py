"""Deployable outputs of a trained model: merged sentence-transformers folder, ONNX, the Hub."""


def export_folder(fmt: str) -> str:
    """The folder an export format is written to under the export directory (``onnx-int8`` ->
    ``onnx_int8``)."""
    return fmt.replace("-", "_")
