"""sentence-transformers pipelines: hmcl encodes a model as SentenceTransformer(folder).encode
does (Dense / LayerNorm / Dropout heads, every pooling mode, the T5 encoder, do_lower_case),
trains and saves the head, or refuses a pipeline it cannot reproduce."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import build_tokenizer
from hmcl_cli.errors import ModelNotFoundError
from hmcl_cli.modeling.encoder import EmbeddingModel, pool

st_lib = pytest.importorskip("sentence_transformers")
TEXTS = ["refund please", "Where is my ORDER?", "how do i become a seller on your marketplace today",
         "ok"]


def _st_modules():
    from sentence_transformers import models

    return models


def build_st(folder: Path, backbone: Path, pooling: str = "mean", head=(), normalize: bool = True) -> Path:
    """A sentence-transformers folder built and saved by sentence-transformers itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _st_modules()
        torch.manual_seed(3)
        transformer = m.Transformer(str(backbone), max_seq_length=48)
        dim = transformer.get_word_embedding_dimension()
        modules = [transformer, m.Pooling(dim, pooling_mode=pooling)]
        for make in head:
            modules.append(make(m))
        if normalize:
            modules.append(m.Normalize())
        st_lib.SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def st_encode(folder: Path, texts=TEXTS) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.tensor(st_lib.SentenceTransformer(str(folder), device="cpu").encode(texts))


HEADS = {
    "dense-tanh": (lambda m: m.Dense(32, 16),),
    "dense-identity-layernorm-residual": (
        lambda m: m.Dense(32, 24, bias=False, activation_function=torch.nn.Identity()),
        lambda m: m.LayerNorm(24),
        lambda m: m.Dense(24, 24, activation_function=torch.nn.GELU(), use_residual=True)),
    "dropout-dense": (lambda m: m.Dropout(0.3), lambda m: m.Dense(32, 8, activation_function=torch.nn.ReLU())),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_layers_encode_save_and_reload_as_sentence_transformers(tmp_path, tiny_bert, head):
    folder = build_st(tmp_path / "st", tiny_bert, head=HEADS[head])
    ref = st_encode(folder)
    model = EmbeddingModel.load(str(folder))
    assert len(model.head) == len(HEADS[head]) and model.dim == ref.shape[1] != 32
    assert torch.allclose(model.encode(TEXTS), ref, atol=1e-5)
    model.save(tmp_path / "saved")
    assert torch.allclose(st_encode(tmp_path / "saved"), ref, atol=1e-5)
    assert torch.allclose(EmbeddingModel.load(str(tmp_path / "saved")).encode(TEXTS), ref, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
def test_every_pooling_mode_matches_sentence_transformers(tmp_path, tiny_bert, pooling):
    folder = build_st(tmp_path / "st", tiny_bert, pooling=pooling, normalize=False)
    ref = st_encode(folder)
    model = EmbeddingModel.load(str(folder), normalize=False)
    assert torch.allclose(model.encode(TEXTS), ref, atol=1e-5)
    model.save(tmp_path / "saved")  # written back in the form both libraries read
    assert torch.allclose(st_encode(tmp_path / "saved"), ref, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_new_pooling_modes_by_hand(side):
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [9.0]], [[3.0], [-1.0], [5.0], [7.0]]])
    # row 0: two real tokens (1, 2 right-padded or 4, 9 left-padded); row 1: all four real
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]) if side == "right" else torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    a, b = (1.0, 2.0) if side == "right" else (4.0, 9.0)
    assert pool(hidden, mask, "max").flatten().tolist() == [max(a, b), 7.0]
    assert torch.allclose(pool(hidden, mask, "mean_sqrt_len").flatten(), torch.tensor([(a + b) / 2 ** 0.5, 14 / 2.0]))
    # k-th real token weighted k
    assert torch.allclose(pool(hidden, mask, "weighted_mean").flatten(),
                          torch.tensor([(a + 2 * b) / 3, (3 - 2 + 15 + 28) / 10]))


