"""Long texts, quality: segments and the local term on and off, TrecQA dev MAP and STS-B dev.

    python benchmarks/long_text_quality.py --seeds 1 --jobs 1             # CPU: ~30 min a row
    python benchmarks/long_text_quality.py --seeds 1,2,3 --jobs 12        # GPU (benchmarks/device)

Every row is ``recipes/trecqa.yaml`` without mining (93 TrecQA train questions, 8 epochs of
batch 16 x group 8, the best checkpoint by dev MAP) with STS-B dev added as an eval task; the
rows differ only in ``model.segments`` and ``loss.local_weight``:

* ``whole``: texts as they are (no segments);
* ``seg``, ``seg-local0.2``, ``seg-local0.5``: ``segments: {length: 24, overlap: 4}`` (about
  72% of the TrecQA answers are longer than one segment and are split), local weight 0 / 0.2 / 0.5.

Each row prints the base model encoded the same way beside the trained one (segmenting a base
that fits its texts whole costs quality by itself), as mean ± std over seeds. These sets hold no
text longer than the model's window, so this measures what segments and the local term do to
short-text tasks, not what they buy on long passages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

SEGMENTS = ["model.segments.length=24", "model.segments.overlap=4"]
ROWS = {
    "whole": [],
    "seg": SEGMENTS,
    "seg-local0.2": SEGMENTS + ["loss.local_weight=0.2"],
    "seg-local0.5": SEGMENTS + ["loss.local_weight=0.5"],
}
TASKS = {"trecqa-dev": "map", "stsb-dev": "spearman"}


def run_one(row: str, seed: int, out: Path, extra: list[str]) -> None:
    """Train and evaluate one (row, seed); write {"base": {...}, "trained": {...}} to ``out``."""
    from hmcl_cli.recipe import EvalTask, load_recipe
    from hmcl_cli.stages import run_eval, run_prepare, run_train

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / "recipes" / "trecqa.yaml", overrides=[
            "mine.enabled=false", f"seed={seed}", f"output_dir={tmp}/run", "export.formats=[]",
            "eval.gate=[]", *ROWS[row], *extra])
        recipe.eval.tasks.append(EvalTask(name="stsb-dev", type="sts", score_range=(0, 5),
                                          path=str(SHARED / "stsb" / "stsb-en-dev.csv")))
        run_prepare(recipe, progress=False)
        run_train(recipe)
        report = run_eval(recipe, json_out=Path(tmp) / "results.json")
    scores = {who: {t: report["results"][t][model][metric] for t, metric in TASKS.items()}
              for who, model in (("base", "base"), ("trained", "fine-tuned"))}
    out.write_text(json.dumps(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    ap.add_argument("--out", default=None, help="folder for the per-run JSON (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], help="recipe override for every row (e.g. a smoke run)")
    ap.add_argument("--one", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="hmcl-longq-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        row, seed = args.one
        run_one(row, int(seed), out / f"{row}.{seed}.json", args.set)
        return
    # seed-major: a run cut off by a time limit still leaves every row compared on the first seeds
    jobs = [(row, seed) for seed in args.seeds.split(",") for row in args.rows.split(",")
            if not (out / f"{row}.{seed}.json").is_file()]
    # each run's own output in <out>/<row>.<seed>.log; its torch CPU threads share the cores
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))}
    running: list[tuple[str, float, subprocess.Popen]] = []
    t0 = time.perf_counter()

    def reap(name: str, started: float, proc: subprocess.Popen) -> None:
        code = proc.wait()
        print(f"{name}: {'done' if code == 0 else f'failed (exit {code}; see its log)'} in "
              f"{time.perf_counter() - started:.0f} s ({time.perf_counter() - t0:.0f} s since the start)", flush=True)

    try:
        for row, seed in jobs:
            while len(running) >= args.jobs:
                reap(*running[0])
                running.pop(0)
            sets = [a for s in args.set for a in ("--set", s)]
            with open(out / f"{row}.{seed}.log", "w") as log:  # a Ctrl-C stops us, we stop them:
                proc = subprocess.Popen([sys.executable, __file__, "--out", str(out), *sets, "--one", row, seed],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running.append((f"{row}.{seed}", time.perf_counter(), proc))
        while running:
            reap(*running[0])
            running.pop(0)
    except KeyboardInterrupt:  # a time limit (run.sh sends SIGINT): the table of the runs that ended
        stopped = [(name, proc) for name, _, proc in running if proc.poll() is None]
        for name, proc in stopped:  # where each had got to, then stopped at once (its results are dropped)
            lines = (out / f"{name}.log").read_text(errors="replace").replace("\r", "\n").splitlines()
            last = [ln.strip() for ln in lines if ln.strip()][-2:]
            proc.kill()
            proc.wait()
            print(f"{name}: stopped after {time.perf_counter() - t0:.0f} s; its log ended: " + " | ".join(last))
        print(f"\ninterrupted: {len(stopped)} runs stopped; the table holds those that ended")
    print(f"\n{out}: " + ", ".join(f"{t} ({m})" for t, m in TASKS.items()) + ", x100, base -> trained")
    print("| row | " + " | ".join(TASKS) + " | seeds |")
    print("|" + " --- |" * (len(TASKS) + 2))
    for row in args.rows.split(","):
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{row}.*.json"))]
        if not runs:
            continue

        def cell(who: str, task: str) -> str:
            vals = [100 * r[who][task] for r in runs]
            return f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

        print(f"| {row} | " + " | ".join(f"{cell('base', t)} -> {cell('trained', t)}" for t in TASKS)
              + f" | {len(runs)} |")


if __name__ == "__main__":
    main()
