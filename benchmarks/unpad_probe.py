"""Whether `model.unpad` takes each model here, with the sizes its probe decides on.

    python benchmarks/unpad_probe.py [--shapes minilm,minilm-shape,bert-base,qwen3-0.6b] [--lora]
    python benchmarks/unpad_probe.py --shapes qwen3-0.6b,qwen3-4b,qwen3-8b --qwen-dtypes bfloat16

On the H200 of 2026-12-04 the probe refused every random-weight training shape but one
(benchmarks/RESULTS.md), so no GPU row measured unpadded training. This prints, per model, the
decision and the sizes behind it: how far the packed token states are from the padded ones,
how far the padded batch is from each text run alone (the model's own rounding), and, where
attention is computed padded (a CPU; not the flash variable-length kernel), how far a wrong
pattern — the padding attended — moves them. The real all-MiniLM-L6-v2 beside the random shapes
tells whether random weights are what fails. Each model is probed as training loads it: float32
weights (BERT shapes, and Qwen shapes trained in full) and, with `--lora`, bf16 for a Qwen shape
(a LoRA base), under the autocast of the device (bf16 on a GPU, none on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def padding_attended(right):
    """A wrong attention pattern to measure the probe against: ``right`` (unpad.packing) with the
    padding attended (an all-ones mask in place of each text's own)."""
    from hmcl_cli.modeling.masks import prepared_mask

    def wrong(attention_mask, n_real, causal, with_mask=True):
        p = right(attention_mask, n_real, causal, with_mask)
        return dataclasses.replace(p, mask=prepared_mask(torch.ones_like(attention_mask), causal))
    return wrong


def probe_sizes(model) -> dict:
    """The probe's sizes for ``model`` (an EmbeddingModel), computed as unpad_refusal computes
    them: its three texts, eval mode, the device's autocast."""
    from hmcl_cli.modeling import unpad
    from hmcl_cli.modeling.encoder import autocast_for
    from hmcl_cli.modeling.masks import state_difference, token_states

    dev, bb, causal = model.device, model.backbone, model.settings.is_decoder
    ids, mask, n_real = unpad.probe_batch(model)
    right = unpad.packing
    bb.eval()
    before = bb.config._attn_implementation
    unpad.set_attention(bb, unpad.register())
    try:
        with torch.inference_mode(), autocast_for(dev), model.attention_backends():
            padded = token_states(bb, input_ids=ids, attention_mask=model.backbone_mask(mask))
            packed = unpad.unpadded_states(bb, ids, mask, n_real, causal)
            wrong = None
            if not unpad.expects_varlen(bb, dev.type):  # the flash kernel takes no mask to get wrong
                unpad.packing = padding_attended(right)
                wrong = state_difference(padded, unpad.unpadded_states(bb, ids, mask, n_real, causal), mask)
    finally:
        unpad.packing = right
        unpad.set_attention(bb, before)
    return {"packed": state_difference(padded, packed, mask), "alone": unpad._padded_vs_alone(model, padded, ids, mask),
            "wrong": wrong}


def main() -> None:
    from train_throughput import build_model

    from hmcl_cli.modeling.encoder import EmbeddingModel, best_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="minilm,minilm-shape,bert-base,qwen3-0.6b")
    ap.add_argument("--lora", action="store_true", help="also probe the Qwen shapes with bf16 weights (a LoRA base)")
    ap.add_argument("--qwen-dtypes", default=None,
                    help="the dtypes to load Qwen shapes in (default: float32, and bfloat16 with --lora); "
                         "`bfloat16` alone probes a 7B shape in a CPU's memory")
    args = ap.parse_args()
    device = best_device()
    qwen_dtypes = [getattr(torch, d) for d in (args.qwen_dtypes or "float32" + (",bfloat16" if args.lora else "")).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            qwen = shape.startswith(("qwen", "micro-qwen"))
            # Qwen shapes stored in bf16, as the real checkpoints (and as a GPU run builds them)
            path = build_model(shape, Path(tmp) / shape, dtype=torch.bfloat16 if qwen else None)
            dtypes = qwen_dtypes if qwen else [torch.float32]
            for dtype in dtypes:
                model = EmbeddingModel.load(str(path), dtype=dtype).to(device)
                sizes = probe_sizes(model)
                reason = model.unpad_refusal()
                wrong = "n/a (flash kernel)" if sizes["wrong"] is None else f"{sizes['wrong']:.2%}"
                alone = "n/a" if sizes["alone"] is None else f"{sizes['alone']:.2%}"
                print(f"{shape:<14} {str(dtype).replace('torch.', ''):<9} on {device.type}: packed vs padded "
                      f"{sizes['packed']:.2%}, padded vs alone {alone}, padding attended {wrong}: "
                      f"{'unpadded' if not reason else 'padded: ' + reason}", flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
