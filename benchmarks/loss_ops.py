"""Operations the HMCL loss dispatches per training step, forward and backward.

    python benchmarks/loss_ops.py                  # the quickstart's batch: 32 anchors x 4 candidates
    python benchmarks/loss_ops.py --anchors 64 --dim 768

Counted, not timed (views left out: each counted operation is at least one kernel launch on a
GPU, where short-text training steps are launch-bound). The batch is what a step of the
quickstart hands the loss: ``--anchors`` anchors with one positive, one weak-positive and two
negatives each, all candidates distinct, random unit embeddings of ``--dim`` dimensions (the
counts do not depend on the values). Settings: the recipe defaults (contrastive and ranking
terms), ``loss.symmetric``, ``loss.ranking_margin`` 0.1, and ``loss.matryoshka_dims``
[256, 128, 64, 32].

With ``--peak-anchors N`` it also measures the memory the loss's forward and backward take at N
anchors (4N candidates and pairs; every pair scored), each setting in a fresh process: the growth of
its peak resident memory, in MiB (CPU allocations; a GPU's would differ by the allocator's caching).

Columns: the loss's forward operations; of those, the ones left when the batch's label tensors
(targets, masks: built from the labels alone) are ready, which is what each matryoshka size
adds; the backward pass's. The row "labels per cut size" rebuilds the label tensors for every
cut size, as the loss did before it kept them on the batch (``PairBatch.prepared``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import OpCounter  # noqa: E402

from hmcl_cli.losses import HMCLLoss, PairBatch  # noqa: E402
from hmcl_cli.recipe import LossConfig  # noqa: E402

KEEPS_LABELS = "prepared" in PairBatch.__dataclass_fields__  # False before 2026-12-05: the script runs there too
SETTINGS = {
    "defaults": {},
    "symmetric": {"symmetric": True},
    "ranking margin": {"ranking_margin": 0.1},
    "matryoshka": {"matryoshka_dims": [256, 128, 64, 32]},
}


def make_batch(anchors: int, dim: int, seed: int = 0, scored: bool = False) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    per = 4  # positive, weak-positive, two negatives
    a = F.normalize(torch.randn(anchors, dim, generator=g), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(anchors * per, dim, generator=g), dim=-1).requires_grad_()
    level = torch.tensor([2, 1, 0, 0]).repeat(anchors)
    score = torch.rand(anchors * per, generator=g) * 5 if scored else torch.full((anchors * per,), float("nan"))
    return PairBatch(a, c, torch.arange(anchors).repeat_interleave(per), torch.arange(anchors * per), level,
                     score, torch.arange(anchors) + 10**6, torch.arange(anchors * per) + 2 * 10**6)


def peak_mib(setting: str, anchors: int, dim: int) -> tuple[float, float]:
    """In a fresh process: how much the peak resident memory grows over the loss's forward and
    backward passes at ``anchors`` anchors (the batch built before the baseline is read), and the
    loss's value."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import loss_ops; "
            f"print(*loss_ops._peak({setting!r}, {anchors}, {dim}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, value = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(value)


def _peak(setting: str, anchors: int, dim: int) -> tuple[float, float]:
    batch = make_batch(anchors, dim, scored=True)
    loss = HMCLLoss(LossConfig(**SETTINGS[setting]), dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = loss(batch)[0]
    total.backward()
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024), total.item()  # KiB on Linux


class _FreshLabelsPerCut(PairBatch):
    """A batch whose matryoshka cuts build their own label tensors (the loss before 2026-12-05)."""

    def truncated(self, dim: int) -> PairBatch:
        cut = super().truncated(dim)
        cut.prepared = {}
        return cut


def _fields(b: PairBatch) -> dict:
    """The batch's constructor arguments (its label tensors, where it keeps them, included)."""
    return {k: getattr(b, k) for k, f in b.__dataclass_fields__.items() if f.init}


def count(loss: HMCLLoss, batch: PairBatch, ready: bool = True) -> dict:
    with OpCounter() as fwd:
        total, _ = loss(batch)
    with OpCounter() as bwd:
        total.backward()
    out = {"forward": sum(fwd.counts.values()), "backward": sum(bwd.counts.values())}
    if ready and KEEPS_LABELS:  # again, on a batch holding this one's label tensors
        with OpCounter() as again:
            loss(PairBatch(**_fields(batch)))
        out["forward, labels ready"] = sum(again.counts.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--peak-anchors", type=int, default=0, help="also measure the loss's memory at this many anchors")
    args = ap.parse_args()
    rows = {}
    for name, update in SETTINGS.items():
        loss = HMCLLoss(LossConfig(**update), args.dim)
        rows[name] = count(loss, make_batch(args.anchors, args.dim))
        if update.get("matryoshka_dims") and KEEPS_LABELS:
            fresh = _FreshLabelsPerCut(**_fields(make_batch(args.anchors, args.dim)))
            rows[f"{name}, labels per cut size"] = count(loss, fresh, ready=False)
        if args.peak_anchors:
            peak, value = peak_mib(name, args.peak_anchors, args.dim)
            rows[name][f"peak MiB at {args.peak_anchors} anchors"] = peak
            rows[name][f"loss at {args.peak_anchors} anchors"] = round(value, 6)
    print(f"loss operations per step, {args.anchors} anchors x 4 candidates, {args.dim} dimensions (CPU count)")
    for name, row in rows.items():
        print(f"{name:32s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    print(json.dumps({"args": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
