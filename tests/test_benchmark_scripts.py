"""The GPU device kit's benchmark commands (benchmarks/device/run.sh) with the same flags at the
smallest shapes on the CPU: a device call must not be spent on a script that breaks before its
first row (long_text_throughput.py once did, on an option train_throughput.py had added)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_minilm, needs_shared

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [needs_shared, needs_minilm]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_training_throughput_every_tool_and_flag_of_the_speed_part():
    out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro", "--steps", "1", "--warmup", "1",
               "--batch-size", "4", "--tools", "st,hmcl,hmcl-unpad,hmcl-padded,hmcl-2fwd,hmcl-2d-mask,hmcl-cudnn,"
               "hmcl-per-tensor-adamw",
               "--sdpa", "no-cudnn",
               "--sync-audit", "--precision", "fp16")  # (fp16: the fp16 part's flag; a CPU runs fp32)
    results = [line.split(":")[0] for line in out.splitlines() if line.startswith("result ")]
    assert results == ["result sentence-transformers loop", "result hmcl train", "result hmcl train, unpadded",
                       "result hmcl train, padded", "result hmcl train, two forwards",
                       "result hmcl train, 2D mask", "result hmcl train, cuDNN attention",
                       "result hmcl train, per-tensor AdamW"]
    audits = [float(line.split("),")[1].split()[0]) for line in out.splitlines() if line.startswith("host syncs seen")]
    assert len(audits) == 7  # the audit of each hmcl tool
    assert audits[6] > audits[0]  # the per-tensor AdamW reads each parameter's step count: the patch took
    assert out.count("vs ST: samples") == 8


def test_training_throughput_decoder_lora_checkpointing_of_the_scale_part():
    out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro-qwen3", "--lora", "--checkpointing",
               "--batch-size", "4", "--tools", "hmcl", "--steps", "1", "--warmup", "1")
    assert "result hmcl train" in out and "LoRA, checkpointing" in out


def test_training_throughput_compiled_of_the_compile_part():
    out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro", "--steps", "1", "--warmup", "1",
               "--batch-size", "4", "--tools", "st,hmcl,hmcl-unfused-proj,hmcl-graphs,hmcl-compiled")
    results = [line.split(":")[0] for line in out.splitlines() if line.startswith("result ")]
    assert results == ["result sentence-transformers loop", "result hmcl train", "result hmcl train, unfused projections",
                       "result hmcl train, CUDA graphs", "result hmcl train, compiled"]
    assert out.count("layers compiled on first use") == 2  # the two compiled rows, not the plain one
    assert "forward calls padded (model.unpad false)" in out  # the graphs' row: a fixed width per graph
    assert "input shapes in" in out.split("result hmcl train, CUDA graphs")[0].split("result hmcl train, unfused")[1]


def test_unpad_probe_of_the_probe_part():
    out = _run("unpad_probe.py", "--shapes", "minilm,micro,micro-qwen3", "--lora")
    lines = [line for line in out.splitlines() if " on cpu: " in line]
    assert [line.split()[:2] for line in lines] == [["minilm", "float32"], ["micro", "float32"],
                                                     ["micro-qwen3", "float32"], ["micro-qwen3", "bfloat16"]]
    assert all(line.endswith(": unpadded") for line in lines)  # on a CPU each of these passes the probe
    # the sizes behind each decision; a wrong pattern (the padding attended) moves the decoder far more
    sizes = [[float(x.split("%")[0]) for x in line.split(" vs padded ")[1].split(", padded vs alone ")] +
             [float(line.split("padding attended ")[1].split("%")[0])] for line in lines]
    assert sizes[2][:2] == [0.0, 0.0] and sizes[2][2] > 10 and sizes[3][2] > 10 * max(sizes[3][0], 0.1)


def test_encoding_throughput_with_the_flags_of_the_encode_part():
    out = _run("encode_throughput.py", "--shape", "micro", "--texts", "300", "--warmup", "50", "--batch-size", "64",
               "--big-batch", "128", "--graphs-off", "--padded", "--two-d-mask", "--cudnn-attention", "--pageable",
               "--sync-audit")
    results = [line.split(":")[0] for line in out.splitlines() if line.startswith("result ")]
    assert results == ["result sentence-transformers (fp32 weights)", "result hmcl encode", "result hmcl encode, batch 128",
                       "result hmcl encode, no CUDA graphs", "result hmcl encode, pageable batches", "result hmcl encode, 2D mask",
                       "result hmcl encode, padded", "result hmcl encode, unpad true",
                       "result hmcl encode, cuDNN attention"]
    assert "0.0 per batch" in out  # the sync audit's line


def test_long_text_throughput_of_the_long_part():
    out = _run("long_text_throughput.py", "--shape", "micro", "--length", "64", "--segment", "32", "--overlap", "4",
               "--docs", "8", "--batch-size", "2", "--steps", "1", "--warmup", "1")
    for part in ("encode", "train"):
        assert f"{part:<7} segments off" in out and f"{part:<7} segments 32/4" in out


def test_timed_steps_run_warm_batches_and_write_no_checkpoint(tmp_path, monkeypatch):
    """Both tools time batches they ran once untimed just before, and hmcl's timed steps write no
    checkpoint (the last step's checkpoint write once stood in the H200's rows: BERT-base 0.56x
    the loop, ~2 s of ~3.7 s)."""
    import argparse

    import torch
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import train_throughput as tt

    from hmcl_cli.training.trainer import HMCLTrainer

    path = tt.build_model("micro", tmp_path / "model")
    rows, group, q_len, d_len = tt.examples("stsb")
    args = argparse.Namespace(batch_size=4, steps=2, warmup=1, lr=2e-5, warm_shapes=True, op_count=False,
                              precision="bf16")
    device = torch.device("cpu")

    seen, saves = [], []
    real_fb, real_save = HMCLTrainer._forward_backward, HMCLTrainer.save_checkpoint
    monkeypatch.setattr(HMCLTrainer, "_forward_backward",
                        lambda self, batch, scale: seen.append((batch["q_input_ids"].tolist(), batch["c_input_ids"].tolist())) or real_fb(self, batch, scale))
    monkeypatch.setattr(HMCLTrainer, "save_checkpoint",
                        lambda self, *a, **k: saves.append(self.step) or real_save(self, *a, **k))
    out = tt.run_hmcl(path, rows[:64], group, q_len, d_len, args, device, tmp_path / "hmcl")
    assert len(seen) == 1 + 2 + 2 and seen[3:] == seen[1:3]  # warm-up, timed batches untimed, timed
    assert saves == [1]  # the warm-up run's last step only
    assert out["samples_per_s"] > 0

    texts = []
    real_pre = SentenceTransformer.preprocess
    monkeypatch.setattr(SentenceTransformer, "preprocess", lambda self, t, *a, **k: texts.append(list(t)) or real_pre(self, t, *a, **k))
    tt.run_st(path, rows[:64], group, q_len, d_len, args, device)
    assert len(texts) == 2 * 5 and texts[6:] == texts[2:6]  # (anchors, candidates) per step

    args.warm_shapes = False
    seen.clear()
    tt.run_hmcl(path, rows[:64], group, q_len, d_len, args, device, tmp_path / "hmcl-cold")
    assert len(seen) == 3


def test_profile_part_tables_carry_hmcls_ranges():
    """The profile part's tables name hmcl's own ranges (the parts of a step, of an encode)."""
    out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro", "--steps", "2", "--warmup", "1",
               "--batch-size", "4", "--tools", "hmcl", "--profile")
    ranges = out.split("hmcl's ranges")[1]
    for name in ("hmcl.collate", "hmcl.to_device", "hmcl.forward", "hmcl.loss", "hmcl.backward", "hmcl.optimizer_step"):
        assert f"  {name} " in ranges, name
    out = _run("encode_throughput.py", "--shape", "micro", "--texts", "300", "--warmup", "50", "--profile")
    hmcl_part, st_part = out.split("profile: hmcl encode")[1].split("profile: sentence-transformers encode")
    for name in ("hmcl.tokenize", "hmcl.pad", "hmcl.encode_batch"):
        assert f"  {name} " in hmcl_part.split("hmcl's ranges")[1] and name not in st_part, name


def test_an_experimental_row_that_fails_leaves_the_rows_after_it(monkeypatch, capsys):
    """A device call must not lose its other rows to a row never run on a GPU (CUDA graphs): the
    failure is printed and the next tool still runs; a failure of an established row still stops."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput

    real = train_throughput.run_hmcl

    def broken(*args, train_extra=None, **kwargs):
        if train_extra == {"compile": "cuda-graphs"}:
            raise RuntimeError("capture failed")
        return real(*args, train_extra=train_extra, **kwargs)

    monkeypatch.setattr(train_throughput, "run_hmcl", broken)
    argv = ["train_throughput.py", "--data", "stsb", "--shape", "micro", "--steps", "1", "--warmup", "1",
            "--batch-size", "4", "--tools", "hmcl-graphs,hmcl"]
    monkeypatch.setattr(sys, "argv", argv)
    train_throughput.main()
    out = capsys.readouterr().out
    assert "result hmcl train, CUDA graphs: failed" in out and "result hmcl train: {" in out
    monkeypatch.setattr(train_throughput, "EXPERIMENTAL_TOOLS", set())
    with pytest.raises(RuntimeError, match="capture failed"):
        train_throughput.main()


