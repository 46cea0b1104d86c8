"""SIGTERM during `hmcl train` saves a checkpoint; `--resume` ends with the same weights."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from hmcl_cli.data.prepare import prepare
from hmcl_cli.recipe import load_recipe
from hmcl_cli.stages import run_train
from conftest import write_recipe

TRAIN = {"train": {"max_steps": 120, "log_steps": 1, "save_steps": 1000, "eval_steps": 1000, "load_best_at_end": False}}


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, tiny_bert):
    ref_recipe = load_recipe(write_recipe(tmp_path / "ref", tiny_bert, **TRAIN))
    prepare(ref_recipe, progress=False)
    reference = load_file(run_train(ref_recipe) / "model.safetensors")

    recipe_path = write_recipe(tmp_path / "killed", tiny_bert, **TRAIN)
    recipe = load_recipe(recipe_path)
    prepare(recipe, progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hmcl_cli", "train", str(recipe_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = recipe.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "checkpoint saved" in err and "--resume" in err
    ckpts = sorted((recipe.run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < 120  # really interrupted mid-training
    assert not (recipe.run_dir / "model").exists()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and f"step {stopped_at}" in resumed.stdout
    final = load_file(recipe.run_dir / "model" / "model.safetensors")
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.allclose(final[k], reference[k], atol=1e-5), k
