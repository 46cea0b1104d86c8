"""Cross-device negatives: 2 CPU processes (gloo) == 1 process on the doubled batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from hmcl_cli.losses import HMCLLoss, PairBatch
from hmcl_cli.recipe import LossConfig
from hmcl_cli.training.distributed import average_gradients, gather_plain, gather_sizes, gather_with_grad

CFG = LossConfig(contrastive_weight=1.0, classification_weight=0.3, ranking_weight=0.5, temperature=0.1)


def _data():
    g = torch.Generator().manual_seed(0)
    xq, xc = torch.randn(8, 6, generator=g), torch.randn(16, 6, generator=g)
    # anchor i owns candidates 2i (pos) and 2i+1 (weak for even i, neg for odd i)
    pa = torch.arange(8).repeat_interleave(2)
    pc = torch.arange(16)
    lvl = torch.tensor([2, 1, 2, 0] * 4)
    score = torch.tensor([4.5, 3.0, 5.0, 1.0] * 4)
    return xq, xc, pa, pc, lvl, score


def _loss(w, xq, xc, pa, pc, lvl, score, qh, ch, gather=False):
    q, c = F.normalize(xq @ w, dim=-1), F.normalize(xc @ w, dim=-1)
    if gather:
        rank = dist.get_rank()
        qs, cs, ps = gather_sizes([q.size(0), c.size(0), pa.size(0)], q.device)
        pa, pc = gather_plain(pa + sum(qs[:rank]), ps), gather_plain(pc + sum(cs[:rank]), ps)
        lvl, score, qh, ch = gather_plain(lvl, ps), gather_plain(score, ps), gather_plain(qh, qs), gather_plain(ch, cs)
        q, c = gather_with_grad(q, qs), gather_with_grad(c, cs)
    torch.manual_seed(0)
    loss_fn = HMCLLoss(CFG, dim=4)
    total, _ = loss_fn(PairBatch(q, c, pa, pc, lvl, score, qh, ch))
    return total


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    xq, xc, pa, pc, lvl, score = _data()
    w = torch.nn.Parameter(torch.linspace(-1, 1, 24).view(6, 4))
    sl_q, sl_c, sl_p = slice(4 * rank, 4 * rank + 4), slice(8 * rank, 8 * rank + 8), slice(8 * rank, 8 * rank + 8)
    loss = _loss(w, xq[sl_q], xc[sl_c], pa[sl_p] - 4 * rank, pc[sl_p] - 8 * rank, lvl[sl_p], score[sl_p],
                 torch.arange(8)[sl_q], torch.arange(100, 116)[sl_c], gather=True)
    loss.backward()
    average_gradients([w])
    out[rank] = (loss.detach(), w.grad.clone())
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_doubled_batch():
    xq, xc, pa, pc, lvl, score = _data()
    w = torch.nn.Parameter(torch.linspace(-1, 1, 24).view(6, 4))
    ref = _loss(w, xq, xc, pa, pc, lvl, score, torch.arange(8), torch.arange(100, 116))
    ref.backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        loss, grad = out[rank]
        assert torch.allclose(loss, ref.detach(), atol=1e-6), rank
        assert torch.allclose(grad, w.grad, atol=1e-6), rank


def _unique_rows(limit: int = 48) -> list[dict]:
    import json

    from conftest import SAMPLE_TRAIN

    rows, seen = [], set()
    for line in SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines():
        ex = json.loads(line)
        if ex["pos"] and ex["pos"][0] not in seen and ex["query"] not in seen:
            seen.update((ex["pos"][0], ex["query"]))
            rows.append({"query": ex["query"], "pos": [ex["pos"][0]]})  # one candidate: no sampling
    return rows[:limit]


def _hmcl_train_command(folder, model_dir, batch: int, extra: dict, steps: int = 5, save_steps: int = 100,
                        resume: bool = False, prepare: bool = True, launch: tuple = ()) -> tuple[list, dict]:
    """Write the recipe and data of a run on the unique rows (and prepare it); the `hmcl train`
    command (with `accelerate launch` arguments ``launch``) and its environment."""
    import json
    import os
    import sys

    from conftest import write_recipe

    sections = {k: dict(v) for k, v in extra.items()}
    sections["train"] = {"max_steps": steps, "batch_size": batch, "group_size": 1, "eval_steps": 100,
                         "save_steps": save_steps, **sections.get("train", {})}
    recipe = write_recipe(folder, model_dir, **sections)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _unique_rows()), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if prepare:  # in this process: a subprocess would spend ~5 s importing transformers' tokenizer code
        from hmcl_cli.recipe import load_recipe
        from hmcl_cli.stages import run_prepare

        run_prepare(load_recipe(recipe), progress=False)
    args = [sys.executable, "-m", "hmcl_cli", "train", str(recipe)] + (["--resume"] if resume else [])
    if launch:
        args += ["--launcher", "accelerate", "--", *launch]
    return args, env


def _hmcl_train(folder, model_dir, procs: int, batch: int, extra: dict, steps: int = 5, save_steps: int = 100,
                resume: bool = False, prepare: bool = True) -> str:
    """Run `hmcl train` (under `accelerate launch` with 2 processes) on the unique rows; its output."""
    import subprocess

    launch = ("--num_processes", str(procs)) if procs > 1 else ()
    args, env = _hmcl_train_command(folder, model_dir, batch, extra, steps, save_steps, resume, prepare, launch)
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{procs} process(es) on cpu" in out.stdout + out.stderr
    return out.stdout + out.stderr


def _trained(folder) -> tuple[dict, list]:
    """A finished run's final weights and its logged losses."""
    import json

    from safetensors.torch import load_file

    losses = [r["loss"] for r in map(json.loads, (folder / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    weights = load_file(folder / "run" / "model" / "model.safetensors")
    for head in sorted((folder / "run" / "model").glob("*_Dense")):  # sentence-transformers layers after the pooling
        weights.update({f"{head.name}.{k}": v for k, v in load_file(head / "model.safetensors").items()})
    return weights, losses


CASES = {
    "plain": ("tiny_bert", {}),
    # segmented texts and the local term: segments are gathered across processes
    "segments-local": ("tiny_bert", {"model": {"segments": {"length": 16, "overlap": 2}}, "loss": {"local_weight": 0.5}}),
    # FSDP2: weights, gradients and AdamW state sharded over the 2 processes
    "fsdp": ("tiny_bert", {"train": {"fsdp": True}}),
    # a sentence-transformers Dense layer after the pooling: replicated beside the sharded backbone,
    # its gradients averaged, saved whole with the gathered model
    "fsdp-dense-head": ("tiny_bert_dense", {"train": {"fsdp": True}}),
    # FSDP2 with LoRA on a decoder: frozen base sharded, adapters replicated (no dropout: its masks
    # depend on how the batch is split); anchors and candidates in one (collective) forward call
    "fsdp-lora-qwen": ("tiny_qwen", {"train": {"fsdp": True, "one_forward": True},
                                     "model": {"lora": {"enabled": True, "dropout": 0.0}}}),
    # FSDP + GradCache: the processes hold different numbers of segments, hence of chunks, yet every
    # sharded forward/backward is collective
    "fsdp-gradcache-segments": ("tiny_bert", {"train": {"fsdp": True, "grad_cache_chunk": 3},
                                              "model": {"segments": {"length": 16, "overlap": 2}}}),
    # sibling projections joined (a GPU's model.fused_projections auto; true on this CPU): under
    # DDP on a decoder, and under FSDP2, whose gathered weights the join reads
    "joined-qwen": ("tiny_qwen", {"model": {"fused_projections": True}}),
    "fsdp-joined": ("tiny_bert", {"train": {"fsdp": True}, "model": {"fused_projections": True}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hmcl_train_with_two_processes_equals_one_process_with_doubled_batch(tmp_path, case, request):
    """`hmcl train --launcher accelerate -- --num_processes 2` on CPU (gloo) trains the same
    weights as one process whose batch holds both processes' anchors."""
    from safetensors.torch import load_file

    fixture, extra = CASES[case]
    model_dir = request.getfixturevalue(fixture)
    weights, losses = {}, {}
    for procs, batch in ((1, 8), (2, 4)):
        folder = tmp_path / f"p{procs}"
        out = _hmcl_train(folder, model_dir, procs, batch, extra)
        if procs > 1 and case.startswith("fsdp"):
            assert "fsdp: weights, gradients and optimizer state sharded over 2 processes" in out
        assert "forward calls unpadded" in out  # (a CPU: model.unpad auto), sharded too
        if extra.get("train", {}).get("one_forward"):
            assert "one forward call per step" in out
        assert ("train: projections:" in out) == ("fused_projections" in extra.get("model", {}))
        weights[procs], losses[procs] = _trained(folder)
    # float32 rounding of the loss (values near 70 here): relative 1e-6, or 2e-5 near zero, while
    # the weights are still those both runs started from; after a few AdamW steps the rounding of
    # near-zero gradients has grown (the tiny Qwen under DDP, joined or not, 42.3101 vs 42.3096 at
    # step 5, torch 2.14.1): relative 1e-4 there, the weights' own bound below
    assert losses[1][0] == pytest.approx(losses[2][0], rel=1e-6, abs=2e-5) and len(losses[1]) >= 2
    assert losses[1] == pytest.approx(losses[2], rel=1e-6 if not extra else 1e-4, abs=2e-5)
    base = load_file(model_dir / "model.safetensors")
    # AdamW (lr 1e-3) turns float rounding in near-zero gradients into differences far below one step
    tol = 2e-5 if not extra else 1e-4
    changed = 0
    assert set(weights[1]) == set(weights[2])
    for name, w1 in weights[1].items():
        w2 = weights[2][name]
        assert torch.allclose(w1, w2, atol=tol), (name, (w1 - w2).abs().max())
        key = name if name in base else name.removeprefix("bert.")
        changed += int(key in base and not torch.allclose(w1, base[key]))
    assert changed > 5  # training moved the weights, identically in both set-ups
    if fixture == "tiny_bert_dense":
        head = load_file(model_dir / "2_Dense" / "model.safetensors")["linear.weight"]
        assert weights[2]["2_Dense.linear.weight"].shape == (16, 32)
        assert not torch.allclose(weights[2]["2_Dense.linear.weight"], head)  # the head trained, alike


def test_two_machines_train_like_one_process_on_the_doubled_batch(tmp_path, tiny_bert):
    """Multi-node through accelerate's own arguments: `hmcl train ... --launcher accelerate --
    --num_processes 2 --num_machines 2 --machine_rank R --main_process_ip ... --main_process_port
    ...` started on two "machines" (two folders, each with its own prepared copy of the data, as
    on machines without a shared filesystem; localhost here) trains what one process does with
    both machines' anchors in its batch. Only machine 0 (rank 0) writes the run's outputs."""
    import subprocess

    port = _free_port()
    nodes = []
    for rank in (0, 1):
        launch = ("--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))
        args, env = _hmcl_train_command(tmp_path / f"machine{rank}", tiny_bert, 4, {}, launch=launch)
        nodes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert "2 process(es) on cpu" in outs[0] and "gathered across devices" in outs[0]
    assert not (tmp_path / "machine1" / "run" / "model").exists()
    _hmcl_train(tmp_path / "single", tiny_bert, 1, 8, {})
    (two, two_losses), (one, one_losses) = _trained(tmp_path / "machine0"), _trained(tmp_path / "single")
    assert two_losses == pytest.approx(one_losses, abs=2e-5) and len(one_losses) >= 2
    for name, w in one.items():
        assert torch.allclose(w, two[name], atol=2e-5), (name, (w - two[name]).abs().max())


def test_fsdp_resume_equals_uninterrupted_run(tmp_path, tiny_bert):
    """Sharded checkpoints hold whole tensors and re-shard on --resume: resuming from step 3 of a
    2-process FSDP run ends with the weights of the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "run"
    extra = {"train": {"fsdp": True}}
    _hmcl_train(folder, tiny_bert, 2, 4, extra, steps=6, save_steps=3)
    run = folder / "run"
    done = load_file(run / "model" / "model.safetensors")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    assert "exp_avg" in str(torch.load(run / "checkpoints" / "step-0000003" / "optim.pt", weights_only=False)["optimizer"]["state"][0])
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    shutil.rmtree(run / "model")
    # resumed with a checkpoint at each step by train.save_minutes (the main process's clock, which
    # both follow: under FSDP they write each checkpoint together)
    timed = {"train": {"fsdp": True, "log_steps": 1, "save_minutes": 1e-6, "keep_last": 5}}
    out = _hmcl_train(folder, tiny_bert, 2, 4, timed, steps=6, save_steps=3, resume=True, prepare=False)
    assert "resumed from" in out and "(step 3)" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-000000{i}" for i in (3, 4, 5, 6)]
    again = load_file(run / "model" / "model.safetensors")
    for name, w in done.items():
        assert torch.allclose(w, again[name], atol=1e-6), name


def test_accelerate_deepspeed_config_is_refused_and_fsdp_config_turns_on_sharding():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hmcl_cli.errors import RecipeError
    from hmcl_cli.training.trainer import _check_distributed_setup

    def acc(kind):
        return SimpleNamespace(num_processes=1, distributed_type=kind)

    with pytest.raises(RecipeError, match="DeepSpeed") as e:
        _check_distributed_setup(acc(DistributedType.DEEPSPEED))
    assert "train.fsdp" in e.value.hint
    assert _check_distributed_setup(acc(DistributedType.FSDP)) is True
    assert _check_distributed_setup(acc(DistributedType.NO)) is False


@pytest.mark.parametrize("main", [True, False])
def test_every_process_ends_the_process_group_together(tmp_path, tiny_bert, main):
    """accelerate's end_training destroys the process group: every process must call it, after
    waiting for the others (the main one alone tore the group down under its peers)."""
    from types import SimpleNamespace

    from conftest import make_trainer

    t = make_trainer(tmp_path, tiny_bert)
    calls = []
    t.accelerator = SimpleNamespace(num_processes=2, wait_for_everyone=lambda: calls.append("wait"),
                                    end_training=lambda: calls.append("end"))
    t.is_main = main
    final = t.save_final()
    assert calls == ["wait", "end"]
    assert (final / "model.safetensors").is_file() == main  # only the main process writes the model


DEFAULTS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # (else accelerate warns)


@pytest.mark.parametrize("launcher_args, config, expected", [
    ([], None, ["--num_processes", "4", "--multi_gpu", *DEFAULTS]),  # every GPU here
    # several machines: accelerate counts all their processes
    (["--num_machines", "2", "--machine_rank", "1"], None,
     ["--num_processes", "8", "--multi_gpu", *DEFAULTS[2:], "--num_machines", "2", "--machine_rank", "1"]),
    (["--num_machines=3"], None, ["--num_processes", "12", "--multi_gpu", *DEFAULTS[2:], "--num_machines=3"]),
    (["--num_processes=2"], None, ["--multi_gpu", *DEFAULTS, "--num_processes=2"]),  # the user's count is kept
    (["--num_processes", "1"], None, [*DEFAULTS, "--num_processes", "1"]),  # one process: no multi-GPU mode
    (["--num_processes=x"], None, [*DEFAULTS, "--num_processes=x"]),  # not a number: kept, for accelerate to report
    (["--cpu", "--mixed_precision=bf16"], None, ["--num_processes", "4", "--num_machines", "1", "--dynamo_backend", "no",
                                                 "--cpu", "--mixed_precision=bf16"]),  # the user's mode and values are kept
    ([], "acc.yaml", ["--config_file", "acc.yaml"]),  # the config file says it all
    # a config file among the user's arguments says it all too: no count or default of ours overrides it
    # (the process count of this machine's GPUs did, a 2-machine config's 16 processes becoming 4)
    (["--config_file", "two-nodes.yaml"], None, ["--config_file", "two-nodes.yaml"]),
])
def test_relaunch_command_passes_accelerate_the_process_count_of_all_machines(launcher_args, config, expected,
                                                                             monkeypatch):
    import hmcl_cli.stages
    from hmcl_cli.stages import relaunch_command

    monkeypatch.setattr(hmcl_cli.stages, "accelerate_default_config", lambda: False)  # (this machine's own aside)

    cmd = relaunch_command("r.yaml", ["train.epochs=2"], False, launcher_args, config, 4)
    launch = cmd.index("accelerate.commands.launch")
    assert cmd.count("--quiet") == 1  # a failed child's error is the child's own, without the launcher's traceback
    cmd.remove("--quiet")
    assert cmd[launch + 1:] == [*expected, "-m", "hmcl_cli", "train", "r.yaml", "--set", "train.epochs=2"]
    debug = relaunch_command("r.yaml", [], False, launcher_args, config, 4, debug=True)
    assert "--quiet" not in debug and debug[-4:] == ["hmcl_cli", "--debug", "train", "r.yaml"]
    assert "--quiet" not in relaunch_command("r.yaml", [], False, [*launcher_args, "--debug"], config, 4)
    # `accelerate config` left a default config, which accelerate reads: it is not overridden either
    monkeypatch.setattr(hmcl_cli.stages, "accelerate_default_config", lambda: True)
    assert not {"--mixed_precision", "--dynamo_backend"} & set(relaunch_command("r.yaml", [], False, launcher_args, config, 4))
    # and where hmcl's process count overrides the one it may hold, the relaunch says so
    note = hmcl_cli.stages.default_config_note(launcher_args, config, 4)
    overridden = "--num_processes" in expected[:1]
    assert bool(note) == overridden
    if overridden:
        assert f"the process count is hmcl's: {expected[1]} (every GPU here" in note


def _diverging_worker(rank, port, recipe_path, out):
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    from hmcl_cli.errors import TrainingDivergedError
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    t = HMCLTrainer(load_recipe(recipe_path))
    t.setup()
    forward, calls = t.loss_fn.forward, []

    def poisoned(batch):  # the second process's loss alone turns NaN at step 4, a log step
        total, parts = forward(batch)
        calls.append(1)
        return (total * float("nan") if rank == 1 and len(calls) == 4 else total), parts

    t.loss_fn.forward = poisoned
    try:
        t.train()
        out[rank] = "finished"
    except TrainingDivergedError as e:
        out[rank] = str(e)


def _late_signal_worker(rank, port, recipe_path, out):
    import os
    import signal

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    from hmcl_cli.errors import HmclError
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    t = HMCLTrainer(load_recipe(recipe_path))
    t.setup()
    all_reduce, agreements = dist.all_reduce, []

    def signal_after_the_third_agreement(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
        work = all_reduce(tensor, op=op, group=group, **kw)
        if group is t._cpu_group and op == dist.ReduceOp.MAX:  # the stop agreement
            agreements.append(1)
            if rank == 1 and len(agreements) == 3:
                t._stop_signal = signal.SIGINT  # a Ctrl-C whose handler ran just after the all-reduce
        return work

    dist.all_reduce = signal_after_the_third_agreement
    try:
        t.train()
        out[rank] = "finished"
    except HmclError as e:
        out[rank] = str(e)


def test_a_signal_landing_after_the_stop_agreement_stops_every_process_a_step_later(tmp_path, tiny_bert):
    """A signal whose handler ran just after a step's stop agreement (any time can be that time)
    stopped its process alone at that step: it had agreed with the others not to stop and then
    read its own flag. Under FSDP it gathered its shards for the checkpoint while the main
    process gathered them for the next step's forward ("Received data size doesn't match expected
    size"). The reduced flag decides now, and the signal counts at the next step's agreement."""
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_prepare

    from conftest import write_recipe

    recipe_path = write_recipe(tmp_path, tiny_bert, train={"max_steps": 8, "log_steps": 1, "save_steps": 100,
                                                           "eval_steps": 100, "fsdp": True})
    run_prepare(load_recipe(recipe_path), progress=False)
    out = mp.Manager().dict()
    ctx = mp.spawn(_late_signal_worker, args=(_free_port(), str(recipe_path), out), nprocs=2, join=False)
    deadline = __import__("time").time() + 240
    try:
        while not ctx.join(timeout=1):
            assert __import__("time").time() < deadline, f"a process did not stop: {dict(out)}"
    finally:
        for p in ctx.processes:
            p.kill()
    for rank in (0, 1):
        assert "training stopped by signal 2 at step 4; checkpoint saved" in out.get(rank, ""), (rank, dict(out))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000004"]


def test_a_loss_nan_in_one_process_stops_every_process_at_the_same_step(tmp_path, tiny_bert):
    """One process's loss turned NaN at a log step (the others' a step later, once the averaged
    gradients made their weights NaN): it stopped alone and the main process trained on, waiting in
    the next step's collective. The first bad step of any process now stops all, and the main
    process saves the diverged state."""
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_prepare

    from conftest import write_recipe

    recipe_path = write_recipe(tmp_path, tiny_bert, train={"max_steps": 8, "log_steps": 4, "save_steps": 2,
                                                           "eval_steps": 100, "keep_last": 5})
    run_prepare(load_recipe(recipe_path), progress=False)
    out = mp.Manager().dict()
    ctx = mp.spawn(_diverging_worker, args=(_free_port(), str(recipe_path), out), nprocs=2, join=False)
    deadline = __import__("time").time() + 240
    while not ctx.join(timeout=1):
        assert __import__("time").time() < deadline, f"a process did not stop: {dict(out)}"
    for rank in (0, 1):
        assert "NaN/inf at step 4" in out[rank] and "last good checkpoint: step-0000002" in out[rank], (rank, dict(out))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["diverged", "step-0000002"]
