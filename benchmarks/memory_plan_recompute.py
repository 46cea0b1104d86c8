"""The memory plan of the H200 runs of 2026-12-04, recomputed on a CPU, and the activation probe
against a real autocast (benchmarks/RESULTS.md, "The memory plan under autocast").

    python benchmarks/memory_plan_recompute.py

1. One layer's saved bytes for one sequence of the Qwen3-0.6B, BERT-base and MiniLM shapes: the
   planner's probe as it runs now (float32 weights under the meta-device autocast), the probe
   sized all in bf16 (as before), and real weights under the CPU's bf16 autocast (the bf16
   copies of the weights left out, attention counted by the same stand-in).
2. ``plan_memory(..., device=cuda)`` for each H200 run with the inputs its log shows (batch,
   longest text 72 / 80 tokens, padded; the Qwen3-0.6B LoRA run unpadded, its 8,362 real tokens
   split evenly between the sides: the log gives only their sum), beside the plan the run
   printed and the peak it measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (shape, anchors, longest text, lora + checkpointing, real tokens or None, plan printed, peak measured)
H200_RUNS = [("minilm-shape", 64, 72, False, None, 1.09, 1.38), ("bert-base", 64, 72, False, None, 4.68, 5.42),
             ("qwen3-0.6b", 256, 80, False, None, 86.70, 109.03), ("qwen3-0.6b", 128, 80, False, None, 48.20, 32.90),
             ("qwen3-0.6b", 128, 80, True, (4181, 4181), 2.66, 2.33), ("qwen3-4b", 64, 80, True, None, 11.53, 12.97),
             ("qwen3-8b", 64, 80, True, None, 19.88, 21.66)]


def config(shape: str, vocab: int | None = None):
    from transformers import AutoConfig

    from train_throughput import SHAPES

    kind, kw = SHAPES[shape]
    return AutoConfig.for_model(kind, **{**kw, **({"vocab_size": vocab} if vocab else {})})


def real_autocast_bytes(shape: str, seq: int, layers: int) -> int:
    """Saved bytes of real float32 weights under the CPU's bf16 autocast (weight copies left out)."""
    from hmcl_cli.modeling.encoder import backbone_class
    from hmcl_cli.training.memory import _register_probe, real_autocast_saved_bytes

    cfg = config(shape, vocab=512)  # the vocabulary does not change the activations
    cfg.num_hidden_layers = layers
    model = backbone_class(cfg, Path(".")).from_config(cfg, dtype=torch.float32)
    model.config._attn_implementation = _register_probe()
    return real_autocast_saved_bytes(model, torch.zeros((1, seq), dtype=torch.long))


def plan(shape: str, batch: int, longest: int, lora: bool, real_tokens) -> float:
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.memory import plan_memory

    recipe = load_recipe(data={
        "name": "h200", "output_dir": "/tmp/hmcl-plan",
        "model": {"name_or_path": "/not/loaded", "max_length": 128, "gradient_checkpointing": lora, "lora": {"enabled": lora}},
        "data": {"sources": [{"path": "/not/read.jsonl", "split": "train"}], "dev_fraction": 0.0},
        "train": {"batch_size": batch, "group_size": 1, "precision": "bf16"}})
    p = plan_memory(recipe, device=torch.device("cuda"), config=config(shape), capacity=140 * 2 ** 30,
                    longest=(longest, longest), head_params=0, real_tokens=real_tokens)
    return p.peak / 2 ** 30


def main() -> None:
    from hmcl_cli.training.memory import _layer_bytes

    print("one layer, one sequence: saved bytes")
    for shape, seq in (("qwen3-0.6b", 80), ("bert-base", 72), ("minilm-shape", 72)):
        new = _layer_bytes(config(shape), torch.float32, None, seq, autocast=torch.bfloat16)[1]
        old = _layer_bytes(config(shape), torch.bfloat16, None, seq)[1]
        real = real_autocast_bytes(shape, seq, 2) - real_autocast_bytes(shape, seq, 1)
        print(f"  {shape:<13} {seq} tokens: probe {new:,} (all bf16: {old:,}); real autocast {real:,}")
    print("H200 runs: plan printed there / recomputed now / peak measured (GiB)")
    for shape, batch, longest, lora, real, printed, peak in H200_RUNS:
        now = plan(shape, batch, longest, lora, real)
        print(f"  {shape:<13} {batch:>3} {'LoRA' if lora else 'full'}: {printed:7.2f} / {now:7.2f} / {peak:7.2f}"
              f"  ({now / peak - 1:+.0%} of the peak)")


if __name__ == "__main__":
    main()
