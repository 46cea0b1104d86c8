"""``onnx`` / ``onnx-int8`` export: input_ids + attention_mask -> pooled, normalised embedding.

Pooling and normalisation are inside the graph, so the ONNX output equals ``encode()``;
batch and sequence axes are dynamic. The export verifies itself on a padded batch of short,
long and non-English texts before it reports success.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hmcl_cli.console import log
from hmcl_cli.errors import ExportError
from hmcl_cli.export.merged import VERIFY_TEXTS, parity
from hmcl_cli.io_utils import atomic_path

ONNX_THRESHOLD = 0.9999


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxruntime", hint='pip install "hmcl-cli[onnx]"') from None


def onnx_encode(path: Path, model, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = model.pad(model.tokenize(texts, side="doc"))
    return sess.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]


def export_onnx(model_dir: Path, out: Path, quantize: bool = False, extra_texts: Optional[list[str]] = None,
                opset: int = 17) -> dict:
    from hmcl_cli.modeling.encoder import EmbeddingModel, tokenizer_with_eos

    _require_onnx()
    model = EmbeddingModel.load(str(model_dir), attn_implementation="eager")
    model.eval()
    texts = VERIFY_TEXTS + list(extra_texts or [])
    reference = model.encode(texts, side="doc").numpy()
    sample = model.pad(model.tokenize(texts[:2], side="doc"))
    with atomic_path(out, is_dir=True) as tmp:
        path = tmp / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (sample["input_ids"], sample["attention_mask"]), str(path),
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              "sentence_embedding": {0: "batch"}},
                opset_version=opset, dynamo=False)
        final = path
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            final = tmp / "model_int8.onnx"
            quantize_dynamic(str(path), str(final), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])
            path.unlink()
        (tokenizer_with_eos(model.tokenizer) if model.settings.append_eos else model.tokenizer).save_pretrained(tmp)
        settings = {**asdict(model.settings), "append_eos": False}  # the saved tokenizer appends EOS itself
        (tmp / "hmcl_config.json").write_text(json.dumps(settings, indent=2))
        got = onnx_encode(final, model, texts)
        report = parity(reference, got)
        report["file"] = final.name
        if not quantize and report["mean_cosine"] < ONNX_THRESHOLD:
            raise ExportError(f"ONNX export does not match the trained model: mean cosine {report['mean_cosine']:.6f} "
                              f"< {ONNX_THRESHOLD}", hint="try --set export.opset=18, and please report it")
        (tmp / "hmcl_export.json").write_text(json.dumps({"format": "onnx-int8" if quantize else "onnx", **report}, indent=2))
    log(f"export {'onnx-int8' if quantize else 'onnx'} -> {out}: mean cosine vs torch {report['mean_cosine']:.6f} "
        f"(min {report['min_cosine']:.6f})")
    return report
