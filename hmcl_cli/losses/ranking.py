"""Graded CoSENT: pairwise ranking of all labelled pairs in the batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch, prepared_for

if TYPE_CHECKING:
    from hmcl_cli.training.batching import AnchorTable


class GradedCoSENTLoss(nn.Module):
    """CoSENT-style ranking over every two labelled pairs of the batch with different grades.

    Inputs: a :class:`PairBatch`. Pair *p* must score a higher cosine than pair *q* when both
    carry a score (``*_scores`` in the data, ``use_scores``) and *p*'s is higher; otherwise
    when *p*'s level is higher. Loss::

        log(1 + sum_{p > q} exp(scale * (cos_q - cos_p + margin * (level_p - level_q))))

    (the margin only for pairs ordered by level). Scores come first because they are the finer
    judgement: SICK pairs graded by their NLI label carry a relatedness score, and a
    "contradiction" (negative) may be more related than a "neutral" (weak) pair. The margin
    grows with the level gap (positive vs negative needs a wider gap than positive vs weak).
    With ``margin=0`` and scores only, this is CoSENT (Su 2022); it is the term that makes
    cosine follow a graded / continuous similarity (STS-style data).

    ``pairs`` (``loss.ranking_pairs``, default ``"auto"`` as in the recipe) says which pairs take part:

    * ``"all"``: every labelled pair;
    * ``"scored"``: only pairs that carry a score; pairs without one (e.g. candidates mined with
      ``mine.scores: none``) are left to the other terms, as sentence-transformers' CoSENT + MNRL
      recipe leaves its mined negatives to MNRL;
    * ``"auto"``: a pair without a score is left out where its anchor's positive carries one:
      the data grades that query by score, and its unscored pairs are mined candidates
      (``mine.scores: none``; the miner only adds candidates to queries with a positive). Where
      the positive has no score (data graded by level only, whose scores if any come from the
      miner), or the anchor has no positive in the batch, every pair is kept and pairs without
      two scores are ordered by level. On scored data with unscored mined candidates this is
      ``"scored"``; on level-only data it is ``"all"`` whatever ``mine.scores`` says; a source
      without scores keeps its level ordering when merged with a scored one. With
      ``use_scores=False`` no pair is ordered by its score, so their presence decides nothing
      either: ``"auto"`` is ``"all"`` there.
    """

    def __init__(self, scale: float = 20.0, margin: float = 0.0, use_scores: bool = True, pairs: str = "auto"):
        super().__init__()
        if pairs not in ("all", "scored", "auto"):
            raise ValueError(f"pairs must be 'all', 'scored' or 'auto', not {pairs!r}")
        self.scale, self.margin, self.use_scores, self.pairs = scale, margin, use_scores, pairs

    def forward(self, b: PairBatch) -> torch.Tensor:
        order = self.prepare(b)
        if order is None:
            return b.anchors.sum() * 0.0
        unordered, gap = order
        s = b.pair_cosines().float()
        diff = self.scale * (s[None, :] - s[:, None])  # [p, q]: scale * (cos_q - cos_p)
        if gap is not None:
            diff = diff + gap * (self.scale * self.margin)
        diff = diff.masked_fill(unordered, float("-inf"))
        return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)

    def prepare(self, b: PairBatch) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """From the labels alone (built once per batch, :func:`prepared_for`): [P, P] True where
        pair *p* need not score above pair *q*, and with a ``margin`` the level gaps of the pairs
        ordered by level (uint8: bytes, not floats, kept through the step). None with fewer
        than two pairs."""
        return prepared_for(self, b, self._prepare)

    def _prepare(self, b: PairBatch) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        if b.pair_level.numel() < 2:
            return None
        lvl = b.pair_level.float()
        higher = lvl[:, None] > lvl[None, :]  # [p, q]: p above q
        # the margin's level gaps (none where two scores order the pair); uint8: levels are 0-2
        gap = (lvl[:, None] - lvl[None, :]).clamp(min=0).to(torch.uint8) if self.margin else None
        if self.use_scores:
            sc = b.pair_score.float()
            has = ~torch.isnan(sc)
            both = has[:, None] & has[None, :]
            higher = torch.where(both, sc[:, None] > sc[None, :], higher)
            gap = None if gap is None else gap.masked_fill(both, 0)
        if self.pairs == "scored" or (self.pairs == "auto" and self.use_scores):
            keep = ~torch.isnan(b.pair_score)
            if self.pairs == "auto":  # unscored pairs stay where their anchor's positive has no score
                scored_pos = (keep & (b.pair_level == 2)).float()
                has_scored_pos = torch.zeros(b.anchor_hash.size(0), device=keep.device).index_add_(
                    0, b.pair_anchor, scored_pos) > 0
                keep = keep | ~has_scored_pos[b.pair_anchor]
            higher = higher & keep[:, None] & keep[None, :]
        return ~higher, gap


def describe_ranking_pairs(anchors: "AnchorTable", pairs: str, use_scores: bool) -> Optional[str]:
    """One line for the start of training: what the ranking term does with the data's pairs
    that carry no score (None when every pair has one), counted by the training anchors'
    :meth:`~hmcl_cli.training.batching.AnchorTable.unscored_counts`. Under ``auto`` a pair
    counts as left out where every positive of its query has a score (the batch samples one
    positive per query).
    """
    total, unscored, left_out = anchors.unscored_counts()
    if unscored == 0:
        return None
    head = f"loss.ranking_pairs {pairs}: {unscored} of {total} pairs have no score;"
    if pairs == "all" or not use_scores:
        return f"{head} all are ordered by level" + ("" if use_scores else " (loss.use_scores false)")
    if pairs == "scored":
        return f"{head} all are left to the other terms"
    return (f"{head} {left_out} left to InfoNCE (their query's positive has a score), "
            f"{unscored - left_out} ordered by level")
