"""The training step's own code never makes the host wait for the device (see training/host_sync.py)."""

import pytest
import torch

from conftest import as_fp16, make_trainer
from hmcl_cli.training.batching import StepBatches
from hmcl_cli.training.host_sync import HostSyncCounter


def test_counter_sees_the_operations_that_synchronise():
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    with HostSyncCounter() as s:
        float(x.sum())  # .item()
        y = x[x > 0]  # boolean mask index
        y.sum().backward()  # its backward: index_put with the mask
        torch.nonzero(x)
        torch.bincount(torch.tensor([0, 2]))
        z = x.detach()[torch.tensor([0, 2])]  # integer index: no sync
        torch.where(x > 0, x, 0.0)  # no sync
    ops = [e.op for e in s.events]
    assert ops == ["aten._local_scalar_dense", "aten.index", "aten.index_put", "aten.nonzero", "aten.bincount"], s.report()
    assert all("test_host_sync.py" in e.where for e in s.events), s.report()
    assert z.shape == (2,)


@pytest.mark.parametrize("variant", ["all-terms", "grad-cache", "segments-local", "decoder-lora"])
def test_training_step_has_no_host_sync(tmp_path, tiny_bert, tiny_qwen, variant):
    """Neither hmcl's code nor the model's forward (its attention mask is prepared by hmcl,
    modeling/masks.py) reads a value back from the device during a step."""
    loss = {"classification_weight": 0.2, "ranking_weight": 1.0, "weak_weight": 0.3}
    train, model, folder = {}, {}, tiny_bert
    if variant == "grad-cache":
        train["grad_cache_chunk"] = 5
    if variant == "segments-local":
        model["segments"] = {"length": 16, "overlap": 2}
        loss["local_weight"] = 0.3
    if variant == "decoder-lora":
        model["lora"], folder = {"enabled": True, "r": 4}, tiny_qwen
    t = make_trainer(tmp_path, folder, loss=loss, train=train, model=model)
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    with HostSyncCounter() as s:
        loss_value, parts = t._forward_backward(batch, 1.0)
        t.loss_fn.zero_grad()
    assert set(parts) >= {"contrastive", "classification", "ranking"}
    assert torch.isfinite(loss_value)
    assert not s.events, s.report()


@pytest.mark.parametrize("joined", [False, True])
def test_compiled_layers_train_like_eager_layers(tmp_path, tiny_bert, joined):
    """train.compile: every transformer layer compiled in place; same loss and gradients as eager.
    With model.fused_projections, eager layers join their projections and compiled ones are traced
    with one product per module."""
    from hmcl_cli.modeling.fused_projections import fused_groups

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        t = make_trainer(tmp_path / str(compiled), tiny_bert, train={"compile": compiled},
                         model={"fused_projections": joined})
        t.model.eval()  # no dropout: the two runs must see the same function
        blocks = t.model.backbone.encoder.layer
        assert all((getattr(m, "_compiled_call_impl", None) is not None) == compiled for m in blocks)
        batches = [StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[i] for i in range(2)]  # two shapes
        out = []
        for b in batches:
            loss, _ = t._forward_backward(b, 1.0)
            out.append((loss.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}))
            t.optimizer.zero_grad()
        results.append(out)
        groups = fused_groups(t.model.backbone)
        assert bool(groups) == joined and all((g.fused_calls > 0) == (not compiled) for g in groups)
    for (l0, g0), (l1, g1) in zip(*results):
        assert torch.allclose(l0, l1, atol=1e-5)
        # tolerance relative to each tensor's largest gradient, not elementwise: fp32 sums over every
        # token (token_type_embeddings' one used row) are reassociated differently by the compiled
        # kernels and by threads, and their rounding error follows the size of the summed terms, so a
        # small entry of that row (|g| ~ 3 at most) differed by 1.9e-5, beyond an elementwise rtol
        # (it failed a clean-clone CI run once); a wrong compiled kernel differs by far more
        assert g0.keys() == g1.keys()
        for k in g0:
            gap, scale = float((g0[k] - g1[k]).abs().max()), float(g0[k].abs().max())
            assert gap <= 1e-5 + 1e-4 * scale, (k, gap, scale)


def test_counter_for_a_gpu_run_ignores_reads_of_cpu_tensors():
    x = torch.tensor([0.5, -1.0])
    with HostSyncCounter(device="cuda") as s:
        float(x.sum())
        x[x > 0]
    assert not s.events


