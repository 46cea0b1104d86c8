"""Rotary embeddings with queries and keys rotated together (model.fused_rotary;
hmcl_cli/modeling/fused_rotary.py).

The fused rotation meets each element with the same float operations in the same order as
transformers' code, so outputs and gradients must be bit-identical, in float32 and in bf16; what it
saves is operations (counted with the benchmark's counter: ATen operations, views left out)."""

import sys
from pathlib import Path

import pytest
import torch

from hmcl_cli.modeling import fused_rotary
from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.fused_rotary import (fuse_rotary, fused_forward, fused_rotary_count, probe_refusal, signed_sine,
                                            unfuse_rotary)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from conftest import has_rotary_handles  # noqa: E402
from train_throughput import OpCounter  # noqa: E402

# tests that fuse a real model need its per-layer rotary handles (where there are none,
# model.fused_rotary leaves the model as it is and says so: test_models_without_handles_are_reported)
needs_handles = pytest.mark.skipif(not has_rotary_handles(),
                                   reason="this transformers has no per-layer rotary handles (no `kernels` package)")

TEXTS = ["where is my order", "a refund takes five days", "how long does shipping take to reach me", "ok"]


def _step(model: EmbeddingModel, autocast: bool = False):
    """Embeddings and gradients of one training forward and backward, and its operation counts."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpCounter() as ops:
        emb = model(batch["input_ids"], batch["attention_mask"])
        (emb.float() * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
    return emb.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], ops.counts


@needs_handles
@pytest.mark.parametrize("kind,dtype,autocast", [("qwen3", torch.float32, False), ("llama", torch.float32, False),
                                                 ("qwen3", torch.bfloat16, False), ("qwen3", torch.float32, True)])
def test_fused_rotary_is_bit_identical_with_fewer_operations(kind, dtype, autocast, tiny_qwen, tiny_llama):
    """float32; bf16 weights (a LoRA run's frozen base); float32 weights under bf16 autocast (bf16
    projections, float32 cosines: full fine-tuning on a GPU)."""
    folder = tiny_qwen if kind == "qwen3" else tiny_llama
    fused = EmbeddingModel.load(str(folder), dtype=dtype)
    plain = EmbeddingModel.load(str(folder), dtype=dtype, fused_rotary=False)
    layers = fused.backbone.config.num_hidden_layers
    assert fused_rotary_count(fused.backbone) == fused.rotary_fusion.fused == layers
    assert fused_rotary_count(plain.backbone) == 0 and plain.rotary_fusion.fused == 0
    _step(fused, autocast), _step(plain, autocast)  # the first calls run the mask probes
    a, b = _step(fused, autocast), _step(plain, autocast)
    assert torch.equal(a[0], b[0])
    assert len(a[1]) == len(b[1]) > 0 and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[2]["roll"] == 2 * layers and b[2]["roll"] == 0  # forward and backward: the fused path ran
    assert sum(b[2].values()) - sum(a[2].values()) >= 10 * layers, (sum(a[2].values()), sum(b[2].values()))
    assert a[2]["neg"] <= b[2]["neg"] - 4 * layers + 1  # the signed sine once per call, not once a layer


@needs_handles
def test_fusion_survives_mode_switches_and_the_recipe_key_turns_it_off(tiny_qwen):
    from hmcl_cli.recipe import load_recipe

    model = EmbeddingModel.load(str(tiny_qwen))
    for _ in range(2):
        model.train()
        model.eval()
    assert _step(model)[2]["roll"] > 0
    cfg = load_recipe(data={"name": "x", "model": {"name_or_path": str(tiny_qwen), "fused_rotary": False}}).model
    model.apply_run_settings(cfg)
    assert fused_rotary_count(model.backbone) == 0 and _step(model)[2]["roll"] == 0
    model.set_fused_rotary(True)
    assert fused_rotary_count(model.backbone) == model.rotary_fusion.fused > 0
    assert fuse_rotary(model.backbone).fused == model.rotary_fusion.fused  # idempotent
    assert unfuse_rotary(model.backbone) == model.rotary_fusion.fused


def rotate_every_two(x):
    """GPT-J's interleaved rotation: pairs (x0, x1), (x2, x3), ... rather than the two halves."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def interleaved(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_every_two(q) * sin, k * cos + rotate_every_two(k) * sin


