"""Fused RMSNorm layers (model.fused_norms; hmcl_cli/modeling/fused_norms.py).

On a CPU ``F.rms_norm`` computes what transformers' RMSNorm code computes, in the same order: the
float32 outputs and gradients must be bit-identical. What fusion saves (one operation forward and
one backward per norm) shows where PyTorch has the fused kernel — a GPU (the test marked for a
CUDA device, run by benchmarks/device/run.sh gputests) — or on a CPU with the benchmark's stand-in
kernels (a subprocess: they change every later ``F.rms_norm`` of the process)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hmcl_cli.modeling import fused_norms
from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.fused_norms import fuse_rms_norms, fused_count, probe_refusal, unfuse_rms_norms
from hmcl_cli.modeling.fused_rotary import fused_rotary_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_throughput as tt  # noqa: E402
TEXTS = ["where is my order", "a refund takes five days", "how long does shipping take to reach me", "ok"]
NORMS_PER_LAYER = {"qwen3": 4, "llama": 2}  # Qwen3: before attention and MLP, on queries and keys


def _embed_and_grads(model: EmbeddingModel):
    model.train()
    model.zero_grad(set_to_none=True)
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    emb = model(batch["input_ids"], batch["attention_mask"])
    (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
    return emb.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_fused_norms_are_bit_identical_on_cpu(kind, tiny_qwen, tiny_llama):
    folder = tiny_qwen if kind == "qwen3" else tiny_llama
    fused = EmbeddingModel.load(str(folder))
    plain = EmbeddingModel.load(str(folder), fused_norms=False)
    layers = fused.backbone.config.num_hidden_layers
    assert fused_count(fused.backbone) == layers * NORMS_PER_LAYER[kind] + 1  # + the final norm
    assert fused.norm_fusion.fused == fused_count(fused.backbone) and fused_count(plain.backbone) == 0
    a, b = _embed_and_grads(fused), _embed_and_grads(plain)
    assert torch.equal(a[0], b[0])
    assert len(a[1]) == len(b[1]) > 0 and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert list(fused.state_dict()) == list(plain.state_dict())  # names and saving unchanged


def test_every_norm_calls_rms_norm_once_and_survives_mode_switches(tiny_qwen, monkeypatch):
    """transformers >= 5.2x re-applies hub kernels at each train()/eval(), deleting a forward set
    on an instance: the fused forward must still run after the switches."""
    model = EmbeddingModel.load(str(tiny_qwen))
    calls = []
    real = fused_norms.F.rms_norm
    monkeypatch.setattr(fused_norms.F, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        model.train()
        model.eval()
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])  # the first call runs the mask probes too
        calls.clear()
        model(batch["input_ids"], batch["attention_mask"])
    assert len(calls) == fused_count(model.backbone) > 0


def test_bf16_weights_within_a_rounding(tiny_qwen):
    """bf16 input and weight: the fused norm rounds once where transformers' code rounds twice."""
    fused = EmbeddingModel.load(str(tiny_qwen), dtype=torch.bfloat16)
    plain = EmbeddingModel.load(str(tiny_qwen), dtype=torch.bfloat16, fused_norms=False)
    batch = fused.pad([fused.tokenize([t])[0] for t in TEXTS])
    with torch.no_grad():
        a = fused(batch["input_ids"], batch["attention_mask"])
        b = plain(batch["input_ids"], batch["attention_mask"])
    assert fused_count(fused.backbone) > 0
    assert torch.nn.functional.cosine_similarity(a.float(), b.float()).min() > 0.999


def test_recipe_key_turns_fusion_off_and_on(tiny_qwen, tmp_path):
    from hmcl_cli.recipe import load_recipe

    model = EmbeddingModel.load(str(tiny_qwen))
    kinds = {type(m) for m in model.backbone.modules() if type(m).__name__.endswith("RMSNorm")}
    assert all(k.__name__.startswith("Fused") for k in kinds)
    cfg = load_recipe(data={"name": "x", "model": {"name_or_path": str(tiny_qwen), "fused_norms": False}}).model
    model.apply_run_settings(cfg)
    assert fused_count(model.backbone) == 0
    assert {type(m).__name__ for m in model.backbone.modules() if type(m).__name__.endswith("RMSNorm")} == {"Qwen3RMSNorm"}
    model.set_fused_norms(True)
    assert fused_count(model.backbone) == model.norm_fusion.fused > 0
    assert unfuse_rms_norms(model.backbone) == model.norm_fusion.fused