def _t5(folder: Path) -> Path:
    from transformers import T5Config, T5Model

    tok = build_tokenizer("bert")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    T5Model(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_t5_encoder_with_dense_as_sentence_t5(tmp_path):
    """sentence-t5 / gtr-t5: the T5 encoder alone, mean pooling, a bias-free Dense, Normalize."""
    folder = build_st(tmp_path / "st", _t5(tmp_path / "t5"),
                      head=(lambda m: m.Dense(32, 32, bias=False, activation_function=torch.nn.Identity()),))
    model = EmbeddingModel.load(str(folder))
    assert type(model.backbone).__name__ == "T5EncoderModel"
    assert torch.allclose(model.encode(TEXTS), st_encode(folder), atol=1e-5)


def test_do_lower_case_lowercases_before_tokenising(tmp_path, tiny_bert):
    """A case-sensitive tokenizer (Refund is unknown, refund is not) in a folder that says do_lower_case."""
    folder = tmp_path / "cased"
    shutil.copytree(tiny_bert, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["normalizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    build_st(tmp_path / "st", folder)
    sb = tmp_path / "st" / "sentence_bert_config.json"
    sb.write_text(json.dumps({**json.loads(sb.read_text()), "do_lower_case": True}))
    model = EmbeddingModel.load(str(tmp_path / "st"))
    assert model.tokenize(["Refund PLEASE"]) == model.tokenize(["refund please"])
    assert torch.allclose(model.encode(TEXTS), st_encode(tmp_path / "st"), atol=1e-5)
    model.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "sentence_bert_config.json").read_text())["do_lower_case"] is True


def _modules(folder: Path) -> list:
    return json.loads((folder / "modules.json").read_text())


@pytest.mark.parametrize("case", ["unknown-module", "two-modes", "module-before-pooling", "activation-outside-torch",
                                  "after-normalize"])
def test_pipelines_hmcl_cannot_reproduce_are_refused(tmp_path, tiny_bert, case):
    folder = build_st(tmp_path / "st", tiny_bert, head=HEADS["dense-tanh"])
    modules = _modules(folder)
    pooling_cfg = folder / "1_Pooling" / "config.json"
    if case == "unknown-module":
        modules.insert(2, {"idx": 9, "name": "9", "path": "9_X", "type": "sentence_transformers.models.WeightedLayerPooling"})
        expect = "WeightedLayerPooling"
    elif case == "two-modes":
        pooling_cfg.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": ["cls", "mean"]}))
        expect = "concatenates 2 pooling modes"
    elif case == "module-before-pooling":
        modules[1], modules[2] = modules[2], modules[1]
        expect = "before the pooling"
    elif case == "activation-outside-torch":
        cfg = folder / "2_Dense" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "activation_function": "mypkg.Swish"}))
        expect = "mypkg.Swish"
    else:
        modules[2], modules[3] = modules[3], modules[2]
        expect = "after Normalize"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelNotFoundError, match=expect) as e:
        EmbeddingModel.load(str(folder))
    assert str(folder / "modules.json") in str(e.value)


def test_encoder_decoder_other_than_t5_is_refused(tmp_path):
    from transformers import BartConfig, BartModel

    tok = build_tokenizer("bert")
    BartModel(BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         max_position_embeddings=64)).save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    with pytest.raises(ModelNotFoundError, match="encoder-decoder"):
        EmbeddingModel.load(str(tmp_path / "bart"))


@pytest.mark.parametrize("lora", [False, True])
def test_the_head_trains_and_is_saved_with_the_model(tmp_path, tiny_bert, lora):
    """Training moves the Dense head's weights (full fine-tuning and LoRA alike) and the saved model,
    in sentence-transformers, encodes as hmcl does; the merged export keeps the head."""
    from conftest import write_recipe
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.export.merged import export_merged
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_train

    folder = build_st(tmp_path / "st", tiny_bert, head=HEADS["dense-tanh"])
    before = EmbeddingModel.load(str(folder)).head[0].linear.weight.detach().clone()
    sections = {"train": {"max_steps": 4, "eval_steps": 100}}
    if lora:
        sections["model"] = {"lora": {"enabled": True, "r": 4, "alpha": 8}}
    recipe = load_recipe(write_recipe(tmp_path / "work", folder, **sections))
    prepare(recipe, progress=False)
    final = run_train(recipe)
    trained = EmbeddingModel.load(str(final))
    assert trained.dim == 16 and not torch.allclose(trained.head[0].linear.weight, before)
    assert torch.allclose(trained.encode(TEXTS), st_encode(final), atol=1e-5)
    export_merged(final, tmp_path / "merged")
    assert torch.allclose(st_encode(tmp_path / "merged"), trained.encode(TEXTS), atol=1e-5)


