"""SIGTERM during `hmcl train` saves a checkpoint; `--resume` ends with the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def test_sigterm_during_prepare_leaves_previous_outputs_and_no_temp_files(tmp_path, tiny_bert):
    """Outside training SIGTERM unwinds like Ctrl-C: exit 130, the earlier prepared data intact,
    no temporary files, the run lock released."""
    import json

    recipe_path = write_recipe(tmp_path, tiny_bert)
    recipe = load_recipe(recipe_path)
    prepare(recipe, progress=False)
    data = recipe.run_dir / "data"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    big = tmp_path / "train.jsonl"  # the recipe's train source, now 300k rows
    with open(big, "w") as f:
        for i in range(300_000):
            f.write(json.dumps({"query": f"question number {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hmcl_cli", "prepare", str(recipe_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    while "rows" not in line and proc.poll() is None:  # the reader's first progress line
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, line + out + err
    assert "interrupted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert not [p for p in recipe.run_dir.rglob("*") if ".tmp" in p.name or "lock" in p.name]


def _running_with(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("command", ["train", "run"])
def test_sigterm_reaches_a_relaunched_training_and_is_waited_for(tmp_path, tiny_bert, command):
    """A CI job cancelled: SIGTERM to `hmcl train` that relaunched itself under `accelerate launch`
    ended hmcl alone (exit 130 at once) and left the training running on without it, holding the
    run directory. hmcl now passes the signal on and waits: the training saves its checkpoint,
    hmcl exits 130 after it, and no process of the training is left. Under `hmcl run` the
    training's hint names `hmcl run --resume`, the command that goes on (not `hmcl train`)."""
    train = {"train": {**TRAIN["train"], "launcher": "accelerate"}}
    # to hmcl alone, as a CI runner or `kill` sends it
    code, said, recipe, _ = _signal_a_training(tmp_path, tiny_bert, train, signal.SIGTERM, "hmcl", [command])
    assert code == 130, said
    assert "relaunching: " in said and "checkpoint saved" in said
    assert said.index("checkpoint saved") < said.rindex("interrupted")  # hmcl's own word comes after the training's
    assert f"continue with `hmcl {command} RECIPE --resume`" in said
    assert ("hmcl train RECIPE" in said) == (command == "train")
    ckpts = sorted((recipe.run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 120


def _env_of(pid: int) -> dict[str, str]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(v.decode(errors="replace").split("=", 1) for v in env if b"=" in v)


TWO = ["train", "--launcher", "accelerate", "--", "--num_processes", "2"]


def _signal_a_training(tmp_path, model, train: dict, signum: int, whom: str, command=TWO):
    """Start `hmcl COMMAND RECIPE` and, once it trains (2 metrics records), send ``signum`` to
    ``whom``: "hmcl" (the command itself), "rank 1" (the second of its relaunched training
    processes) or "trainer" (its one relaunched process). Return (exit code, output, recipe, the
    pid signalled) once hmcl has ended, nothing of the training left running."""
    recipe_path = write_recipe(tmp_path, model, **train)
    recipe = load_recipe(recipe_path)
    prepare(recipe, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "hmcl_cli", command[0], str(recipe_path), *command[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        metrics = recipe.run_dir / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        if whom == "hmcl":
            target = [proc.pid]
        else:  # a training process: hmcl's relaunch gave it HMCL_PID_DIR (the launcher has it too)
            target = [pid for pid in _running_with(str(recipe_path)) if "HMCL_PID_DIR" in _env_of(pid)
                      and "accelerate" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                      and _env_of(pid).get("RANK") == ("1" if whom == "rank 1" else None)]
        assert len(target) == 1
        os.kill(target[0], signum)
        said, _ = proc.communicate(timeout=180)
        assert _running_with(str(recipe_path)) == []  # nothing of the training left behind
        return proc.returncode, said, recipe, target[0]
    finally:
        proc.kill()
        for pid in _running_with(str(recipe_path)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_a_signal_to_one_of_two_training_processes_stops_both_at_one_step(tmp_path, tiny_bert, fsdp):
    """The processes of a training agree each step whether one was asked to stop. A SIGINT to the
    second process alone (as any drift between their host loops makes of one to all) stopped it
    alone: the main process waited in the next step's collective for it, and no checkpoint was
    written. Now both stop after the same step and the checkpoint is saved. (A signal landing just
    after a step's agreement: test_distributed's late-signal test.)"""
    code, said, recipe, _ = _signal_a_training(tmp_path, tiny_bert, {"train": {**TRAIN["train"], "fsdp": fsdp}},
                                               signal.SIGINT, "rank 1")
    assert code == 130, said
    assert "training stopped by signal 2" in said and "checkpoint saved" in said
    ckpts = sorted((recipe.run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 120


def test_a_training_process_killed_without_a_word_is_named_with_exit_code_12(tmp_path, tiny_bert):
    """SIGKILL to one of two processes (the out-of-memory killer's signal): the other said
    "internal error ... please report it" (gloo's lost connection) and the launcher exited 1. Now
    it says another process ended, hmcl names the lost one by rank and pid, says whether a
    checkpoint is there to resume, and exits 12."""
    code, said, _, pid = _signal_a_training(tmp_path, tiny_bert, TRAIN, signal.SIGKILL, "rank 1")
    assert code == 12, said
    assert "process rank 0: lost its connection to another process of this training, which ended" in said
    assert f"training process rank 1 (pid {pid}) ended without a message" in said
    assert "no checkpoint was written yet" in said and "internal error" not in said


def test_the_one_relaunched_training_process_killed_is_named_and_run_json_says_so(tmp_path, tiny_bert):
    """`hmcl run` whose training hmcl relaunched as one process (train.launcher: accelerate): that
    process killed made hmcl exit 1 without a word. Now it is named, the last checkpoint too, and
    run.json says what a CI job reads: the train stage, `process lost`, exit code 12."""
    train = {"train": {**TRAIN["train"], "launcher": "accelerate", "save_steps": 1},
             "eval": {"tasks": []}, "export": {"enabled": False}}
    code, said, recipe, pid = _signal_a_training(tmp_path, tiny_bert, train, signal.SIGKILL, "trainer", ["run"])
    assert code == 12, said
    assert f"training process (pid {pid}) ended without a message" in said and "the last checkpoint is step-" in said
    summary = json.loads((recipe.run_dir / "run.json").read_text())
    assert (summary["stage"], summary["error"], summary["exit_code"]) == ("train", "process lost", 12)
