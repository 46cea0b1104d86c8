"""Hierarchical segment encoding of long texts (HiCL, arXiv 2310.09720).

A text is tokenised once (up to the side's max length, e.g. 2048 tokens), its content split
into windows of ``length`` tokens (special tokens and the prompt included in each window, an
``overlap`` of tokens shared by neighbours), each window encoded as its own sequence (attention
costs O(length^2) per window instead of O(n^2)), and the windows' pooled embeddings averaged
into the text's embedding — weighted by each window's token count (``weighted``) or not
(``mean``) — then L2-normalised. A text that fits in one window is encoded exactly as without
segments. Training uses the same split (``TrainData``) and the same :func:`aggregate`, inside
the loss graph (``HMCLTrainer._texts``).

Python use::

    model.use_segments(SegmentSettings(length=512, overlap=64))   # saved with model.save()
    emb = model.encode(long_texts)                               # segmented automatically
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hmcl_cli.modeling.tokenizing import token_ids


@dataclass
class SegmentSettings:
    length: int
    overlap: int = 0
    pooling: str = "weighted"


def special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text's content."""
    probe = "hello"
    inner = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(inner) + 1):
        if full[start:start + len(inner)] == inner:
            return list(full[:start]), list(full[start + len(inner):])
    return [], []


_MERGE_SLACK = 8  # tokens a prompt merging into a text's first word could save, with room to spare


def _segment_frame(tokenizer: Any, prompt: str, append_eos: bool) -> tuple[list[int], list[int], list[int], bool]:
    """What every segment repeats around its content: special prefix, special suffix, the
    prompt's ids, and whether an EOS is appended after the suffix."""
    prefix, suffix = special_wrap(tokenizer)
    eos = tokenizer.eos_token_id
    add_eos = bool(append_eos and eos is not None and (not suffix or suffix[-1] != eos))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return prefix, suffix, prompt_ids, add_eos


def segment_overhead(tokenizer: Any, prompt: str, append_eos: bool) -> int:
    """Tokens each segment spends on special tokens, the prompt and EOS (not on content)."""
    return _frame_length(_segment_frame(tokenizer, prompt, append_eos))


def _frame_length(frame: tuple[list[int], list[int], list[int], bool]) -> int:
    prefix, suffix, prompt_ids, add_eos = frame
    return len(prefix) + len(suffix) + len(prompt_ids) + int(add_eos)


def split_segments(model: Any, texts: Sequence[str], side: str,
                   seg: SegmentSettings) -> list[list[tuple[list[int], int]]]:
    """Per text, its segments as (token ids, content tokens): ids carry the special tokens, the
    prompt and EOS as the model's plain tokenisation has them."""
    s = model.settings
    prompt = s.query_prompt if side == "query" else s.doc_prompt
    max_total = s.query_max_length if side == "query" else s.doc_max_length
    frame = _segment_frame(model.tokenizer, prompt, s.append_eos)
    prefix, suffix, prompt_ids, add_eos = frame
    eos = model.tokenizer.eos_token_id
    overhead = _frame_length(frame)  # tokens every segment repeats
    budget = seg.length - overhead
    if budget <= seg.overlap:
        raise ValueError(f"model.segments.length {seg.length} leaves {budget} content tokens per segment after "
                         f"special tokens and the prompt; it must exceed the overlap ({seg.overlap})")
    content = token_ids(model.tokenizer, texts, max(1, max_total - overhead), add_special_tokens=False)
    # a text that fits one segment keeps exactly its plain ids (a prompt may merge with the text's
    # first token, so they are not rebuilt from `content`); only texts near or under one segment
    # are tokenised a second time to find out (a merge shortens a text by a token or two)
    near = [i for i, ids in enumerate(content) if len(ids) + overhead <= seg.length + _MERGE_SLACK]
    plain = dict(zip(near, model.tokenize([texts[i] for i in near], side))) if near else {}
    out = []
    for i, ids in enumerate(content):
        whole = plain.get(i)
        if whole is not None and len(whole) <= seg.length:
            out.append([(whole, max(1, len(whole) - overhead))])
            continue
        segments = []
        start = 0
        while True:
            window = ids[start:start + budget]
            seq = prefix + prompt_ids + window + suffix
            segments.append((seq + [eos] if add_eos else seq, len(window)))
            if start + budget >= len(ids):
                break
            start += budget - seg.overlap
        out.append(segments)
    return out


def aggregate(segment_emb: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor, n_texts: int) -> torch.Tensor:
    """Weighted average of segment embeddings [S, D] per owning text -> [n_texts, D]."""
    w = weight.to(segment_emb.dtype).unsqueeze(1)
    total = torch.zeros((n_texts, segment_emb.size(1)), dtype=segment_emb.dtype, device=segment_emb.device)
    total.index_add_(0, owner, segment_emb * w)
    norm = torch.zeros((n_texts, 1), dtype=segment_emb.dtype, device=segment_emb.device)
    norm.index_add_(0, owner, w)
    return total / norm.clamp(min=1e-9)


@torch.no_grad()
def encode_segmented(model: Any, texts: Sequence[str], side: str, seg: SegmentSettings, batch_size: int) -> torch.Tensor:
    """Embeddings [len(texts), D] (float32, on the host) of segmented texts."""
    from hmcl_cli.modeling.encoder import HostRows, autocast_for, to_device

    per_text = split_segments(model, texts, side, seg)
    flat = [(t, ids, n) for t, segs in enumerate(per_text) for ids, n in segs]
    order = sorted(range(len(flat)), key=lambda i: -len(flat[i][1]))
    dev = model.device
    seg_emb = HostRows(len(flat), model.dim)  # segments reach the host a block at a time, as in encode
    skip = model.prompt_skip(side)  # each segment holds the prompt
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        host = model.pad([flat[i][1] for i in idx], pool_skip=skip)
        batch = to_device(host, dev)
        with autocast_for(dev):  # (host tensors moved without waiting for the GPU, as in encode)
            seg_emb.add(idx, model.pooled(**batch, n_real=int(host["attention_mask"].numpy().sum())))
    owner = torch.tensor([t for t, _, _ in flat])
    weight = torch.tensor([max(n, 1) if seg.pooling == "weighted" else 1 for _, _, n in flat])
    emb = aggregate(seg_emb.collect(), owner, weight, len(texts))
    return torch.nn.functional.normalize(emb, dim=-1) if model.settings.normalize else emb
