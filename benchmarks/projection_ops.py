"""Operations a training forward and backward dispatches with and without ``model.fused_projections``.

    python benchmarks/projection_ops.py                       # minilm-shape, micro-qwen3-28
    python benchmarks/projection_ops.py --shapes bert-base --batch 4   # (bf16 on a CPU is slow)

Counted, not timed (a CPU; views left out: each counted operation is at least one kernel launch
on a GPU, where short-text training steps are launch-bound). One forward call of ``--batch``
STS-B sentences through hmcl's ``EmbeddingModel`` (padded, the way a GPU trains BERT-class
models), a loss on the embeddings, the backward pass, after one such step untimed (the first
forward call also runs hmcl's one-time probes of the model); in float32 and under bf16 autocast (the
CPU's autocast casts a matrix product's weights as CUDA's does: one copy per weight per forward,
and the cast back of its gradient). Qwen3 shapes count ``F.rms_norm`` as the GPU's one fused
kernel (``train_throughput.gpu_norm_kernels_on_cpu``). Random weights; the counts do not depend on
the width, so ``micro-qwen3-28`` stands for Qwen3-0.6B's 28 layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from hmcl_cli.modeling.encoder import EmbeddingModel  # noqa: E402


def count(model: EmbeddingModel, texts: list[str], autocast: bool) -> tuple[Counter, Counter]:
    """The operations of one training forward call and of its backward, by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = model.pad([model.tokenize([t])[0] for t in texts])
    with tt.OpCounter() as forward:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            emb = model(batch["input_ids"], batch["attention_mask"])
    with tt.OpCounter() as backward:
        (emb.float() @ emb.float().T).logsumexp(-1).mean().backward()
    return forward.counts, backward.counts


def _changed(plain: Counter, fused: Counter) -> dict:
    return {k: [plain[k], fused[k]] for k in sorted(set(plain) | set(fused)) if plain[k] != fused[k]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="minilm-shape,micro-qwen3-28")
    ap.add_argument("--batch", type=int, default=16, help="sentences in the forward call (counts do not depend on it)")
    args = ap.parse_args()
    texts = [a for a, _ in tt.stsb_pairs(args.batch)][: args.batch]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            if tt.SHAPES[shape][0] == "qwen3":
                tt.gpu_norm_kernels_on_cpu()
            folder = tt.build_model(shape, Path(tmp) / shape)
            for autocast in (False, True):
                counts, groups = {}, 0
                for fused in (False, True):
                    model = EmbeddingModel.load(str(folder), fused_projections=fused)
                    model.unpad = False
                    count(model, texts, autocast)  # the first call also runs hmcl's one-time probes of the model
                    counts[fused] = count(model, texts, autocast)
                    groups = max(groups, model.projection_fusion.groups)
                (fwd0, bwd0), (fwd1, bwd1) = counts[False], counts[True]
                plain, fused = sum((fwd0 + bwd0).values()), sum((fwd1 + bwd1).values())
                row = f"{shape}, {'bf16 autocast' if autocast else 'float32'}"
                rows[row] = {"plain": plain, "fused": fused, "groups": groups,
                             "saved_per_group": round((plain - fused) / max(1, groups), 1),
                             "ratio": round(fused / plain, 3),
                             "forward": [sum(fwd0.values()), sum(fwd1.values())],
                             "backward": [sum(bwd0.values()), sum(bwd1.values())],
                             "forward_changed": _changed(fwd0, fwd1), "backward_changed": _changed(bwd0, bwd1)}
                print(f"{row:<36} ops {plain:>6} -> {fused:>6} ({rows[row]['ratio']:.3f}x; "
                      f"{groups} groups, {rows[row]['saved_per_group']} fewer each)", flush=True)
                print(f"  forward {rows[row]['forward']} {rows[row]['forward_changed']}; "
                      f"backward {rows[row]['backward']} {rows[row]['backward_changed']}", flush=True)
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
