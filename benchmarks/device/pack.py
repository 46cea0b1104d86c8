"""Pack what the lent GPU machine lacks into ``.dev/`` (git-ignored), to carry in one call.

    python benchmarks/device/pack.py            # here, once: wheels + all-MiniLM-L6-v2 (fp16)
    # then, on the device (one call, carry [".dev"]):
    bash benchmarks/device/run.sh speed scale encode  # see run.sh for the parts

The device image has torch, transformers, accelerate, peft and sentence-transformers but not
mteb, datasets or pydantic, and it cannot reach a registry or a model hub. A call carries at
most 64 MiB, and the real all-MiniLM-L6-v2 weights are 87 MiB in float32, so the weights travel
rounded to float16 (43 MiB) and are widened back to float32 there (``run.sh`` does it). The
rounding moves each weight by at most 2^-11 of its value, below the 2^-8 of the bf16 autocast
every GPU run computes in; ``--check`` measures what it does to the base model's dev scores
here (benchmarks/RESULTS.md keeps the reading), so GPU quality rows start from a model whose
scores are known.

What it writes:

* ``.dev/wheels/``: cp312 manylinux wheels of mteb, datasets, pydantic and the packages they
  need that the image lacks (versions pinned to what this machine's venv runs, so the device
  evaluates with the same mteb as CI);
* ``.dev/minilm/``: the model folder, ``model.safetensors`` replaced by ``model.fp16.safetensors``;
* ``.dev/data/``: the STS-B, SICK and TrecQA files the benchmarks read from ../shared/data
  (which does not travel; never committed);
* ``.dev/manifest.json``: sha256 of the original weights, the largest relative rounding error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / ".dev"
sys.path.insert(0, str(ROOT))

# what mteb / datasets / pydantic need beyond the device image (KINDS.md lists the image's packages)
WHEELS = ["mteb", "datasets", "pydantic", "pydantic_core", "typing-inspection", "annotated-types", "dill",
          "multiprocess", "pytrec_eval-terrier", "sentence-transformers"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]
LIMIT = 64 * 2 ** 20  # one call's working tree


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        pin = f"{name}=={metadata.version(name)}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), pin]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True)


def pack_model(dest: Path) -> dict:
    """Copy the offline all-MiniLM-L6-v2 with its weights rounded to float16."""
    import torch
    from safetensors.torch import load_file, save_file

    from hmcl_cli.modeling.resolve import resolve_model

    src = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "openvino"))
    weights = load_file(src / "model.safetensors")
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    worst = max(float(((h.float() - w).abs() / w.abs().clamp(min=2 ** -14)).max())
                for w, h in zip(weights.values(), half.values()) if w.is_floating_point())
    save_file(half, dest / "model.fp16.safetensors", metadata={"format": "pt"})
    return {"model": "sentence-transformers/all-MiniLM-L6-v2", "source": str(src),
            "sha256_float32": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest(),
            "max_relative_rounding": worst}


def widen(folder: Path) -> None:
    """float16 weights -> ``model.safetensors`` in float32 (what run.sh calls on the device)."""
    from safetensors.torch import load_file, save_file

    half = load_file(folder / "model.fp16.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in half.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})


def check(folder: Path) -> None:
    """Base-model dev scores: the original weights against the float16-rounded ones (CPU, fp32)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality
    from hmcl_cli.modeling.resolve import resolve_model

    tmp = DEV / "check-minilm"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folder, tmp)
    widen(tmp)
    (tmp / "model.fp16.safetensors").unlink()
    rows = {"float32 (original)": quality.evaluate_model(str(resolve_model("sentence-transformers/all-MiniLM-L6-v2")), False),
            "float16-rounded": quality.evaluate_model(str(tmp), False)}
    shutil.rmtree(tmp)
    print("| base weights | " + " | ".join(quality.TASKS) + " |")
    print("|" + " --- |" * (len(quality.TASKS) + 1))
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * scores[t]:.3f}" for t in quality.TASKS) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="also score the base model both ways (CPU, ~2 min)")
    ap.add_argument("--widen", type=Path, default=None, help=argparse.SUPPRESS)  # run.sh, on the device
    args = ap.parse_args()
    if args.widen:
        widen(args.widen)
        return
    download_wheels(DEV / "wheels")
    shared = ROOT.parent / "shared" / "data"
    for name in ("stsb", "sick", "trecqa"):
        if (DEV / "data" / name).exists():
            shutil.rmtree(DEV / "data" / name)
        shutil.copytree(shared / name, DEV / "data" / name)
    info = pack_model(DEV / "minilm")
    info["wheels"] = sorted(p.name for p in (DEV / "wheels").glob("*.whl"))
    (DEV / "manifest.json").write_text(json.dumps(info, indent=1))
    size = sum(p.stat().st_size for p in DEV.rglob("*") if p.is_file())
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in listed if f and (ROOT / f.decode()).is_file())
    print(f".dev: {size / 2 ** 20:.1f} MiB ({len(info['wheels'])} wheels) + working tree {tree / 2 ** 20:.1f} MiB; "
          f"max relative rounding of the weights {info['max_relative_rounding']:.2e}")
    if size + tree > LIMIT * 0.97:
        sys.exit(f".dev + the working tree are {(size + tree) / 2 ** 20:.1f} MiB: too close to the 64 MiB a call carries")
    if args.check:
        check(DEV / "minilm")


if __name__ == "__main__":
    main()
