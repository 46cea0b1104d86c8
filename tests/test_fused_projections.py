"""Sibling projections as one product (model.fused_projections; hmcl_cli/modeling/fused_projections.py).

The fused product sums in another order than three separate ones: outputs and gradients equal the
plain model's to float32 rounding. What it saves is counted (ATen operations of a training step),
and every way out of the fused path (no gradients, frozen weights, siblings fed different inputs,
an input changed in place between the calls) must give the plain product."""

import copy
import pickle
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.layers import enable_checkpointing
from hmcl_cli.modeling.fused_projections import fuse_projections, fused_groups, unfuse_projections

TEXTS = ["where is my order", "a refund takes five days", "how long does shipping take to reach me", "ok"]
GROUPS_PER_LAYER = {"bert": {"query+key+value": 1}, "qwen3": {"q_proj+k_proj+v_proj": 1, "gate_proj+up_proj": 1}}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _step(model: EmbeddingModel, checkpointing: bool = False):
    model.train()
    for m in model.modules():  # dropout off: both models must compute the same numbers
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.backbone.config.attention_probs_dropout_prob = 0.0
    if checkpointing:
        enable_checkpointing(model.backbone)
    model.zero_grad(set_to_none=True)
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    with Ops() as ops:
        emb = model(batch["input_ids"], batch["attention_mask"])
        (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return emb.detach(), grads, ops.counts


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("kind", ["bert", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_projections_equal_plain_and_save_operations(kind, checkpointing, tiny_bert, tiny_qwen):
    folder = tiny_bert if kind == "bert" else tiny_qwen
    fused = EmbeddingModel.load(str(folder), fused_projections=True)
    plain = EmbeddingModel.load(str(folder), fused_projections=False)
    layers = fused.backbone.config.num_hidden_layers
    assert fused.projection_fusion.fused == {k: v * layers for k, v in GROUPS_PER_LAYER[kind].items()}
    assert not fused_groups(plain.backbone)
    a_emb, a_grads, a_ops = _step(fused, checkpointing)
    b_emb, b_grads, b_ops = _step(plain, checkpointing)
    assert _close(a_emb, b_emb)
    assert a_grads.keys() == b_grads.keys() and len(a_grads) > 0
    assert all(_close(a_grads[n], b_grads[n]) for n in a_grads), [n for n in a_grads if not _close(a_grads[n], b_grads[n])]
    groups = fused_groups(fused.backbone)
    assert len(groups) == sum(GROUPS_PER_LAYER[kind].values()) * layers
    # every group computed once per forward (twice per layer with checkpointing: the recomputation)
    assert all(g.fused_calls == (2 if checkpointing else 1) and g.active and g.kept is None for g in groups)
    # fewer matrix products: forward one a group instead of one a member, backward two instead of two a member
    products = lambda c: c["mm"] + c["addmm"]  # noqa: E731
    members = sum(len(g.modules) for g in groups)
    saved = (members - len(groups)) * (3 if not checkpointing else 4)
    assert products(b_ops) - products(a_ops) == saved
    assert sum(a_ops.values()) < sum(b_ops.values())
    assert list(fused.state_dict()) == list(plain.state_dict())  # names and saving unchanged


def test_no_gradients_or_frozen_weights_take_each_modules_own_product(tiny_bert):
    model = EmbeddingModel.load(str(tiny_bert), fused_projections=True)
    groups = fused_groups(model.backbone)
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])
    assert all(g.fused_calls == 0 for g in groups)
    model.requires_grad_(False)
    model.backbone.embeddings.requires_grad_(True)  # gradients flow, the projections are frozen (LoRA's case)
    model(batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert all(g.fused_calls == 0 for g in groups)
    model.requires_grad_(True)
    model(batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert all(g.fused_calls == 1 for g in groups)


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.key, self.value = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 6)

    def forward(self, xq, xk, xv):
        return self.query(xq), self.key(xk), self.value(xv)


def _plain(m: Siblings, xq, xk, xv):
    return [nn.functional.linear(x, mod.weight, mod.bias) for x, mod in zip((xq, xk, xv), (m.query, m.key, m.value))]


def test_siblings_fed_different_inputs_get_their_own_product_and_the_group_stops():
    m = Siblings()
    assert fuse_projections(m, setting=True).fused == {"query+key+value": 1}
    (group,) = fused_groups(m)
    x, y, z = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    for out, want in zip(m(x, x, x), _plain(m, x, x, x)):
        assert _close(out, want)
    assert group.fused_calls == 1 and group.active
    for _ in range(2):
        for out, want in zip(m(x, y, z), _plain(m, x, y, z)):
            assert torch.equal(out, want) or _close(out, want)
    assert not group.active and group.kept is None  # two products whose kept outputs went unused
    calls = group.fused_calls
    for out, want in zip(m(x, x, x), _plain(m, x, x, x)):
        assert torch.equal(out, want)
    assert group.fused_calls == calls


def test_an_input_changed_in_place_between_the_calls_is_projected_again():
    m = Siblings()
    fuse_projections(m, setting=True)
    x = torch.randn(3, 8)
    q = m.query(x)
    x.mul_(2.0)  # the kept key and value belong to the old x
    k, v = m.key(x), m.value(x)
    assert _close(q, _plain(m, x / 2, x, x)[0])
    assert _close(k, _plain(m, x, x, x)[1]) and _close(v, _plain(m, x, x, x)[2])


def test_fused_modules_pickle_copy_and_unfuse(tiny_bert):
    model = EmbeddingModel.load(str(tiny_bert), fused_projections=True)
    for other in (copy.deepcopy(model.backbone), pickle.loads(pickle.dumps(model.backbone))):
        groups = fused_groups(other)
        assert len(groups) == len(fused_groups(model.backbone))
        # each copy's group holds the copy's own modules, not the original's
        own = {id(m) for m in other.modules()}
        assert all(id(m) in own for g in groups for m in g.modules)
    model.set_fused_norms(False)  # another fusion turned off leaves this one alone
    assert len(fused_groups(model.backbone)) == model.backbone.config.num_hidden_layers
    assert unfuse_projections(model.backbone) == 3 * model.backbone.config.num_hidden_layers
    assert not fused_groups(model.backbone)
    assert all(type(m) is nn.Linear for m in model.backbone.modules() if isinstance(m, nn.Linear))


def test_groups_need_one_input_width_and_plain_linear_layers():
    m = Siblings()
    m.value = nn.Linear(7, 6)
    assert not fuse_projections(m, setting=True).fused
    m = Siblings()
    m.key = type("Quantised", (nn.Linear,), {})(8, 4)
    assert not fuse_projections(m, setting=True).fused



def test_a_copy_made_between_the_calls_keeps_no_outputs_in_flight():
    m = Siblings()
    fuse_projections(m, setting=True)
    m.query(torch.randn(3, 8))
    assert fused_groups(m)[0].kept is not None
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert fused_groups(other)[0].kept is None


def _autocast_step(model: EmbeddingModel, device: str):
    model.train()
    batch = {k: v.to(device) for k, v in model.pad([model.tokenize([t])[0] for t in TEXTS]).items()
             if k in ("input_ids", "attention_mask")}
    for _ in range(2):  # the first call runs hmcl's one-time probes of the model too
        model.zero_grad(set_to_none=True)
        with Ops() as ops:
            with torch.autocast(device, dtype=torch.bfloat16):
                emb = model(batch["input_ids"], batch["attention_mask"])
            (emb.float() * torch.linspace(-1, 1, emb.shape[1], device=device)).sum().backward()
    grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
    return emb.detach().float(), grads, ops.counts


def test_under_autocast_the_joined_weights_are_cast_once(tiny_bert):
    """bf16 autocast casts each product's weight, bias and float32 input, and their gradients
    back: joined, a group's weights, biases and input are cast once each way (the CPU's autocast casts products' weights as CUDA's does)."""
    fused = EmbeddingModel.load(str(tiny_bert), fused_projections=True)
    plain = EmbeddingModel.load(str(tiny_bert), fused_projections=False)
    a, b = _autocast_step(fused, "cpu"), _autocast_step(plain, "cpu")
    groups = len(fused_groups(fused.backbone))
    # per group: forward, the casts of 3 weights and 3 biases become 2, the input's 3 casts 1;
    # backward, as many casts of their gradients back
    assert b[2]["_to_copy"] - a[2]["_to_copy"] == 2 * (4 + 2) * groups
    assert sum(b[2].values()) - sum(a[2].values()) >= 15 * groups
    assert torch.nn.functional.cosine_similarity(a[0], b[0]).min() > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/device/run.sh gputests)")
@pytest.mark.parametrize("kind", ["bert", "qwen3"])
def test_cuda_fused_projections_under_autocast(kind, tiny_bert, tiny_qwen):
    """On a GPU under bf16 autocast: every group computed as one product, fewer operations, and
    embeddings and gradients that agree with one product per module."""
    folder = tiny_bert if kind == "bert" else tiny_qwen
    results = {}
    for on in (True, False):
        model = EmbeddingModel.load(str(folder), fused_projections="auto" if on else False).cuda()
        results[on] = _autocast_step(model, "cuda")
        if on:
            groups = fused_groups(model.backbone)
            assert groups and all(g.fused_calls == 2 and g.active for g in groups)
    assert sum(results[True][2].values()) < sum(results[False][2].values()) - 5 * len(groups)
    assert torch.nn.functional.cosine_similarity(results[True][0], results[False][0]).min() > 0.999
    for x, y in zip(results[True][1], results[False][1]):
        assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.99


def test_auto_joins_on_a_gpu_only(tmp_path, tiny_bert, capsys):
    """``auto`` (the default) leaves a CPU's training one product per module, and says nothing of
    it at the start of training; ``true`` joins there too and says so."""
    from conftest import make_trainer

    model = EmbeddingModel.load(str(tiny_bert))
    assert model.projection_fusion.groups > 0 and not model.projection_fusion.active_on("cpu")
    assert model.projection_fusion.active_on("cuda")
    model(*_batch(model)).sum().backward()
    assert all(g.fused_calls == 0 for g in fused_groups(model.backbone))
    model.set_fused_projections(True)  # the same groups, now for a CPU's inputs too
    model(*_batch(model)).sum().backward()
    assert all(g.fused_calls == 1 for g in fused_groups(model.backbone))
    for setting in ("auto", True):
        capsys.readouterr()
        trainer = make_trainer(tmp_path / str(setting), tiny_bert, model={"fused_projections": setting},
                               train={"max_steps": 1})
        trainer.train()
        out = capsys.readouterr()
        assert ("train: projections: 2 groups of sibling projections" in out.err + out.out) == (setting is True)
        groups = fused_groups(trainer.model.backbone)
        assert groups and all((g.fused_calls > 0) == (setting is True) for g in groups)


def _batch(model: EmbeddingModel):
    batch = model.pad([model.tokenize([t])[0] for t in TEXTS])
    return batch["input_ids"], batch["attention_mask"]


def _family(name: str) -> nn.Module:
    import transformers as tf

    small = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    if name == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, n_layers=2, n_heads=2, dim=8, hidden_dim=16,
                                                      dropout=0.0, attention_dropout=0.0))
    if name == "mpnet":
        return tf.MPNetModel(tf.MPNetConfig(hidden_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                            **small))
    if name == "t5":
        return tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                             feed_forward_proj="gated-gelu", dropout_rate=0.0))
    return tf.LlamaModel(tf.LlamaConfig(hidden_size=8, num_key_value_heads=1, **small))


@pytest.mark.parametrize("name, groups", [("distilbert", 2), ("mpnet", 2), ("t5", 4), ("llama", 4)])
def test_other_families_names_are_joined_and_give_the_same_step(name, groups):
    torch.manual_seed(0)
    plain = _family(name).train()
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused, setting=True).groups == groups
    ids = torch.randint(3, 100, (2, 7))
    grads = []
    for model in (plain, fused):
        out = model(input_ids=ids).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    assert all(g.fused_calls == 1 and g.active for g in fused_groups(fused))
    assert _close(grads[1][0], grads[0][0])
    assert all(_close(a, b) for a, b in zip(grads[1][1], grads[0][1]) if b is not None)
