"""Pair classification into the three levels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hmcl_cli.losses.batch import PairBatch, prepared_for


class OrdinalClassificationLoss(nn.Module):
    """Ordinal classification of each labelled pair on its cosine similarity.

    Inputs: a :class:`PairBatch`; labels are the pair levels (0 neg, 1 weak, 2 pos).
    Model: ``P(level >= k) = sigmoid((cos - theta_k) / T)`` for k = 1, 2, with learnable
    thresholds ``theta_1 < theta_2`` (kept ordered by construction). Loss: the mean over
    pairs of the two binary cross-entropies. Because it acts on the cosine itself, it
    shapes the same geometry that retrieval uses at inference (no head to discard).

    Use when the data has three levels and you want cosine bands with meaning
    (e.g. thresholds for "relevant" / "related" at serving time).
    """

    def __init__(self, temperature: float = 0.05, init_thresholds: tuple[float, float] = (0.4, 0.7)):
        super().__init__()
        lo, hi = init_thresholds
        self.temperature = temperature
        self.theta_low = nn.Parameter(torch.tensor(float(lo)))
        # softplus^-1(hi - lo) keeps theta_high above theta_low
        self.gap_raw = nn.Parameter(torch.log(torch.expm1(torch.tensor(float(hi - lo)))))

    def thresholds(self) -> torch.Tensor:
        return torch.stack([self.theta_low, self.theta_low + F.softplus(self.gap_raw)])

    def forward(self, b: PairBatch) -> torch.Tensor:
        if b.pair_level.numel() == 0:
            return b.anchors.sum() * 0.0
        s = b.pair_cosines().float()
        logits = (s[:, None] - self.thresholds()[None, :]) / self.temperature  # [P, 2]
        targets = prepared_for(self, b, self._prepare)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()

    def _prepare(self, b: PairBatch) -> torch.Tensor:
        """[P, 2] targets of the two binary decisions (level >= 1, level >= 2)."""
        return torch.stack([b.pair_level >= 1, b.pair_level >= 2], dim=1).float()


class LinearPairClassificationLoss(nn.Module):
    """SBERT-style softmax classifier on ``[u, v, |u-v|, u*v]`` into the three levels.

    Inputs: a :class:`PairBatch`; labels are the pair levels. The linear head is trained with
    the model and discarded at export. Reference: Reimers & Gurevych 2019 (SoftmaxLoss).
    """

    def __init__(self, dim: int, num_levels: int = 3):
        super().__init__()
        self.head = nn.Linear(4 * dim, num_levels)

    def forward(self, b: PairBatch) -> torch.Tensor:
        if b.pair_level.numel() == 0:
            return b.anchors.sum() * 0.0
        u = b.anchors[b.pair_anchor].float()
        v = b.candidates[b.pair_candidate].float()
        feats = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        return F.cross_entropy(self.head(feats), b.pair_level.long())
