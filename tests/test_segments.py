"""Segment encoding of long texts (HiCL): equivalence for short texts, hand-computed pooling."""

import pytest
import torch
from torch.nn import functional as F

from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.segments import SegmentSettings, aggregate, split_segments
from conftest import assert_grads_close

WORDS = "refund shipping order seller account payment invoice package return address label".split()


def _segmented(folder, length, overlap=0, pooling="weighted", **kw):
    m = EmbeddingModel.load(str(folder), **kw)
    m.settings.segment_length, m.settings.segment_overlap, m.settings.segment_pooling = length, overlap, pooling
    return m


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_text_shorter_than_one_segment_equals_plain_encoding(fixture, request):
    folder = request.getfixturevalue(fixture)
    texts = ["refund please", "where is my package", " ".join(WORDS[:6])]
    plain = EmbeddingModel.load(str(folder), max_length=64, query_prompt="question: ")
    seg = _segmented(folder, 16, max_length=64, query_prompt="question: ")
    for side in ("doc", "query"):
        assert [s[0][0] for s in split_segments(seg, texts, side, seg.segments)] == plain.tokenize(texts, side)
        assert torch.allclose(seg.encode(texts, side=side), plain.encode(texts, side=side), atol=1e-6)


def test_weighted_pooling_matches_hand_computation(tiny_bert):
    m = _segmented(tiny_bert, 6, overlap=1, max_length=64)  # [CLS] + 4 words + [SEP] per segment
    text = " ".join(WORDS)  # 11 words, one token each
    tok = m.tokenizer
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ids = tok.convert_tokens_to_ids(WORDS)
    windows = [ids[0:4], ids[3:7], ids[6:10], ids[9:11]]  # stride 4 - 1 overlap
    with torch.no_grad():
        pooled = [m.pooled(torch.tensor([[cls] + w + [sep]]), torch.ones(1, len(w) + 2, dtype=torch.long))[0]
                  for w in windows]
    weights = torch.tensor([4.0, 4.0, 4.0, 2.0])
    expected = F.normalize((torch.stack(pooled) * weights[:, None]).sum(0) / weights.sum(), dim=-1)
    assert torch.allclose(m.encode([text])[0], expected, atol=1e-5)
    mean = _segmented(tiny_bert, 6, overlap=1, pooling="mean", max_length=64)
    assert torch.allclose(mean.encode([text])[0], F.normalize(torch.stack(pooled).mean(0), dim=-1), atol=1e-5)
    # the whole text is bounded by max_length: with max_length 8 only [CLS] + 6 words + [SEP] are kept
    short = _segmented(tiny_bert, 6, overlap=1, max_length=8)
    assert [len(s) for s, _ in split_segments(short, [text], "doc", short.segments)[0]] == [6, 5]


def test_aggregate_is_a_weighted_mean_per_owner():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    out = aggregate(emb, torch.tensor([0, 0, 1]), torch.tensor([3, 1, 5]), 2)
    assert torch.allclose(out, torch.tensor([[0.75, 0.25], [2.0, 2.0]]))


def test_segment_settings_survive_save_and_load(tmp_path, tiny_bert):
    m = _segmented(tiny_bert, 32, overlap=4)
    m.save(tmp_path / "saved")
    again = EmbeddingModel.load(str(tmp_path / "saved"))
    assert again.segments == SegmentSettings(32, 4, "weighted")


def test_the_model_card_of_a_segmented_model_says_other_loaders_cut_long_texts(tmp_path, tiny_bert):
    from hmcl_cli.export.merged import export_merged

    m = _segmented(tiny_bert, 32, overlap=4)
    m.save(tmp_path / "saved")
    export_merged(tmp_path / "saved", tmp_path / "merged", card={"name": "s", "base_model": str(tiny_bert)})
    card = " ".join((tmp_path / "merged" / "README.md").read_text().split())
    assert ("Long texts: hmcl encodes a text past 32 tokens as segments (overlap 4) and averages them" in card
            and f"cut such a text to {m.settings.doc_max_length} tokens instead" in card)
    export_merged(tiny_bert, tmp_path / "plain", card={"name": "p", "base_model": str(tiny_bert)})
    assert "Long texts" not in (tmp_path / "plain" / "README.md").read_text()


