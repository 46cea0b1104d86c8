"""Token ids of many texts at once: the Rust tokenizer's batch call, on every core.

hmcl tokenises whole corpora in one call (``hmcl mine`` and ``hmcl eval`` encode every distinct
text once; ``hmcl train`` pre-tokenises its data). Two costs dominate such a call where the
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

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

_ENV = "TOKENIZERS_PARALLELISM"
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
    with _parallel():
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    return [e.ids for e in encodings]
