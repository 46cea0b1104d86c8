"""Mixed precision: what `train.precision` resolves to, and fp16's dynamic loss scale.

fp16 runs on GPUs only; the loss-scale mechanics (scale the loss, unscale the gradients before
clipping, skip a step whose gradients overflowed, keep the scale in checkpoints) do not depend on
the dtype, so they are checked here on the CPU with the trainer's own scaler."""

import pytest
import torch

from conftest import as_fp16, make_trainer
from hmcl_cli.errors import RecipeError
from hmcl_cli.modeling import encoder
from hmcl_cli.training.batching import StepBatches


@pytest.mark.parametrize("asked, native, expected", [
    ("auto", True, "bf16"), ("auto", False, "fp16"),  # T4 / V100 emulate bf16 slowly: fp16 there
    ("bf16", False, "bf16"), ("fp16", True, "fp16"), ("fp32", True, "fp32"),
])
def test_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, asked, native, expected):
    monkeypatch.setattr(encoder, "native_bf16", lambda: native)
    assert encoder.resolve_precision(asked, "cuda") == expected
    assert encoder.resolve_precision(asked, "cpu") == "fp32"  # autocast on a CPU is ~100x slower


def test_lora_base_on_a_gpu_without_native_bf16_is_float16(monkeypatch):
    from hmcl_cli.recipe import ModelConfig

    cfg = ModelConfig(name_or_path="m", lora={"enabled": True})
    for native, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(encoder, "native_bf16", lambda: native)
        assert encoder.training_dtype(cfg, "cuda") is dtype
    assert encoder.training_dtype(cfg, "cpu") is torch.float32


def _weights(t):
    return [p.detach().clone() for p in t.trainable]


@pytest.mark.parametrize("chunk", [None, 5])  # GradCache: the embeddings' gradients carry the scale
def test_fp16_loss_scale_scales_gradients_and_steps_like_unscaled_training(tmp_path, tiny_bert, chunk):
    train = {"max_grad_norm": 0.5, "grad_cache_chunk": chunk}
    plain = make_trainer(tmp_path / "a", tiny_bert, train=train)
    scaled = as_fp16(make_trainer(tmp_path / "b", tiny_bert, train=train))
    assert plain.scaler is None and scaled.scaler.get_scale() == 65536.0
    batch = StepBatches(plain.data, plain.model, plain.plan, 0, 0, plain.cfg.group_size, 0)[0]
    for t in (plain, scaled):
        t.model.train()
        t._forward_backward(dict(batch), 1.0)
    ratio = [float(s.grad.abs().sum() / p.grad.abs().sum()) for p, s in zip(plain.trainable, scaled.trainable)
             if p.grad is not None and p.grad.abs().sum() > 0]
    assert ratio and all(r == pytest.approx(65536.0, rel=1e-4) for r in ratio)  # the loss was scaled
    for t in (plain, scaled):
        t._optimizer_step()
    for a, b in zip(_weights(plain), _weights(scaled)):  # unscaled before clipping and the step
        assert torch.allclose(a, b, atol=1e-6)
    assert scaled.scaler.get_scale() == 65536.0


def test_fp16_step_with_an_overflowed_gradient_is_skipped_and_the_scale_halves(tmp_path, tiny_bert):
    t = as_fp16(make_trainer(tmp_path, tiny_bert))
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    before = _weights(t)
    t._forward_backward(dict(batch), 1.0)
    t.trainable[0].grad[0, 0] = float("inf")
    t._optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(t)))
    assert t.scaler.get_scale() == 32768.0
    t._forward_backward(dict(batch), 1.0)  # the next step, with finite gradients, trains
    t._optimizer_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(t)))


def test_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path, tiny_bert):
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    t = as_fp16(make_trainer(tmp_path, tiny_bert))
    t.scaler.scale(torch.ones(()))  # (the scale is made on first use)
    t.scaler.update(new_scale=1024.0)
    path = t.save_checkpoint()
    assert torch.load(path / "optim.pt", weights_only=False)["scaler"]["scale"] == 1024.0
    again = HMCLTrainer(load_recipe(tmp_path / "recipe.yaml"))
    again.setup(resume=True)  # (without it, a training starts over: the checkpoint would go)
    as_fp16(again)  # the CPU has no fp16: the scaler is made here, and the checkpoint read again
    again._resume()
    assert again.scaler.get_scale() == 1024.0


def test_fp16_refuses_float16_weights_and_fsdp(tmp_path, tiny_bert):
    t = make_trainer(tmp_path, tiny_bert)
    t.precision = "fp16"
    t.trainable[0].data = t.trainable[0].data.half()
    with pytest.raises(RecipeError, match="float16 weights") as e:
        t._loss_scaler()
    assert "model.dtype: auto" in e.value.hint
    t.sharded = True
    with pytest.raises(RecipeError, match="fsdp"):
        t._loss_scaler()
