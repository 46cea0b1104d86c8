"""Token ids of many texts at once: the Rust tokenizer's batch call, on every core.

hmcl tokenises whole corpora (``hmcl mine`` and ``hmcl eval`` encode every distinct text once;
``hmcl train`` pre-tokenises its data), :data:`ENCODE_CHUNK` texts per call and the ids packed
into a :class:`TokenLists` a chunk at a time, so memory follows the ids (4 bytes a token), not
the tokenizer's encodings or Python lists of a whole corpus. Two costs dominate a call where the
model itself is fast (a GPU, short texts): the tokenizer's own work, which the ``tokenizers``
library spreads over the cores unless ``TOKENIZERS_PARALLELISM`` is false, and transformers'
conversion of each text's encoding into a dict of lists (offsets, masks, type ids), of which
hmcl keeps only the ids. ``token_ids`` skips the second and runs the first in parallel.

The CLI sets ``TOKENIZERS_PARALLELISM=false`` at start unless the user set it
(``quiet_forks``): a process that forks after a parallel tokenizer call (DataLoader workers,
``accelerate launch``) otherwise prints a warning and must turn parallelism off in the child.
``token_ids`` turns it on for its own call only, so forks stay quiet and safe; a user's explicit
``TOKENIZERS_PARALLELISM=false`` is honoured everywhere. Processes that ``hmcl train`` relaunches
on several GPUs inherit the CLI's false as if the user had set it, so each tokenises on one core
(they share the host and tokenise the same data at the same time).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np

_ENV = "TOKENIZERS_PARALLELISM"
ENCODE_CHUNK = 4096  # texts per call of the Rust tokenizer's batch encoding
PACK_CHUNK = 10000  # texts tokenised, then packed, at a time by TokenLists.tokenized
_own_default = False  # the "false" in the environment is hmcl's (quiet_forks), not the user's


def quiet_forks() -> None:
    """Make later forks quiet and safe: ``TOKENIZERS_PARALLELISM=false`` unless the user set it."""
    global _own_default
    if _ENV not in os.environ:
        os.environ[_ENV] = "false"
        _own_default = True


@contextmanager
def _parallel() -> Iterator[None]:
    if not _own_default or os.environ.get(_ENV) != "false":
        yield  # unset (the library's default: parallel) or the user's own choice
        return
    os.environ[_ENV] = "true"
    try:
        yield
    finally:
        os.environ[_ENV] = "false"


def token_ids(tokenizer: Any, texts: Sequence[str], max_length: Optional[int] = None,
              add_special_tokens: bool = True) -> list[list[int]]:
    """The ids ``tokenizer(texts, truncation=..., max_length=max_length, add_special_tokens=...)``
    gives, without padding (truncated to ``max_length`` on the tokenizer's truncation side when
    given). Fast tokenizers take the backend's batch call directly; others the plain call."""
    texts = list(texts)
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
        return tokenizer(texts, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
    backend = tokenizer.backend_tokenizer
    # the state transformers' own call sets on the backend before encoding (it resets it each call)
    if backend.padding is not None:
        backend.no_padding()
    if max_length:
        backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    elif backend.truncation is not None:
        backend.no_truncation()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if getattr(backend, "encode_special_tokens", split) != split:
        backend.encode_special_tokens = split
    out: list[list[int]] = []
    with _parallel():
        # a chunk at a time: the backend's encodings (offsets, token strings, masks) of a whole
        # corpus at once took gigabytes for a moment
        for start in range(0, len(texts), ENCODE_CHUNK):
            out.extend(e.ids for e in backend.encode_batch(texts[start:start + ENCODE_CHUNK],
                                                           add_special_tokens=add_special_tokens))
    return out


class TokenLists(Sequence):
    """Token id lists held as one flat int32 array and where each list ends: item ``i`` is a view
    of its ids (no copy). A Python list of lists takes ~36 bytes a token (an int object and a
    pointer each), this 4 (measured: 200,000 graded examples, 1.2M texts, the peak memory of `hmcl
    train` 4.26 GB -> 3.27 GB), and the token cache loads as two arrays."""

    def __init__(self, ids: np.ndarray, ends: np.ndarray):
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.ends = np.ascontiguousarray(ends, dtype=np.int64)
        self.starts = np.concatenate([np.zeros(1, np.int64), self.ends[:-1]])[:len(self.ends)]

    @classmethod
    def of(cls, lists: Sequence[Sequence[int]]) -> "TokenLists":
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        return cls(np.array(list(itertools.chain.from_iterable(lists)), dtype=np.int32), np.cumsum(lengths))

    @classmethod
    def tokenized(cls, tokenize: Callable[[list[str]], Sequence[Sequence[int]]], texts: Sequence[str],
                  chunk: Optional[int] = None, done: Optional[Callable[[int], Any]] = None) -> "TokenLists":
        """``tokenize(texts)`` a chunk at a time, each chunk packed before the next is made (the
        tokenizer's Python lists of a whole corpus at once take ~36 bytes a token); ``done(n)``
        after each chunk of ``n`` texts (a progress bar's update). ``chunk``: :data:`PACK_CHUNK`
        unless given."""
        chunk = chunk or PACK_CHUNK
        parts = []
        for start in range(0, len(texts), chunk):
            got = tokenize(list(texts[start:start + chunk]))
            parts.append(cls.of(got))
            if done is not None:
                done(len(got))
        return cls.joined(parts)

    @classmethod
    def joined(cls, parts: Sequence["TokenLists"]) -> "TokenLists":
        offsets = np.cumsum([0] + [p.ends[-1] if len(p) else 0 for p in parts[:-1]])
        return cls(np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int32),
                   np.concatenate([p.ends + o for p, o in zip(parts, offsets)]) if parts else np.zeros(0, np.int64))

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def take(self, order: np.ndarray) -> "TokenLists":
        """The lists in ``order`` (indices), as a new TokenLists."""
        order = np.asarray(order, dtype=np.int64)
        lengths = self.lengths()[order]
        ends = np.cumsum(lengths)
        # every id's position in self.ids: its list's start, plus its place in the list
        at = np.repeat(self.starts[order] - (ends - lengths), lengths) + np.arange(int(ends[-1]) if ends.size else 0)
        return TokenLists(self.ids[at], ends)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.starts[i]:self.ends[i]]

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenLists):
            return np.array_equal(self.ids, other.ids) and np.array_equal(self.ends, other.ends)
        return NotImplemented

    __hash__ = None