def test_recipe_segments_reach_mine_eval_and_training(tmp_path, tiny_bert):
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import model_loader
    from hmcl_cli.training.trainer import HMCLTrainer
    from conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, model={"segments": {"length": 24, "overlap": 4}}))
    assert EmbeddingModel.from_recipe(recipe.model, recipe.base_dir).segments == SegmentSettings(24, 4, "weighted")
    assert model_loader(recipe)(str(tiny_bert)).segments == SegmentSettings(24, 4, "weighted")
    prepare(recipe, progress=False)
    t = HMCLTrainer(recipe)
    t.setup()
    assert t.model.segments == SegmentSettings(24, 4, "weighted")
    assert t.data.segments_per_text()[1] > 1  # the sample answers are longer than one segment


# ---------------------------------------------------------------- training with segments

def _trainer(tmp_path, model_dir, **sections):
    from conftest import make_trainer

    return make_trainer(tmp_path, model_dir, **sections)


def _first_batch(t):
    from hmcl_cli.training.batching import StepBatches

    return StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]


def _step(t, batch):
    t.optimizer.zero_grad(set_to_none=True)
    loss, parts = t._forward_backward(batch, 1.0)
    return loss.detach(), parts, [p.grad.clone() for p in t.trainable if p.grad is not None]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_training_with_segments_longer_than_every_text_equals_plain_training(tmp_path, fixture, request):
    model = request.getfixturevalue(fixture)
    plain = _trainer(tmp_path / "plain", model)
    seg = _trainer(tmp_path / "seg", model, model={"segments": {"length": 64}})  # max_length 48: one segment each
    assert seg.data.segments_per_text() == (1, 1)
    b_plain, b_seg = _first_batch(plain), _first_batch(seg)
    assert torch.equal(b_plain["c_input_ids"], b_seg["c_input_ids"])
    loss_p, _, g_p = _step(plain, b_plain)
    loss_s, _, g_s = _step(seg, b_seg)
    assert torch.allclose(loss_p, loss_s, atol=1e-6)
    assert len(g_p) == len(g_s) > 0
    for a, b in zip(g_p, g_s):  # equal up to float rounding (relative to the gradient's scale)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7  # (1-thread CPU: 1.7e-5)


def test_segment_batch_averages_segments_into_the_text_embedding(tmp_path, tiny_bert, monkeypatch):
    from hmcl_cli.modeling.segments import encode_segmented
    from hmcl_cli.training.batching import TrainData

    monkeypatch.setattr(TrainData, "KEEP_TEXTS", True)  # (the batch's texts are looked up by their hash)

    t = _trainer(tmp_path, tiny_bert, model={"segments": {"length": 16, "overlap": 2}})
    batch = _first_batch(t)
    assert batch["c_input_ids"].size(0) > batch["candidate_hash"].size(0)  # more segments than texts
    assert batch["c_input_ids"].size(1) <= 16
    t.model.eval()
    with torch.no_grad():
        units = t._units(batch["c_input_ids"], batch["c_attention_mask"])
        emb, _ = t._texts(units, batch, "c", batch["candidate_hash"].size(0))
    # the same texts through the inference path (model.encode -> encode_segmented)
    from hmcl_cli.training.batching import text_id
    by_hash = {text_id(d): d for d in t.data.docs}
    texts = [by_hash[int(h)] for h in batch["candidate_hash"]]
    expected = encode_segmented(t.model, texts, "doc", t.model.segments, 8)
    assert torch.allclose(emb, expected, atol=1e-5)


def test_grad_cache_with_segments_and_local_term_gives_same_loss_and_gradients(tmp_path, tiny_bert):
    t = _trainer(tmp_path, tiny_bert, model={"segments": {"length": 16, "overlap": 2}},
                 loss={"local_weight": 0.3})
    batch = _first_batch(t)
    loss_plain, parts, g_plain = _step(t, batch)
    assert "local" in parts and float(parts["local"]) > 0
    t.cfg.grad_cache_chunk = 5
    loss_gc, _, g_gc = _step(t, batch)
    assert torch.allclose(loss_plain, loss_gc, atol=1e-6)
    assert_grads_close(g_plain, g_gc)


