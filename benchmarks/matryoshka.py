"""Matryoshka sizes: a recipe trained with and without `loss.matryoshka_dims`, both scored whole
and cut to each size, side by side.

    python benchmarks/matryoshka.py --recipes sts-nli-en,trecqa --seeds 42,7 --jobs 2
    python benchmarks/matryoshka.py --recipes trecqa --weights 0.25,0.25,0.25,0.25

Each run is `hmcl run recipes/<recipe>.yaml --set seed=S` (plus `--set
loss.matryoshka_dims=[...]` for the matryoshka row) with `eval.dims` set to the sizes in both
rows, so the plain model is scored cut as well; the base model's row comes from the same eval.
Runs go to a temporary folder, one thread each, `--jobs` side by side. Prints a Markdown table
of the recipe's eval tasks (main metric) per size: base, plain, matryoshka, and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, seed: int, dims: list[int], matryoshka: bool, out: Path, weights: list[float]) -> dict:
    name = f"{recipe}-{'mrl' if matryoshka else 'plain'}-{seed}"
    sets = [f"seed={seed}", f"name={name}", f"output_dir={out / name}", f"eval.dims={json.dumps(dims)}",
            "export.enabled=false"]
    if matryoshka:
        sets.append(f"loss.matryoshka_dims={json.dumps(dims)}")
        if weights:
            sets.append(f"loss.matryoshka_weights={json.dumps(weights)}")
    cmd = [sys.executable, "-m", "hmcl_cli", "run", str(ROOT / "recipes" / f"{recipe}.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / name / "eval" / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="sts-nli-en,trecqa")
    ap.add_argument("--seeds", default="42,7")
    ap.add_argument("--dims", default="256,128,64,32")
    ap.add_argument("--weights", default="", help="loss.matryoshka_weights, one per size (default 1 each)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    weights = [float(w) for w in args.weights.split(",")] if args.weights else []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(r, s, m): pool.submit(run, r, s, dims, m, Path(tmp), weights) for r in recipes for s in seeds for m in (False, True)}
        reports = {k: f.result() for k, f in jobs.items()}
    print("| recipe / task (metric) | size | base | plain | matryoshka | matryoshka - plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in recipes:
        sample = reports[(r, seeds[0], False)]
        for task, info in sample["tasks"].items():
            metric = info["main"]
            for size in [None, *dims]:
                def value(model: str, mrl: bool, seed: int) -> float:
                    label = model if size is None else f"{model}@{size}"
                    return reports[(r, seed, mrl)]["results"][task][label][metric]

                base = value("base", False, seeds[0])
                plain = [value("fine-tuned", False, s) for s in seeds]
                mrl = [value("fine-tuned", True, s) for s in seeds]
                diffs = [m - p for m, p in zip(mrl, plain)]
                fmt = lambda xs: " / ".join(f"{x:.4f}" for x in xs) + (f" (mean {statistics.mean(xs):.4f})" if len(xs) > 1 else "")
                print(f"| {r} / {task} ({metric}) | {'full' if size is None else size} | {base:.4f} | {fmt(plain)} "
                      f"| {fmt(mrl)} | {' / '.join(f'{d:+.4f}' for d in diffs)} |")


if __name__ == "__main__":
    main()
