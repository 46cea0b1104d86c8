"""Whether `model.unpad` takes each model here, and if not, by how much its probe failed.

    python benchmarks/unpad_probe.py [--shapes minilm,minilm-shape,bert-base,qwen3-0.6b]

On the H200 of 2026-12-04 the probe refused every random-weight training shape but one
(benchmarks/RESULTS.md), so no GPU row measured unpadded training. This prints, per model, the
refusal with its sizes (packed vs padded, and the padded batch vs each text run alone) or that it
runs unpadded: the real all-MiniLM-L6-v2 beside the random shapes tells whether random weights
are what fails. Each model is probed as training loads it: float32 weights (BERT shapes, and
Qwen shapes trained in full), bf16 for a Qwen shape under LoRA (`--lora`), under the autocast of
the device (bf16 on a GPU, none on a CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from train_throughput import build_model

    from hmcl_cli.modeling.encoder import EmbeddingModel, best_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="minilm,minilm-shape,bert-base,qwen3-0.6b")
    ap.add_argument("--lora", action="store_true", help="also probe the Qwen shapes with bf16 weights (a LoRA base)")
    args = ap.parse_args()
    device = best_device()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            path = build_model(shape, Path(tmp) / shape)
            dtypes = [torch.float32] + ([torch.bfloat16] if args.lora and shape.startswith("qwen") and device.type == "cuda" else [])
            for dtype in dtypes:
                model = EmbeddingModel.load(str(path), dtype=dtype).to(device)
                reason = model.unpad_refusal()
                print(f"{shape:<14} {str(dtype).replace('torch.', ''):<9} on {device.type}: "
                      f"{'unpadded' if not reason else 'padded: ' + reason}", flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
