"""GradCache chunk size vs step time: is there a speed cliff?

    python benchmarks/grad_cache_chunks.py                          # CPU: MiniLM, quickstart data
    python benchmarks/grad_cache_chunks.py --chunks 0,256,64,16 --batch-size 64   # GPU

One trainer (all-MiniLM-L6-v2, or a random-weight shape of train_throughput.py), the same
batches, the forward + backward of a training step (no optimizer step) timed with every
``--chunks`` value in turn (0: the plain step), ``--repeats`` rounds interleaved so that machine
noise hits every setting alike; the fastest round of each is reported as a ratio to the plain
step. GradCache computes the same loss and gradients at every chunk size (tests/test_training.py);
only time and memory change. ``train.grad_cache_chunk: auto`` picks the largest chunk that fits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from train_throughput import SHAPES, build_model, examples

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="0,64,16", help="chunk sizes, 0 = no GradCache")
    ap.add_argument("--batch-size", type=int, default=32, help="anchors per step (group of 4 candidates each)")
    ap.add_argument("--steps", type=int, default=2, help="distinct batches timed per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=["minilm", *SHAPES], default="minilm")
    args = ap.parse_args()
    import json

    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.batching import StepBatches
    from hmcl_cli.training.trainer import HMCLTrainer

    chunks = [int(c) for c in args.chunks.split(",")]
    rows, group, q_len, d_len = examples("quickstart")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build_model(args.shape, tmp / "model")
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = load_recipe(data={
            "name": "chunks", "seed": 0, "output_dir": str(tmp / "run"),
            "model": {"name_or_path": str(path), "query_max_length": q_len, "doc_max_length": d_len, "max_length": d_len},
            "data": {"sources": [{"path": str(tmp / "train.jsonl"), "split": "train"}], "dev_fraction": 0.0},
            "train": {"max_steps": 1, "batch_size": args.batch_size, "group_size": group, "batch_by_source": False},
            "export": {"formats": []}})
        prepare(recipe, progress=False)
        t = HMCLTrainer(recipe)
        t.setup()
        batches = [StepBatches(t.data, t.model, t.plan, 0, 0, group, 0)[i] for i in range(args.steps)]
        cuda = t.device.type == "cuda"
        times: dict[int, list[float]] = {c: [] for c in chunks}
        peaks: dict[int, float] = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            for c in chunks:
                t.cfg.grad_cache_chunk = c or None
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for b in batches:
                    t._forward_backward(b, 1.0)
                    t.optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                    peaks[c] = torch.cuda.max_memory_allocated() / 1024 ** 3
                times[c].append((time.perf_counter() - t0) / len(batches))
    texts = [tuple(b["q_input_ids"].shape[:1]) + tuple(b["c_input_ids"].shape[:1]) for b in batches]
    print(f"\n{args.shape} on {t.device.type}, {args.batch_size} anchors x {group} candidates "
          f"(texts per side per step: {texts}), best of {args.repeats} interleaved rounds")
    plain = min(times[chunks[0]])
    for c in chunks:
        best = min(times[c])
        mem = f", peak {peaks[c]:.2f} GiB" if c in peaks else ""
        print(f"chunk {c or 'none':>5}: {best:.3f} s/step, {best / plain:.2f}x the chunk-{chunks[0] or 'none'} step{mem}")


if __name__ == "__main__":
    main()