def test_long_text_quality_cut_off_by_its_limit_says_where_each_run_got_and_leaves_none_running(tmp_path):
    """The longq part ran past its limit on the H200 and printed nothing of its 12 runs: each run's
    output now goes to <out>/<row>.<seed>.log, and a SIGINT (run.sh's limit) prints where each run
    had got to and stops it."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "long_text_quality.py"), "--rows", "whole,seg",
                             "--seeds", "1", "--jobs", "1", "--out", str(tmp_path)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "whole.1.log"
    deadline = time.time() + 300
    while time.time() < deadline and "train:" not in (log.read_text() if log.is_file() else ""):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "whole.1: stopped after" in out and "its log ended: " in out and "train" in out.split("its log ended: ")[1]
    assert "interrupted: 1 runs stopped" in out and "| row | trecqa-dev | stsb-dev | seeds |" in out
    assert not (tmp_path / "seg.1.log").exists()  # one job at a time: the second never started
    left = subprocess.run(["pgrep", "-f", f"--out {tmp_path}"], capture_output=True, text=True).stdout.split()
    assert left == [], "a run was left running"


def test_projection_ops_counts_fewer_operations_joined():
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput as tt

    # the decoder's count needs the stand-in for the fused RMSNorm kernel (torch >= 2.10)
    shapes = ["micro", "micro-qwen3"] if tt.has_fused_norm_decomposition() else ["micro"]
    out = _run("projection_ops.py", "--shapes", ",".join(shapes), "--batch", "4")
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 2 * len(shapes)  # float32 and bf16 autocast
    assert all(r["fused"] < r["plain"] and r["groups"] > 0 for r in rows.values())


def test_training_throughput_hmcl_loss_settings_reach_the_loss():
    import json

    def ops(*extra: str) -> float:
        out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro", "--steps", "1", "--warmup", "1",
                   "--batch-size", "4", "--tools", "hmcl", "--op-count", *extra)
        return json.loads(out.strip().splitlines()[-1])["results"]["hmcl train"]["ops"]["total"]

    # one matryoshka size adds its cut's terms (the loop's loss alone otherwise)
    assert ops("--hmcl-loss", "matryoshka_dims=[16]") > ops()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--hmcl-loss", "matryoshka"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "expected KEY=VALUE" in bad.stdout + bad.stderr


def test_graph_shapes_counts_fewer_shapes_bucketed():
    """benchmarks/graph_shapes.py: the forward calls' distinct shapes as the batches are and as
    train.compile cuda-graphs pads them; bucketing can only merge shapes, and costs slots."""
    import json

    out = _run("graph_shapes.py", "--recipes", "quickstart,trecqa", "--epochs", "2", "--set", "seed=3")
    results = json.loads(out.strip().splitlines()[-1])["results"]
    assert [r["recipe"] for r in results] == ["quickstart", "trecqa"]
    for r in results:
        assert r["forward_calls"] >= r["steps"] > 0
        assert 0 < r["shapes"]["bucketed"] < r["shapes"]["as is"]
        assert sum(r["new_per_epoch"]["as is"]) == r["shapes"]["as is"] and len(r["new_per_epoch"]["as is"]) == 2
        assert 1.0 < r["token_slots_ratio"] < 1.2
    assert "| quickstart |" in out


def test_op_count_with_gpu_kernels():
    """--gpu-kernels: attention and dropout counted as the GPU's one kernel forward and one backward,
    instead of the CPU's own computation (packed attention padded: rows scattered and gathered)."""
    import json

    totals = []
    for extra in ([], ["--gpu-kernels"]):
        out = _run("train_throughput.py", "--data", "stsb", "--shape", "micro-qwen3", "--batch-size", "4", "--steps", "1",
                   "--warmup", "1", "--tools", "hmcl-gpu-defaults", "--op-count", *extra)
        totals.append(json.loads(out.strip().splitlines()[-1])["results"]["hmcl train, one forward, fused projections"]["ops"]["total"])
    assert totals[1] < totals[0] - 5, totals  # per layer: 3 scatters of q/k/v and a gather, and their backward