class _Norm(nn.Module):
    """A weight of ones and an epsilon: what every stand-in norm below holds."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def normed(self, x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class OffsetRMSNorm(_Norm):
    """Gemma's RMSNorm: scaled by 1 + weight (weights stored around 0)."""

    def forward(self, x):
        return (self.normed(x) * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(_Norm):
    def forward(self, x, gate=None):
        return x


class InputDtypeRMSNorm(_Norm):
    """OLMo-2's: the weight multiplies in float32, the output in the input's dtype."""

    def forward(self, x):
        return (self.weight * self.normed(x)).to(x.dtype)


class PlainRMSNorm(_Norm):
    """Llama's RMSNorm, written out."""

    def forward(self, hidden_states):
        return self.weight * self.normed(hidden_states).to(hidden_states.dtype)


def test_probe_keeps_what_is_not_rmsnorm():
    net = nn.ModuleList([OffsetRMSNorm(16), GatedRMSNorm(16), InputDtypeRMSNorm(16), PlainRMSNorm(16), PlainRMSNorm(16),
                         nn.RMSNorm(16)])
    report = fuse_rms_norms(net)
    assert report.fused == 2 and fused_count(net) == 2
    assert [type(m).__name__ for m in net] == ["OffsetRMSNorm", "GatedRMSNorm", "InputDtypeRMSNorm", "FusedPlainRMSNorm",
                                               "FusedPlainRMSNorm", "RMSNorm"]
    assert "differs" in report.refused["OffsetRMSNorm"]
    assert "more than one tensor" in report.refused["GatedRMSNorm"]
    assert "output dtype" in report.refused["InputDtypeRMSNorm"]
    assert "kept its own forward" in report.summary() and "2 RMSNorm layers fused" in report.summary()
    assert probe_refusal(PlainRMSNorm(8)) == ""
    x = torch.randn(2, 3, 16)
    assert torch.equal(net[3](x), PlainRMSNorm.forward(net[3], x))
    assert fuse_rms_norms(net).fused == 2 and fused_count(net) == 2  # idempotent


def test_onnx_export_traces_the_models_own_norms_and_rotary(monkeypatch, tiny_qwen):
    """Export loads without fusion (norms, rotary): its graph is traced on the CPU, as the model's
    own code writes it."""
    from hmcl_cli.export import onnx

    seen = {}
    real = EmbeddingModel.load

    def load(*a, **k):
        model = real(*a, **k)
        seen["fused"] = fused_count(model.backbone) + fused_rotary_count(model.backbone)
        raise RuntimeError("stop here")

    monkeypatch.setattr(EmbeddingModel, "load", load)
    monkeypatch.setattr(onnx, "require_onnx", lambda: None)
    with pytest.raises(RuntimeError, match="stop here"):
        onnx.export_onnx(tiny_qwen, Path("unused.onnx"))
    assert seen == {"fused": 0}


@pytest.mark.skipif(not tt.has_fused_norm_decomposition(),
                    reason="the benchmark's CPU stand-in for the fused kernel needs its decomposition (torch >= 2.10)")
def test_fused_norms_cut_a_steps_operations_as_a_gpu_runs_them(tiny_qwen):
    """With the benchmark's CPU stand-ins for PyTorch's fused kernel, each norm is one operation
    forward and one backward: the step's ATen operations fall by ~20 a norm."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
import train_throughput as tt
from test_fused_norms import _embed_and_grads
from hmcl_cli.modeling.encoder import EmbeddingModel
tt.gpu_norm_kernels_on_cpu()
for autocast in (False, True):
    for fused in (True, False):
        model = EmbeddingModel.load({str(tiny_qwen)!r}, fused_norms=fused)
        _embed_and_grads(model)  # the first call runs the mask probes too
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), tt.OpCounter() as ops:
            _embed_and_grads(model)
        print(int(autocast), int(fused), sum(ops.counts.values()), ops.counts["_fused_rms_norm"],
              ops.counts["_fused_rms_norm_backward"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {(int(a), int(f)): (int(total), int(fw), int(bw))
            for a, f, total, fw, bw in (line.split() for line in out.stdout.split("\n") if line[:4] in ("0 0 ", "0 1 ", "1 0 ", "1 1 "))}
    norms = 2 * NORMS_PER_LAYER["qwen3"] + 1
    for autocast in (0, 1):  # float32, and bf16 autocast (the q/k norms then get bf16 input and float32 weights)
        assert rows[autocast, 1][1:] == (norms, norms) and rows[autocast, 0][1:] == (0, 0), rows
        assert rows[autocast, 0][0] - rows[autocast, 1][0] >= 15 * norms, rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/device/run.sh gputests)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # full fine-tuning's weights; LoRA's frozen base
def test_cuda_fused_norms_run_the_fused_kernel(tiny_qwen, dtype):
    """On a GPU: the fused kernel takes every norm under bf16 autocast, with fewer operations in
    all, and the embeddings and gradients agree with the model's own norms."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import OpCounter

    results = {}
    for fused in (True, False):
        model = EmbeddingModel.load(str(tiny_qwen), fused_norms=fused, dtype=dtype).cuda()
        model.train()
        batch = {k: v.cuda() for k, v in model.pad([model.tokenize([t])[0] for t in TEXTS]).items()
                 if k in ("input_ids", "attention_mask")}
        for counted in (False, True):  # the first call runs the mask probes too
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16), OpCounter() as ops:
                emb = model(batch["input_ids"], batch["attention_mask"])
                (emb.float() * torch.linspace(-1, 1, emb.shape[1], device="cuda")).sum().backward()
        results[fused] = (emb.detach().float(), [p.grad.float() for p in model.parameters() if p.grad is not None],
                          sum(ops.counts.values()), ops.counts["_fused_rms_norm"])
    norms = fused_count(EmbeddingModel.load(str(tiny_qwen)).backbone)
    assert results[True][3] == norms and results[False][3] == 0
    assert results[True][2] < results[False][2] - 10 * norms
    assert torch.nn.functional.cosine_similarity(results[True][0], results[False][0]).min() > 0.999
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_a_fused_backbone_pickles_and_copies_fused(tiny_qwen):
    """The fused classes (norms; rotary handles, modeling/fused_rotary.py) are made at run time:
    pickle (a DataLoader worker started by spawn gets the model pickled) and deepcopy (merged
    export) must still give fused norms and rotary (where this transformers has rotary handles:
    tests/test_fused_rotary.py), same output."""
    import copy
    import pickle

    from conftest import has_rotary_handles

    model = EmbeddingModel.load(str(tiny_qwen))
    rotary = model.backbone.config.num_hidden_layers if has_rotary_handles() else 0
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    backbone = model.backbone.eval()
    with torch.no_grad():
        want = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for other in (pickle.loads(pickle.dumps(backbone)), copy.deepcopy(backbone)):
            assert fused_count(other) == fused_count(backbone) > 0
            assert fused_rotary_count(other) == fused_rotary_count(backbone) == rotary
            got = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            assert torch.equal(got, want)