def test_compile_layers_finds_layers_whose_class_fsdp_renamed(tiny_bert):
    """fully_shard turns a BertLayer into an instance of a subclass named FSDPBertLayer."""
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.layers import compile_layers

    backbone = EmbeddingModel.load(str(tiny_bert)).backbone
    blocks = list(backbone.encoder.layer)
    mixin = type("FSDPModuleLike", (), {})
    for m in blocks:
        m.__class__ = type(f"FSDP{type(m).__name__}", (mixin, type(m)), {})
    compile_layers(backbone)
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    assert getattr(backbone, "_compiled_call_impl", None) is None  # layers, not the whole model


@pytest.mark.parametrize("fp16", [False, True])
def test_optimizer_step_has_no_host_sync(tmp_path, tiny_bert, fp16):
    """The optimizer step too — gradient clipping, fused AdamW and, under fp16, the loss scale's
    unscale, overflow check, skip and update — reads nothing back (the per-tensor AdamW read each
    parameter's step count: 37 reads per step of this model on the CPU)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this torch has no fused AdamW for the CPU")
    t = make_trainer(tmp_path, tiny_bert, train={"max_grad_norm": 1.0})
    if fp16:
        as_fp16(t)
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    t._forward_backward(batch, 1.0)
    with HostSyncCounter() as s:
        t._optimizer_step()
    assert not s.events, s.report()


def test_encoding_batches_go_to_a_gpu_through_page_locked_memory(tiny_bert, monkeypatch):
    """A copy from pageable host memory to a GPU may wait for the stream (CUDA's API sync
    behaviour), so encode's batches are pinned first for a GPU, and left as they are for a CPU."""
    from types import SimpleNamespace

    from hmcl_cli.modeling import encoder, segments
    from hmcl_cli.modeling.encoder import EmbeddingModel

    pinned, moved = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self.clone())
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: moved.append(non_blocking) or self)
    host = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    out = encoder.to_device(host, SimpleNamespace(type="cuda"))
    assert pinned == [(2, 8), (2, 8)] and moved == [True, True]
    assert all(out[k] is not host[k] for k in host)  # the pinned copies went, not the pageable tensors
    pinned.clear()
    encoder.to_device(host, SimpleNamespace(type="cpu"))
    assert not pinned
    monkeypatch.undo()

    calls = []
    real = encoder.to_device
    monkeypatch.setattr(encoder, "to_device", lambda host, device: calls.append(device) or real(host, device))
    model = EmbeddingModel.load(str(tiny_bert))
    model.encode([f"text number {i}" for i in range(10)], batch_size=4)
    assert len(calls) == 3  # every batch of plain encoding
    calls.clear()
    model.use_segments(segments.SegmentSettings(length=16))
    model.encode([f"text number {i}" for i in range(10)], batch_size=4)
    assert len(calls) == 3  # and of segmented encoding


def test_compile_cuda_graphs_compiles_in_reduce_overhead_mode_pads_and_marks_each_step(tmp_path, tiny_bert, monkeypatch):
    """train.compile: cuda-graphs (a GPU's path; here without compiling): the layers compiled in
    reduce-overhead mode, forward calls padded (a graph per shape), a graph generation per step."""
    from hmcl_cli.training import trainer as trainer_module

    modes, marks = [], []
    monkeypatch.setattr(trainer_module, "compile_layers", lambda backbone, mode=None: modes.append(mode) or 2)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    t = make_trainer(tmp_path, tiny_bert, train={"compile": "cuda-graphs"})
    assert modes == ["reduce-overhead"] and t.model.unpad is False and t.cuda_graphs
    batches = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)
    for i in range(2):
        t._forward_backward(batches[i], 1.0)
    assert len(marks) == 2
    plain = make_trainer(tmp_path / "plain", tiny_bert, train={"compile": True})
    assert modes[-1] is None and plain.model.unpad == "auto" and not plain.cuda_graphs
    plain._forward_backward(StepBatches(plain.data, plain.model, plain.plan, 0, 0, plain.cfg.group_size, 0)[0], 1.0)
    assert len(marks) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_training_steps_give_the_eager_losses(tmp_path, tiny_bert):
    """On a GPU (benchmarks/device/run.sh gputests): train.compile cuda-graphs records and replays
    the layers' graphs (two shapes, each seen three times) and gives the eager steps' losses."""
    losses = {}
    for mode in (False, "cuda-graphs"):
        torch._dynamo.reset()
        t = make_trainer(tmp_path / str(mode), tiny_bert, train={"compile": mode})
        t.model.eval()  # no dropout: both runs compute the same function
        steps = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)
        out = []
        for i in (0, 1, 0, 1, 0, 1):
            loss, _ = t._forward_backward(steps[i], 1.0)
            out.append(float(loss))
            t.optimizer.zero_grad()
        losses[mode] = out
    assert losses["cuda-graphs"] == pytest.approx(losses[False], rel=2e-2)  # bf16 autocast, padded vs unpadded