def test_training_with_segments_and_local_term_reduces_the_loss(tmp_path, tiny_bert):
    import json

    t = _trainer(tmp_path, tiny_bert, model={"segments": {"length": 16, "overlap": 2}},
                 loss={"local_weight": 0.5}, train={"max_steps": 12, "log_steps": 4, "eval_steps": 12, "save_steps": 12})
    t.train()
    logs = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    local = [r["local"] for r in logs if "local" in r]
    assert len(local) == 3 and local[-1] < local[0]
    folder = t.save_final()
    assert EmbeddingModel.load(str(folder)).segments == SegmentSettings(16, 2, "weighted")


def test_local_weight_without_segments_is_refused(tmp_path, tiny_bert):
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.recipe import load_recipe
    from conftest import write_recipe

    with pytest.raises(RecipeError, match="model.segments"):
        load_recipe(write_recipe(tmp_path, tiny_bert, loss={"local_weight": 0.2}))


def test_planner_counts_segments_as_sequences(tmp_path, tiny_bert):
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.memory import plan_memory
    from conftest import write_recipe

    cpu = torch.device("cpu")
    r_plain = load_recipe(write_recipe(tmp_path / "a", tiny_bert, model={"max_length": 64}))
    r_seg = load_recipe(write_recipe(tmp_path / "b", tiny_bert, model={"max_length": 64, "segments": {"length": 16}}))
    plain, seg = plan_memory(r_plain, cpu), plan_memory(r_seg, cpu)
    assert seg.lengths == (16, 16)
    # 64 tokens in segments of 16 (14 content tokens each): 1 + ceil(48 / 14) = 5 segments per text
    assert seg.sequences == 5 * plain.sequences
    assert plan_memory(r_seg, cpu, longest=(16, 16), segments=(2, 3)).sequences == 8 * 2 + 8 * 3 * 3


def test_local_term_on_a_tiny_model_matches_a_hand_computation(tmp_path, tiny_bert):
    """The trainer's local term on real segment embeddings equals a loop over segments that
    encodes each segment alone (no padding) and writes the graded InfoNCE out by hand."""
    import math

    t = _trainer(tmp_path, tiny_bert, model={"segments": {"length": 16, "overlap": 2}},
                 loss={"local_weight": 1.0, "weak_weight": 0.3, "temperature": 0.1})
    batch = _first_batch(t)
    t.model.eval()
    with torch.no_grad():
        q = t._units(batch["q_input_ids"], batch["q_attention_mask"])
        c = t._units(batch["c_input_ids"], batch["c_attention_mask"])
        _, parts = t.loss_fn(t._pair_batch(q, c, batch, None))

        def segments(ids_key, mask_key, owner_key):
            out = {}
            for row, owner in enumerate(batch[owner_key].tolist()):
                ids = batch[ids_key][row][batch[mask_key][row].bool()]  # right padding: the real tokens
                e = t.model.pooled(ids[None], torch.ones_like(ids)[None])[0]
                out.setdefault(owner, []).append(F.normalize(e, dim=-1))
            return out

        a_seg = segments("q_input_ids", "q_attention_mask", "q_segment_owner")
        c_seg = segments("c_input_ids", "c_attention_mask", "c_segment_owner")
    target = {}
    for a, cand, level in zip(batch["pair_anchor"].tolist(), batch["pair_candidate"].tolist(), batch["pair_level"].tolist()):
        target[(a, cand)] = {2: 1.0, 1: 0.3, 0: 0.0}[level]
    flat_c = [(cand, e) for cand, es in c_seg.items() for e in es]
    per_anchor = []
    for a, segs in a_seg.items():
        weights = [target.get((a, cand), 0.0) / len(c_seg[cand]) for cand, _ in flat_c]
        if sum(weights) == 0:
            continue
        losses = []
        for s in segs:
            logits = [float(s @ e) / 0.1 for _, e in flat_c]
            lse = max(logits) + math.log(sum(math.exp(x - max(logits)) for x in logits))
            losses.append(-sum(w / sum(weights) * (x - lse) for w, x in zip(weights, logits) if w > 0))
        per_anchor.append(sum(losses) / len(losses))
    assert any(len(v) > 1 for v in c_seg.values())
    assert float(parts["local"]) == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-4)
