"""hmcl prepares the backbone's 4D attention mask (modeling/masks.py): same embeddings as the 2D
mask, no host synchronisation in the model's forward, and the 2D mask wherever that is unsafe."""

import pytest
import torch
from torch import nn

from conftest import needs_minilm
from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.masks import prepared_mask, static_reason
from hmcl_cli.training.host_sync import HostSyncCounter

TEXTS = ["how long does a refund take", "refund", "where is my order and when will it arrive", "order"]


def _two_d(model: EmbeddingModel) -> None:
    """Force the 2D padding mask (what every forward did before prepared masks)."""
    model._prepared_masks = (id(model.backbone), "2D mask for the comparison")


def test_prepared_mask_is_padding_and_causal_order():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # the first text left-padded
    enc = prepared_mask(mask, causal=False)
    assert enc.shape == (2, 1, 3, 3) and enc.dtype == torch.bool
    assert enc[0, 0].tolist() == [[False, True, True]] * 3  # every query sees the real keys
    assert enc[1, 0].tolist() == [[True, True, True]] * 3
    dec = prepared_mask(mask, causal=True)
    assert dec[0, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert dec[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("fixture,side", [("tiny_bert", "right"), ("tiny_bert", "left"),
                                          ("tiny_qwen", "left"), ("tiny_qwen", "right"), ("tiny_llama", "left")])
def test_same_embeddings_and_no_host_sync_in_the_forward(fixture, side, request):
    model = EmbeddingModel.load(str(request.getfixturevalue(fixture)), padding_side=side)
    model.unpad = False  # padded forward calls, whose mask this is about (unpadded: tests/test_unpad.py)
    assert model.check_masks()
    batch = model.pad(model.tokenize(TEXTS))
    assert not bool(batch["attention_mask"].all())  # padded: the case transformers checks
    with torch.no_grad(), HostSyncCounter() as prepared_syncs:
        prepared = model(**batch)
    _two_d(model)
    with torch.no_grad(), HostSyncCounter() as plain_syncs:
        plain = model(**batch)
    assert torch.equal(prepared, plain)
    assert not prepared_syncs.events, prepared_syncs.report()
    assert plain_syncs.events  # the 2D mask's check: the counter sees what was removed


@needs_minilm
def test_real_minilm_encodes_identically():
    model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
    texts = TEXTS + ["A man is playing a guitar on the street while people walk by.", "Hi"]
    assert model.check_masks()
    prepared = model.encode(texts, batch_size=3)
    _two_d(model)
    assert torch.equal(prepared, model.encode(texts, batch_size=3))


def test_eager_attention_keeps_the_2d_mask(tiny_bert):
    model = EmbeddingModel.load(str(tiny_bert), attn_implementation="eager")
    assert "eager" in static_reason(model.backbone)
    assert not model.check_masks()
    mask = torch.tensor([[1, 1, 0]])
    assert model.backbone_mask(mask) is mask


def test_sliding_window_layers_keep_the_2d_mask(tiny_qwen):
    model = EmbeddingModel.load(str(tiny_qwen))
    model.backbone.config.use_sliding_window, model.backbone.config.sliding_window = True, 4
    assert "sliding" in static_reason(model.backbone)
    assert not model.check_masks()


class _Differs(nn.Module):
    """A backbone that treats a 4D mask unlike transformers (here: as no mask at all), or refuses it."""

    def __init__(self, inner: nn.Module, refuse: bool):
        super().__init__()
        self.inner, self.refuse, self.config = inner, refuse, inner.config

    def forward(self, input_ids, attention_mask):
        if attention_mask.dim() == 4:
            if self.refuse:
                raise ValueError("Wrong shape for attention_mask")
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("refuse", [False, True])
def test_probe_keeps_the_2d_mask_for_a_backbone_that_handles_4d_masks_otherwise(tiny_bert, refuse, capsys):
    model = EmbeddingModel.load(str(tiny_bert))
    expected = model.encode(TEXTS)
    model.backbone = _Differs(model.backbone, refuse)
    assert not model.check_masks()
    assert "attention mask" in capsys.readouterr().out
    assert torch.equal(model.encode(TEXTS), expected)  # still right, through the 2D mask


def test_a_replaced_backbone_is_probed_again(tiny_qwen):
    from hmcl_cli.modeling.lora import apply_lora
    from hmcl_cli.recipe import LoraConfig

    model = EmbeddingModel.load(str(tiny_qwen))
    assert model.check_masks()
    model.backbone = _Differs(model.backbone, refuse=True)
    assert not model.check_masks()
    model.backbone = apply_lora(model.backbone.inner, LoraConfig(enabled=True, r=4))
    assert model.check_masks()
    assert model.unpad_refusal() == ""  # (the unpadding probe: once per backbone, like the mask's)
    model.backbone.train()
    batch = model.pad(model.tokenize(TEXTS))
    with HostSyncCounter() as syncs:
        model(**batch).sum().backward()
    assert not syncs.events, syncs.report()


@pytest.mark.parametrize("segments", [False, True])
def test_encode_moves_rows_to_the_host_a_block_at_a_time(tiny_bert, monkeypatch, segments):
    """The device holds one block of finished rows, not the corpus (HostRows); same embeddings."""
    from hmcl_cli.modeling.encoder import HostRows
    from hmcl_cli.modeling.segments import SegmentSettings

    model = EmbeddingModel.load(str(tiny_bert))
    if segments:
        model.use_segments(SegmentSettings(length=8, overlap=2, pooling="weighted"))
    texts = [f"order {i} " + "refund please " * (i % 7) for i in range(40)] + ["order 3 "]
    texts.insert(5, texts[20])  # a repeat: encoded once, returned twice
    whole = model.encode(texts, batch_size=4)
    pending, real = [], HostRows._flush

    def spy(self):
        pending.append(len(self._index))
        real(self)

    monkeypatch.setattr(HostRows, "BLOCK_BYTES", 4 * model.dim * 10)  # 10 rows a block
    monkeypatch.setattr(HostRows, "_flush", spy)
    blocked = model.encode(texts, batch_size=4)
    assert blocked.device.type == "cpu" and blocked.shape == (len(texts), model.dim)
    assert torch.equal(blocked, whole)
    assert torch.equal(blocked[5], blocked[21])
    assert sum(n > 0 for n in pending) >= 4  # several blocks went to the host...
    assert max(pending) <= 10 + 4 - 1  # ...none larger than a block and one batch


@pytest.mark.parametrize("allowed", [False, True])
def test_cudnn_attention_is_off_in_forward_and_recomputing_backward_unless_allowed(tmp_path, tiny_bert, allowed):
    """model.cudnn_attention (false by default): SDPA's cuDNN backend is off wherever the model
    runs in a step — its forward calls and the recomputation of checkpointed layers in the
    backward pass — and as it was afterwards."""
    from conftest import make_trainer
    from hmcl_cli.training.batching import StepBatches

    cuda = torch.backends.cuda
    t = make_trainer(tmp_path, tiny_bert, model={"gradient_checkpointing": True, "cudnn_attention": allowed})
    t.model.train()  # transformers checkpoints in training mode only
    seen = []
    # a projection inside each block: it runs again when the block is recomputed
    hooks = [next(m for m in layer.modules() if isinstance(m, nn.Linear)).register_forward_hook(
        lambda m, a, o: seen.append(cuda.cudnn_sdp_enabled())) for layer in t.model.backbone.encoder.layer]
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    before = cuda.cudnn_sdp_enabled()
    t._forward_backward(batch, 1.0)
    for h in hooks:
        h.remove()
    layers = len(t.model.backbone.encoder.layer)
    assert len(seen) == 2 * 2 * layers  # two forward calls, each recomputed in the backward pass
    assert set(seen) == ({True} if allowed else {False})
    assert before and cuda.cudnn_sdp_enabled()  # restored
    seen.clear()
    model = EmbeddingModel.load(str(tiny_bert))  # encoding alone (mine, eval): off as well
    model.check_masks()  # (its probe's two forward calls, before the hook)
    model.unpad_refusal()  # (likewise)
    model.backbone.encoder.layer[0].register_forward_hook(lambda m, a, o: seen.append(cuda.cudnn_sdp_enabled()))
    model.encode(TEXTS)
    assert seen == [False] and cuda.cudnn_sdp_enabled()


def test_overlapping_blocks_without_cudnn_attention_keep_it_off_until_the_last_leaves():
    """Two threads encoding at once: the first to leave must not turn cuDNN attention back on
    under the other; the last restores it, and a flag that was off stays off."""
    import threading

    from hmcl_cli.modeling.encoder import without_cudnn_attention

    cuda = torch.backends.cuda
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with without_cudnn_attention():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with without_cudnn_attention():
            second_in.set()
            first_out.wait(5)
            seen["after the first left"] = cuda.cudnn_sdp_enabled()

    assert cuda.cudnn_sdp_enabled()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first left": False}
    assert cuda.cudnn_sdp_enabled()
    cuda.enable_cudnn_sdp(False)
    try:
        with without_cudnn_attention():
            pass
        assert not cuda.cudnn_sdp_enabled()  # an outer choice is kept
    finally:
        cuda.enable_cudnn_sdp(True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_training_says_at_start_which_attention_mask_the_backbone_gets(tmp_path, tiny_bert, attention, capsys):
    from conftest import make_trainer

    make_trainer(tmp_path, tiny_bert, model={"attn_implementation": attention})
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "attention mask:" in l)
    if attention == "sdpa":
        assert "4D, prepared by hmcl" in line
    else:
        assert "2D" in line and "'eager'" in line


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("unpad", [False, True])
def test_no_key_value_cache_is_filled_in_training_or_encoding(tmp_path, tiny_qwen, monkeypatch, lora, unpad):
    """A decoder's config says use_cache: without use_cache=False each forward call would copy every
    layer's keys and values into a DynamicCache nobody reads. Neither a training step (padded or
    unpadded, full or LoRA) nor encoding fills one."""
    from transformers import cache_utils

    from conftest import make_trainer
    from hmcl_cli.modeling.masks import no_cache
    from hmcl_cli.training.batching import StepBatches

    calls = []
    real = cache_utils.DynamicCache.update
    monkeypatch.setattr(cache_utils.DynamicCache, "update", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    t = make_trainer(tmp_path, tiny_qwen, model={"unpad": unpad, "lora": {"enabled": lora}})
    assert t.model.backbone.config.use_cache  # the decoder asks for a cache by default
    assert no_cache(t.model.backbone) == {"use_cache": False}
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    t._forward_backward(batch, 1.0)
    t.model.encode(["where is my order", "a refund"])
    assert not calls
    t.model.backbone(input_ids=batch["q_input_ids"][:2])  # the spy sees a call left to the default
    assert calls


def test_no_cache_keyword_only_where_the_forward_names_it(tiny_bert):
    from transformers import AutoModel, DistilBertConfig

    from hmcl_cli.modeling.masks import no_cache

    assert no_cache(AutoModel.from_pretrained(tiny_bert)) == {"use_cache": False}  # BertModel names it
    distil = AutoModel.from_config(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert no_cache(distil) == {}  # its forward has no such parameter (it would reach **kwargs)