def _hand_cut(emb: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(emb[:, :dim], dim=-1)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_export_dim_cuts_merged_and_onnx_alike(tmp_path, fixture, request, capsys):
    """`hmcl export --dim 16`: the sentence-transformers folder, hmcl's loader and the ONNX graph all
    give the trained model's embeddings cut to 16 and re-normalised, on a Dense head as well."""
    pytest.importorskip("onnxruntime")
    from hmcl_cli.export.merged import export_merged
    from hmcl_cli.export.onnx import export_onnx, onnx_encode

    source = request.getfixturevalue(fixture)
    folder = build_st(tmp_path / "st", source, head=(lambda m: m.Dense(32, 24),),
                      pooling="lasttoken" if fixture == "tiny_qwen" else "mean")
    model = EmbeddingModel.load(str(folder))
    model.settings.matryoshka_dims = [16, 8]
    model.save(tmp_path / "trained")
    want = _hand_cut(model.encode(TEXTS), 16)

    report = export_merged(tmp_path / "trained", tmp_path / "merged", dim=16, card={"name": "x"})
    assert report["dim"] == 16 and report["mean_cosine"] >= 0.99999
    assert "dimensions" not in capsys.readouterr().err  # 16 is a trained size: no warning
    assert torch.allclose(st_encode(tmp_path / "merged"), want, atol=1e-5)
    again = EmbeddingModel.load(str(tmp_path / "merged"))
    assert again.dim == 16 and again.settings.matryoshka_dims == [8]
    assert torch.allclose(again.encode(TEXTS), want, atol=1e-5)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "first 16 dimensions" in card and "Dense 32->24 (Tanh) -> Dense 24->16" in card
    assert "transformers alone does not apply the layers after the pooling" in card

    export_onnx(tmp_path / "trained", tmp_path / "onnx", dim=16)
    got = onnx_encode(tmp_path / "onnx" / "model.onnx", model, TEXTS)
    assert got.shape == (len(TEXTS), 16) and torch.allclose(torch.from_numpy(got), want, atol=1e-4)


def test_export_dim_checks_the_size(tmp_path, tiny_bert, capsys):
    from hmcl_cli.errors import ExportError
    from hmcl_cli.export.merged import export_merged

    with pytest.raises(ExportError, match="32 dimensions"):
        export_merged(tiny_bert, tmp_path / "big", dim=32)
    assert not (tmp_path / "big").exists()
    export_merged(tiny_bert, tmp_path / "small", dim=8)  # not a trained size: exported, with a warning
    assert "not trained to be cut to 8" in capsys.readouterr().err


def test_the_embedding_pipeline_is_described_in_one_line(tmp_path, tiny_bert):
    folder = build_st(tmp_path / "st", tiny_bert, pooling="cls", head=HEADS["dense-identity-layernorm-residual"])
    assert EmbeddingModel.load(str(folder)).describe() == (
        "cls pooling of 32 dimensions -> Dense 32->24 -> LayerNorm -> Dense 24->24 (GELU) + residual -> L2-normalised "
        "(24 dimensions)")
    assert EmbeddingModel.load(str(tiny_bert)).describe() == "mean pooling of 32 dimensions -> L2-normalised"


def test_a_dot_product_base_trained_with_normalisation_is_saved_for_cosine(tmp_path, tiny_bert):
    """The objective compares normalised embeddings (model.normalize: true): the trained model says
    cosine, and its folder ends in Normalize, whatever the base said."""
    from conftest import write_recipe
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_train

    folder = tmp_path / "dot"
    st_lib.SentenceTransformer(modules=[_st_modules().Transformer(str(tiny_bert)), _st_modules().Pooling(32)],
                               device="cpu", similarity_fn_name="dot").save(str(folder))
    recipe = load_recipe(write_recipe(tmp_path / "work", folder, train={"max_steps": 2, "eval_steps": 100}))
    prepare(recipe, progress=False)
    final = run_train(recipe)
    assert json.loads((final / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"
    assert EmbeddingModel.load(str(final)).settings.similarity == "cosine"
    assert _modules(final)[-1]["type"].endswith("Normalize")


def test_a_pooling_other_than_the_models_own_is_warned_about_once(tmp_path, tiny_bert, capsys):
    folder = build_st(tmp_path / "st", tiny_bert, pooling="cls")
    EmbeddingModel.load(str(folder))  # auto: its own cls, no word
    assert "trained with" not in capsys.readouterr().err
    for _ in range(2):
        assert EmbeddingModel.load(str(folder), pooling="mean").settings.pooling == "mean"
    err = capsys.readouterr().err
    assert err.count("model.pooling mean") == 1 and "trained with cls pooling" in err
    EmbeddingModel.load(str(tiny_bert), pooling="cls")  # a plain transformers folder has no pooling of its own
    assert "trained with" not in capsys.readouterr().err


def test_a_cross_encoder_as_the_model_is_warned_about(tmp_path, tiny_bert, capsys):
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=1).save_pretrained(tmp_path / "ce")
    shutil.copy(tiny_bert / "tokenizer.json", tmp_path / "ce")
    shutil.copy(tiny_bert / "tokenizer_config.json", tmp_path / "ce")
    capsys.readouterr()
    assert EmbeddingModel.load(str(tmp_path / "ce")).dim == 32  # still loads (the encoder part)
    assert "BertForSequenceClassification (a cross-encoder" in capsys.readouterr().err
    EmbeddingModel.load(str(tiny_bert))
    assert "cross-encoder" not in capsys.readouterr().err


def test_an_older_save_with_the_transformer_in_a_subfolder(tmp_path, tiny_bert):
    """sentence-transformers before 0.3 kept the transformer in 0_BERT/ (or 0_Transformer/), its
    sentence_bert_config.json there too; hmcl reads it as sentence-transformers does, trains from it."""
    folder = build_st(tmp_path / "st", tiny_bert, pooling="cls", head=HEADS["dense-tanh"])
    ref = st_encode(folder)
    sub = folder / "0_BERT"
    sub.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json"):
        shutil.move(str(folder / name), sub / name)
    modules = _modules(folder)
    modules[0].update(path="0_BERT", type="sentence_transformers.models.BERT")
    (folder / "modules.json").write_text(json.dumps(modules))
    model = EmbeddingModel.load(str(folder))
    assert torch.allclose(model.encode(TEXTS), ref, atol=1e-5)

    from conftest import write_recipe
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_train

    recipe = load_recipe(write_recipe(tmp_path / "work", folder, train={"max_steps": 2, "eval_steps": 100}))
    prepare(recipe, progress=False)  # tokenises with the subfolder's tokenizer
    final = run_train(recipe)  # saved the current way: the transformer at the top
    assert (final / "config.json").is_file() and torch.allclose(EmbeddingModel.load(str(final)).encode(TEXTS),
                                                                st_encode(final), atol=1e-5)


PROMPTS = {"query": "Represent the question for retrieving answers: ", "document": "passage: "}


def build_st_prompted(folder: Path, backbone: Path, pooling: str) -> Path:
    """A sentence-transformers model whose pooling leaves its prompts out (INSTRUCTOR-style)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _st_modules()
        transformer = m.Transformer(str(backbone), max_seq_length=48)
        modules = [transformer, m.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling,
                                          include_prompt=False), m.Normalize()]
        st_lib.SentenceTransformer(modules=modules, device="cpu", prompts=PROMPTS).save(str(folder))
    return folder


@pytest.mark.parametrize("pooling", ["mean", "weightedmean", "max", "cls"])
def test_a_pooling_that_leaves_the_prompt_out_matches_sentence_transformers(tmp_path, tiny_bert, pooling):
    folder = build_st_prompted(tmp_path / "st", tiny_bert, pooling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = st_lib.SentenceTransformer(str(folder), device="cpu")
        ref_q = torch.tensor(st.encode(TEXTS, prompt_name="query"))
        ref_d = torch.tensor(st.encode(TEXTS, prompt_name="document"))
        with_prompt = torch.tensor(st.encode(TEXTS, prompt=PROMPTS["query"], prompt_name=None))
    model = EmbeddingModel.load(str(folder))
    assert not model.settings.include_prompt and model.settings.query_prompt == PROMPTS["query"]
    assert model.prompt_skip("query") == len(model.tokenizer(PROMPTS["query"])["input_ids"]) - 1  # [CLS] + prompt
    assert torch.allclose(model.encode(TEXTS, side="query"), ref_q, atol=1e-5)
    assert torch.allclose(model.encode(TEXTS, side="doc"), ref_d, atol=1e-5)
    assert torch.allclose(with_prompt, ref_q, atol=1e-6)  # (the same call, spelled the other way)
    model.save(tmp_path / "saved")  # written back with include_prompt false
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = st_lib.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
        assert torch.allclose(torch.tensor(again.encode(TEXTS, prompt_name="query")), ref_q, atol=1e-5)
    # the same model pooling over the prompt too gives other embeddings
    over = EmbeddingModel.load(str(folder), include_prompt=True)
    assert not torch.allclose(over.encode(TEXTS, side="query"), ref_q, atol=1e-3)


def test_prompt_left_out_by_hand_with_left_and_right_padding():
    from hmcl_cli.modeling.encoder import pooled_mask

    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    skip = torch.tensor([2, 3])
    for mask, first in ((right, 0), (left, 2)):
        keep = pooled_mask(mask, skip)
        # row 0: its 3rd and 4th real tokens; row 1: tokens 4-6 (positions 9, 10, 11)
        assert keep[0].tolist() == [int(first + 2 <= i < first + 4) for i in range(6)]
        assert pool(hidden, mask, "mean", keep).flatten().tolist() == [first + 2.5, 10.0]
        assert pool(hidden, mask, "cls", keep).flatten().tolist() == [first + 2.0, 9.0]
        # weighted mean: the kept tokens keep their place in the count (3rd, 4th real token)
        assert torch.allclose(pool(hidden, mask, "weighted_mean", keep).flatten(),
                              torch.tensor([(3 * (first + 2) + 4 * (first + 3)) / 7, (4 * 9 + 5 * 10 + 6 * 11) / 15]))


def test_segments_leave_the_prompt_out_of_every_segment(tmp_path, tiny_bert):
    """With segments, each segment holds the prompt and leaves it out of its pooling: a text that
    fits one segment is its plain encoding, and a long one the weighted average of its segments'
    (each pooled without the prompt)."""
    from hmcl_cli.modeling.segments import SegmentSettings, split_segments

    folder = build_st_prompted(tmp_path / "st", tiny_bert, "mean")
    model = EmbeddingModel.load(str(folder))
    plain = model.encode(TEXTS, side="query")
    model.use_segments(SegmentSettings(length=40))
    assert torch.allclose(model.encode(TEXTS, side="query"), plain, atol=1e-6)
    long_text = " ".join(TEXTS * 4)
    model.use_segments(SegmentSettings(length=20))
    segs = split_segments(model, [long_text], "query", model.segments)[0]
    assert len(segs) > 1
    model.settings.segment_length = 0  # each segment's ids encoded by hand
    skip = model.prompt_skip("query")
    parts = []
    for ids, n in segs:
        batch = model.pad([ids], pool_skip=skip)
        with torch.no_grad():
            parts.append((model.pooled(**batch)[0], n))
    by_hand = sum(e * n for e, n in parts) / sum(n for _, n in parts)
    model.settings.segment_length = 20
    assert torch.allclose(model.encode([long_text], side="query")[0],
                          torch.nn.functional.normalize(by_hand, dim=-1), atol=1e-5)


def test_onnx_export_of_a_model_that_leaves_its_prompt_out_is_refused(tmp_path, tiny_bert):
    from hmcl_cli.errors import ExportError, RecipeError
    from hmcl_cli.export.onnx import export_onnx
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import check_stage_packages

    pytest.importorskip("onnxruntime")
    folder = build_st_prompted(tmp_path / "st", tiny_bert, "mean")
    with pytest.raises(ExportError, match="leaves the prompt's tokens out") as e:
        export_onnx(folder, tmp_path / "onnx")
    assert "merged" in e.value.hint and not (tmp_path / "onnx").exists()
    recipe = load_recipe(data={"name": "x", "model": {"name_or_path": str(folder), "include_prompt": False,
                                                      "query_prompt": "q: "}, "export": {"formats": ["onnx"]}})
    with pytest.raises(RecipeError, match="include_prompt false"):
        check_stage_packages(recipe)  # before `hmcl run` trains


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_merged_export_of_a_plain_transformers_folder_is_a_sentence_transformers_folder(tmp_path, fixture, request):
    """A model folder without sentence-transformers files (a transformers save) is exported with
    the pooling hmcl encodes it with (last token and EOS for a decoder), so sentence-transformers
    gives hmcl's embeddings; before, the folder was copied as it was and sentence-transformers
    mean-pooled it."""
    import warnings

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from hmcl_cli.export.merged import VERIFY_TEXTS, export_merged
    from hmcl_cli.modeling.encoder import EmbeddingModel

    folder = request.getfixturevalue(fixture)
    assert not (folder / "modules.json").exists()
    export_merged(folder, tmp_path / "merged")
    assert (tmp_path / "merged" / "modules.json").is_file()
    ours = EmbeddingModel.load(str(folder)).encode(VERIFY_TEXTS[:4], side="doc").numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(VERIFY_TEXTS[:4])
    assert np.allclose(ours, theirs, atol=1e-5)
