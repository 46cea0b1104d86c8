"""Segment encoding of long texts (HiCL): equivalence for short texts, hand-computed pooling."""

import pytest
import torch
from torch.nn import functional as F

from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.modeling.segments import SegmentSettings, aggregate, split_segments

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


def test_recipe_segments_reach_mine_and_eval_but_training_refuses(tmp_path, tiny_bert):
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import model_loader
    from hmcl_cli.training.trainer import HMCLTrainer
    from conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, model={"segments": {"length": 24, "overlap": 4}}))
    assert EmbeddingModel.from_recipe(recipe.model, recipe.base_dir).segments == SegmentSettings(24, 4, "weighted")
    assert model_loader(recipe)(str(tiny_bert)).segments == SegmentSettings(24, 4, "weighted")
    prepare(recipe, progress=False)
    with pytest.raises(RecipeError, match="not supported yet"):
        HMCLTrainer(recipe).setup()
