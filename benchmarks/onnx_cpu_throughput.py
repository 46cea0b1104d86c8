"""Throughput of the exported ONNX model (fp32 and int8) against torch, on CPU, same inputs.

    python benchmarks/onnx_cpu_throughput.py [--texts 2000] [--batch-size 64] [--threads 2]

Embeds the same sentences (STS-B dev from ../shared/data when present, else the quickstart
sample) with all-MiniLM-L6-v2 three ways in one run — torch fp32, ONNX fp32, ONNX int8
(onnxruntime) — and prints texts/s, the ratio to torch, and the mean cosine to torch.
Timings are on this machine; compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def sentences(n: int) -> list[str]:
    stsb = ROOT.parent / "shared" / "data" / "stsb" / "stsb-en-dev.csv"
    if stsb.is_file():
        with open(stsb, encoding="utf-8", newline="") as f:
            texts = list(dict.fromkeys(t for row in csv.reader(f) for t in row[:2]))
    else:
        rows = [json.loads(x) for x in (ROOT / "recipes" / "data" / "support-dev.jsonl").read_text().splitlines()]
        texts = list(dict.fromkeys(t for r in rows for t in [r["query"], *r["pos"], *r["neg"]]))
    return (texts * (n // len(texts) + 1))[:n] if len(texts) < n else texts[:n]


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hmcl_cli.export.onnx import OnnxEmbedder, export_onnx
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.resolve import resolve_model

    folder = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    model = EmbeddingModel.load(str(folder))
    texts = sentences(args.texts)
    # distinct texts so no encoder can skip work through de-duplication
    texts = [f"{t} ({i})" for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(folder, Path(tmp) / "fp32")
        export_onnx(folder, Path(tmp) / "int8", quantize=True)
        runners = {
            "torch fp32": model,
            "onnx fp32": OnnxEmbedder(Path(tmp) / "fp32" / "model.onnx", model, threads=args.threads),
            "onnx int8": OnnxEmbedder(Path(tmp) / "int8" / "model_int8.onnx", model, threads=args.threads),
        }
        ref = model.encode(texts, batch_size=args.batch_size).numpy()
        rows = []
        for name, m in runners.items():
            m.encode(texts[:128], batch_size=args.batch_size)  # warm-up
            secs = timed(lambda m=m: m.encode(texts, batch_size=args.batch_size))
            emb = np.asarray(m.encode(texts, batch_size=args.batch_size))
            rows.append((name, len(texts) / secs, float(np.mean(np.sum(emb * ref, axis=1)))))
    base = rows[0][1]
    print(f"all-MiniLM-L6-v2, {len(texts)} texts, batch {args.batch_size}, {args.threads} threads")
    print(f"{'runtime':<12} {'texts/s':>10} {'vs torch':>9} {'cos to torch':>13}")
    for name, tps, cos in rows:
        print(f"{name:<12} {tps:>10.1f} {tps / base:>8.2f}x {cos:>13.6f}")


if __name__ == "__main__":
    main()
