"""The embedded batch all HMCL losses read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch.nn.functional import normalize


@dataclass
class PairBatch:
    """Embeddings of one (possibly cross-device) batch and its labelled pairs.

    Attributes:
        anchors: [A, D] anchor (query) embeddings, L2-normalised.
        candidates: [C, D] embeddings of the distinct candidate texts, L2-normalised.
        pair_anchor, pair_candidate: [P] indices of each labelled (anchor, candidate) pair.
        pair_level: [P] levels: 2 positive, 1 weak-positive, 0 negative.
        pair_score: [P] optional finer score per pair (NaN where absent).
        anchor_hash, candidate_hash: [A], [C] int64 hashes of the texts, so identical texts
            are never used as each other's negatives.
        anchor_segments, candidate_segments: [Sa, D], [Sc, D] L2-normalised segment embeddings
            when texts are encoded as segments (``model.segments``), else None.
        anchor_segment_owner, candidate_segment_owner: [Sa], [Sc] the anchor / candidate row each
            segment belongs to.
        prepared: what the loss terms built from the labels alone (targets, masks), by term
            (:func:`prepared_for`): built once per step, shared by the batch's matryoshka cuts.
    """

    anchors: torch.Tensor
    candidates: torch.Tensor
    pair_anchor: torch.Tensor
    pair_candidate: torch.Tensor
    pair_level: torch.Tensor
    pair_score: torch.Tensor
    anchor_hash: torch.Tensor
    candidate_hash: torch.Tensor
    anchor_segments: Optional[torch.Tensor] = None
    anchor_segment_owner: Optional[torch.Tensor] = None
    candidate_segments: Optional[torch.Tensor] = None
    candidate_segment_owner: Optional[torch.Tensor] = None
    prepared: dict = field(default_factory=dict, repr=False, compare=False)
    _cosines: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    def pair_cosines(self) -> torch.Tensor:
        """Cosine similarity of each labelled pair, [P] (computed once: the classification and
        ranking terms both read it)."""
        if self._cosines is None:
            self._cosines = (self.anchors[self.pair_anchor] * self.candidates[self.pair_candidate]).sum(-1)
        return self._cosines

    def truncated(self, dim: int) -> "PairBatch":
        """The batch with every embedding cut to its first ``dim`` dimensions and re-normalised
        (a matryoshka size); segment embeddings are left out (the local term is full-size only).
        The labels' prepared tensors are shared: they do not depend on the embeddings."""
        return replace(self, anchors=normalize(self.anchors[:, :dim], dim=-1),
                       candidates=normalize(self.candidates[:, :dim], dim=-1),
                       anchor_segments=None, anchor_segment_owner=None,
                       candidate_segments=None, candidate_segment_owner=None)


def prepared_for(term: Any, b: PairBatch, build: Callable[[PairBatch], Any]) -> Any:
    """``build(b)`` (what ``term`` reads from the batch's labels alone), built on the first call
    for this batch and its matryoshka cuts and kept in ``b.prepared``. On a GPU each of those
    small tensor operations is a kernel launch; building them once saves that many per cut size."""
    if term not in b.prepared:  # keyed by the object itself (modules hash by identity)
        b.prepared[term] = build(b)
    return b.prepared[term]
