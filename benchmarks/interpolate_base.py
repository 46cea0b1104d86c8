"""Interpolate trained weights back toward the untrained model (WiSE-FT) and score each mix.

    python benchmarks/quality.py --seeds 3 --max-steps 320 --rows hmcl-mined --keep-models /tmp/models
    python benchmarks/interpolate_base.py --alphas 1.0,0.9,0.8,0.7 /tmp/models/hmcl-mined-s3-*

theta = a * trained + (1 - a) * base for every weight; each mix is scored like quality.py's rows
(STS-B dev, SICK trial, TrecQA dev MAP).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from safetensors.torch import load_file, save_file

    import quality
    from hmcl_cli.modeling.resolve import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="trained model folders (quality.py --keep-models)")
    ap.add_argument("--alphas", default="1.0,0.9,0.8,0.7")
    ap.add_argument("--base", default="sentence-transformers/all-MiniLM-L6-v2")
    args = ap.parse_args()
    base = {k.removeprefix("bert."): v for k, v in load_file(str(Path(resolve_model(args.base)) / "model.safetensors")).items()}
    for folder in map(Path, args.models):
        trained = load_file(str(folder / "model.safetensors"))
        missing = set(trained) - set(base)
        if missing:
            sys.exit(f"{folder}: weights the base lacks: {sorted(missing)[:3]}")
        for a in (float(x) for x in args.alphas.split(",")):
            mixed = {k: (a * v.float() + (1 - a) * base[k].float()).to(v.dtype) if v.is_floating_point() else v
                     for k, v in trained.items()}
            with tempfile.TemporaryDirectory() as tmp:
                m = Path(tmp) / "m"
                shutil.copytree(folder, m)
                save_file(mixed, str(m / "model.safetensors"), metadata={"format": "pt"})
                s = quality.evaluate_model(str(m), False)
            cells = " | ".join(f"{100 * s[t]:.2f}" for t in quality.TASKS)
            print(f"| {folder.name} a={a} | {cells} | {100 * statistics.mean(s[t] for t in quality.TASKS):.2f} |", flush=True)


if __name__ == "__main__":
    main()
