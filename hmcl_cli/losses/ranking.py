"""Graded CoSENT: pairwise ranking of all labelled pairs in the batch."""

from __future__ import annotations

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch


class GradedCoSENTLoss(nn.Module):
    """CoSENT-style ranking over every two labelled pairs of the batch with different grades.

    Inputs: a :class:`PairBatch`. Pair *p* must score a higher cosine than pair *q* when its
    level is higher, or (``use_scores``) when the levels are equal and both carry a score
    and *p*'s is higher. Loss::

        log(1 + sum_{p > q} exp(scale * (cos_q - cos_p + margin * (level_p - level_q))))

    The margin grows with the level gap (positive vs negative needs a wider gap than
    positive vs weak). With ``margin=0`` and scores only, this is CoSENT (Su 2022); it is the
    term that makes cosine follow a graded / continuous similarity (STS-style data).
    """

    def __init__(self, scale: float = 20.0, margin: float = 0.0, use_scores: bool = True):
        super().__init__()
        self.scale, self.margin, self.use_scores = scale, margin, use_scores

    def forward(self, b: PairBatch) -> torch.Tensor:
        if b.pair_level.numel() < 2:
            return b.anchors.sum() * 0.0
        s = b.pair_cosines().float()
        lvl = b.pair_level.float()
        higher = lvl[:, None] > lvl[None, :]  # [p, q]: p above q
        if self.use_scores:
            sc = b.pair_score.float()
            both = ~torch.isnan(sc)[:, None] & ~torch.isnan(sc)[None, :]
            higher = higher | ((lvl[:, None] == lvl[None, :]) & both & (sc[:, None] > sc[None, :]))
        gap = (lvl[:, None] - lvl[None, :]).clamp(min=0)
        diff = self.scale * (s[None, :] - s[:, None] + self.margin * gap)  # cos_q - cos_p
        diff = diff.masked_fill(~higher, float("-inf"))
        zero = torch.zeros(1, device=s.device)
        return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)