def _bench_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput
    finally:
        sys.path.pop(0)
    return train_throughput


@pytest.mark.parametrize("case", ["masked", "causal-gqa"])
def test_gpu_kernel_stand_ins_compute_attention_and_count_one_operation_each_way(case):
    tt = _bench_module()
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    heads = 2 if case == "causal-gqa" else 4
    k, v = (torch.randn(2, heads, 6, 8, requires_grad=True) for _ in range(2))
    mask = None
    if case == "masked":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False  # the second text's last two tokens are padding
    options = {"attn_mask": mask, "is_causal": case != "masked", "enable_gqa": heads != 4, "scale": 0.3}
    grad = torch.randn(2, 4, 6, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    with tt.OpCounter() as counter:
        out = tt._sdpa_stand_in(q, k, v, **options)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert dict(counter.counts) == {"scaled_dot_product_attention": 1, "scaled_dot_product_attention_backward": 1}
    assert out.transpose(1, 2).is_contiguous()  # laid out as a GPU's kernels write it
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
    # dropout: the forward's kept weights are the backward's (gradients of a fixed function)
    with tt.OpCounter() as counter:
        dropped = tt._sdpa_stand_in(q, k, v, **options, dropout_p=0.5)
        dq = torch.autograd.grad(dropped, q, grad)[0]
    assert sum(counter.counts.values()) == 2 and not torch.allclose(dropped, ref, atol=1e-3)
    assert torch.isfinite(dq).all()


def test_varlen_stand_in_attends_within_each_text():
    tt = _bench_module()
    torch.manual_seed(0)
    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 4, 8, requires_grad=True) for _ in range(3))
    grad = torch.randn(10, 4, 8)
    with tt.OpCounter() as counter:
        out = tt._varlen_stand_in(q, k, v, cu, cu, 5, 5, scale=None, window_size=(-1, 0))
        torch.autograd.grad(out, (q, k, v), grad)
    assert dict(counter.counts) == {"varlen_attn": 1, "varlen_attn_backward": 1}
    start = 0
    for n in lengths:  # each text alone, causal
        part = [x[start:start + n].transpose(0, 1) for x in (q, k, v)]
        alone = torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True).transpose(0, 1)
        assert torch.allclose(out[start:start + n], alone, atol=1e-5)
        start += n


def test_native_dropout_stand_in_is_one_operation_each_way():
    tt = _bench_module()
    x = torch.randn(64, 32, requires_grad=True)
    grad = torch.ones(64, 32)
    with tt.OpCounter() as counter:
        y = tt._native_dropout(x, 0.25, training=True)
        torch.autograd.grad(y, x, grad)
    assert dict(counter.counts) == {"native_dropout": 1, "native_dropout_backward": 1}
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75) and 0.6 < float(kept.float().mean()) < 0.9
    assert tt._native_dropout(x, 0.25, training=False) is x