def halves(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, written out."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def with_position_ids(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return halves(q, k, cos, sin, unsqueeze_dim)


def upcast(q, k, cos, sin, unsqueeze_dim=1):
    """Computes in float32 whatever comes in."""
    q_out, k_out = halves(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim)
    return q_out, k_out


def test_probe_keeps_what_computes_otherwise():
    assert probe_refusal(halves, 16) == ""
    assert "queries differ" in probe_refusal(interleaved, 16)
    assert "signature" in probe_refusal(with_position_ids, 16)
    assert probe_refusal(upcast, 16).startswith("queries in torch.float32 (2, 4, 5, 16), fused torch.bfloat16")
    assert "odd head dimension" in probe_refusal(halves, 7)


class Handle(torch.nn.Module):
    """A per-layer handle as the kernels package builds one: its forward calls ``func``."""


def _handle_class(func):
    def forward(self, *args, **kwargs):
        return func(*args, **kwargs)

    return type("Func", (Handle,), {"forward": forward})


def test_calls_outside_the_fused_path_go_to_the_original():
    """Partial rotary (cosines narrower than the heads, as Phi-3 hands over), queries and keys of
    different dtypes, an extra argument: the original function's answer, exactly."""
    seen = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        seen.append(cos.shape[-1])
        rot = cos.shape[-1]
        q_out, k_out = halves(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim)
        return torch.cat((q_out, q[..., rot:]), -1), torch.cat((k_out, k[..., rot:]), -1)

    net = torch.nn.Module()
    net._kernel_funcs = {"rotary_pos_emb": _handle_class(original)()}
    net.head_dim = 16
    assert fuse_rotary(net).fused == 1 and fused_rotary_count(net) == 1
    handle = net._kernel_funcs["rotary_pos_emb"]
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    seen.clear()
    for got, want in zip(handle(q, k, cos, sin), original(q, k, cos, sin)):
        assert torch.equal(got, want)
    assert seen == [8, 8]  # the handle called the original (then the test did)
    seen.clear()
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    handle(q, k.bfloat16(), cos, sin)
    assert seen == [16]
    with pytest.raises(TypeError, match="positional arguments"):  # the original's own answer to an extra one
        handle(q, k, cos, sin, 1, None)
    handle(q, k, cos, sin)
    assert seen == [16]  # the fused path


def test_signed_sine_is_kept_on_the_sine_until_it_changes():
    sin = torch.randn(3, 8)
    first = signed_sine(sin)
    assert torch.equal(first, torch.cat((-sin[:, :4], sin[:, 4:]), -1))
    assert signed_sine(sin) is first
    sin.mul_(2)  # in place: its version moves on
    after = signed_sine(sin)
    assert after is not first and torch.equal(after, torch.cat((-sin[:, :4], sin[:, 4:]), -1))
    with torch.inference_mode():
        inference = signed_sine(sin)
        assert inference is not after and inference.is_inference()
    assert not signed_sine(sin).is_inference()  # an inference tensor may not be saved for a backward
    with torch.inference_mode():
        made_there = torch.randn(3, 8)
        assert torch.equal(signed_sine(made_there), torch.cat((-made_there[:, :4], made_there[:, 4:]), -1))
    grad_sin = torch.randn(3, 8, requires_grad=True)
    assert signed_sine(grad_sin).requires_grad and fused_rotary.SIGNED not in grad_sin.__dict__


def test_models_without_handles_are_reported():
    from transformers import AutoModel, GlmConfig

    model = AutoModel.from_config(GlmConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64, pad_token_id=0))
    report = fuse_rotary(model)
    if report.fused:  # a later transformers may give GLM handles: then its probe decided
        pytest.skip("this transformers gives GLM per-layer rotary handles")
    assert report.fused == 0 and "without a per-layer handle" in report.summary()
    bert = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert fuse_rotary(bert).summary() == "no rotary embeddings"


def test_fused_forward_matches_the_function_it_replaces_directly():
    """The probe's own check, outside the probe: grouped heads, transposed views, bf16."""
    handle = type("H", (), {fused_rotary.ORIGINAL: staticmethod(halves)})()
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    k = torch.randn(2, 5, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for dtype in (torch.float32, torch.bfloat16):
        got = fused_forward(handle, q.to(dtype), k.to(dtype), cos, sin)
        want = halves(q.to(dtype), k.to(dtype), cos, sin)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


@needs_handles
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/device/run.sh gputests)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # full fine-tuning's weights; LoRA's frozen base
def test_cuda_fused_rotary_is_bit_identical_with_fewer_operations(tiny_qwen, dtype):
    """On a GPU under bf16 autocast (roll is its own kernel there): the same embeddings and
    gradients, bit for bit, with fewer operations."""
    results = {}
    for fused in (True, False):
        model = EmbeddingModel.load(str(tiny_qwen), fused_rotary=fused, dtype=dtype).cuda()
        model.train()
        batch = {k: v.cuda() for k, v in model.pad([model.tokenize([t])[0] for t in TEXTS]).items()
                 if k in ("input_ids", "attention_mask")}
        for _ in range(2):  # the first call runs the mask probes too
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16), OpCounter() as ops:
                emb = model(batch["input_ids"], batch["attention_mask"])
                (emb.float() * torch.linspace(-1, 1, emb.shape[1], device="cuda")).sum().backward()
        results[fused] = (emb.detach(), [p.grad for p in model.parameters() if p.grad is not None], ops.counts)
    layers = EmbeddingModel.load(str(tiny_qwen)).backbone.config.num_hidden_layers
    (a, ga, ca), (b, gb, cb) = results[True], results[False]
    assert ca["roll"] == 2 * layers and cb["roll"] == 0
    assert sum(cb.values()) - sum(ca.values()) >= 10 * layers
    assert torch.equal(a, b) and len(ga) == len(gb) > 0 and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_hmcl_train_says_what_it_fused(tmp_path, tiny_qwen, tiny_bert, capsys):
    from conftest import make_trainer

    trainer = make_trainer(tmp_path / "qwen", tiny_qwen, train={"max_steps": 1})
    layers = trainer.model.backbone.config.num_hidden_layers
    out = capsys.readouterr().out
    if has_rotary_handles():
        assert f"train: rotary: {layers} attention layers rotate queries and keys together" in out
    else:  # the model is left as it is, and the line says why
        assert "train: rotary: Qwen3RotaryEmbedding kept its own rotary embedding" in out and "per-layer handle" in out
    assert f"train: norms: {4 * layers + 1} RMSNorm layers fused" in out
    make_trainer(tmp_path / "bert", tiny_bert, train={"max_steps": 1})
    out = capsys.readouterr().out
    assert "train: embedding:" in out and "train: rotary:" not in out and "train: norms:" not in out
