"""token_ids: the ids transformers' tokenizer call gives, from the backend's parallel batch call."""

import os

import pytest

from conftest import build_tokenizer, has_minilm
from hmcl_cli.modeling import tokenizing
from hmcl_cli.modeling.tokenizing import token_ids

TEXTS = ["How long does a refund take?", "", "  spaced   out  ", "The [SEP] inside a text and [CLS] too",
         " ".join(["refund order shipping card"] * 40), "Ünïcödé ß and 中文 text", "x"]


def _tokenizers():
    out = [("bert", build_tokenizer("bert")), ("qwen3", build_tokenizer("qwen3"))]
    if has_minilm():
        from transformers import AutoTokenizer

        from hmcl_cli.modeling.resolve import resolve_model

        out.append(("minilm", AutoTokenizer.from_pretrained(str(resolve_model("sentence-transformers/all-MiniLM-L6-v2")))))
    return out


@pytest.mark.parametrize("name,tok", _tokenizers(), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_equal_the_tokenizer_call(name, tok, side, monkeypatch):
    tok.truncation_side = side
    for max_length in (None, 7, 64):
        for special in (True, False):
            kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
            want = tok(TEXTS, add_special_tokens=special, **kwargs)["input_ids"]
            assert token_ids(tok, TEXTS, max_length, add_special_tokens=special) == want, (max_length, special)
    # state a padded, truncated call of transformers leaves on the backend does not leak in
    tok(TEXTS, padding="max_length", truncation=True, max_length=5)
    assert token_ids(tok, TEXTS) == tok(TEXTS)["input_ids"]
    assert max(map(len, token_ids(tok, TEXTS))) > 5
    assert token_ids(tok, []) == []
    # encoded a chunk at a time (the backend's encodings of a whole corpus at once took gigabytes)
    monkeypatch.setattr(tokenizing, "ENCODE_CHUNK", 3)
    assert token_ids(tok, TEXTS, 7) == tok(TEXTS, truncation=True, max_length=7)["input_ids"]


def test_parallel_only_inside_the_call_and_never_against_the_user(monkeypatch):
    seen = []
    monkeypatch.setattr(tokenizing, "_own_default", False)
    # hmcl's own default: false for forks, true inside token_ids' encode call
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    tokenizing.quiet_forks()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    with tokenizing._parallel():
        seen.append(os.environ["TOKENIZERS_PARALLELISM"])
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    # restored on an error too
    with pytest.raises(RuntimeError), tokenizing._parallel():
        raise RuntimeError
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    # the user's own false is kept everywhere
    monkeypatch.setattr(tokenizing, "_own_default", False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    tokenizing.quiet_forks()
    with tokenizing._parallel():
        seen.append(os.environ["TOKENIZERS_PARALLELISM"])
    assert seen == ["true", "false"]


def test_a_tokenizer_without_a_rust_backend_takes_its_own_call():
    calls = []

    class Plain:  # no is_fast / backend_tokenizer: e.g. a sentencepiece-only tokenizer
        def __call__(self, texts, add_special_tokens=True, **kwargs):
            calls.append((list(texts), add_special_tokens, kwargs))
            return {"input_ids": [[len(t)] for t in texts]}

    assert token_ids(Plain(), ["ab", "cde"], 5, add_special_tokens=False) == [[2], [3]]
    assert token_ids(Plain(), ["ab"]) == [[2]]
    assert calls == [(["ab", "cde"], False, {"truncation": True, "max_length": 5}), (["ab"], True, {})]


def test_encode_tokenises_a_chunk_at_a_time_and_keeps_the_ids_packed(tiny_bert, monkeypatch):
    """model.encode tokenised every distinct text at once and held the ids as Python lists (~36
    bytes a token): `hmcl mine` of 600,000 passages (~65 tokens) peaked at 9.1 GB, 3.5 GB now.
    Here 20,000 texts of ~30 tokens (lists at once: ~21 MB): the traced peak stays far below, and
    the embeddings are those of one call per text."""
    import random
    import tracemalloc

    import torch

    from hmcl_cli.modeling.encoder import EmbeddingModel

    model = EmbeddingModel.load(str(tiny_bert))
    rng = random.Random(0)
    words = ["refund", "card", "ship", "order", "late", "parcel", "bank", "fee", "help", "account", "where"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))) + f" {i}" for i in range(20000)]
    monkeypatch.setattr(tokenizing, "PACK_CHUNK", 1000)
    tracemalloc.start()
    try:
        emb = model.encode(texts, batch_size=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12e6, peak
    picked = [0, 1, 999, 1000, 1001, 7777, 19999]
    one = torch.cat([model.encode([texts[i]]) for i in picked])
    assert torch.allclose(emb[picked], one, atol=1e-5)
