"""The HMCL objective: weighted sum of contrastive, classification and ranking terms."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch
from hmcl_cli.losses.classification import LinearPairClassificationLoss, OrdinalClassificationLoss
from hmcl_cli.losses.contrastive import GradedInfoNCELoss
from hmcl_cli.losses.local import SegmentInfoNCELoss
from hmcl_cli.losses.ranking import GradedCoSENTLoss


def matryoshka_too_wide(dims, dim: int) -> Optional[str]:
    """What is wrong with matryoshka sizes ``dims`` for embeddings of ``dim`` values (each must be
    smaller), or None: the one rule training and the checks before it (``stages.check_model``) share."""
    too_wide = [d for d in dims if d >= dim]
    return f"loss.matryoshka_dims {too_wide} must be smaller than the embedding size {dim}" if too_wide else None


class HMCLLoss(nn.Module):
    """Hierarchical Multilevel Contrastive Learning loss.

    ``L = w_con * L_con + w_cls * L_cls + w_rank * L_rank (+ w_local * L_local)`` on one
    :class:`PairBatch`:

    * ``L_con`` — :class:`GradedInfoNCELoss` (positives, soft weak-positives, in-batch negatives);
    * ``L_cls`` — :class:`OrdinalClassificationLoss` (default) or
      :class:`LinearPairClassificationLoss` (``classifier="linear"``);
    * ``L_rank`` — :class:`GradedCoSENTLoss` over all pairs of pairs with different grades;
    * ``L_local`` — :class:`SegmentInfoNCELoss` on segment embeddings (only when texts are
      encoded as segments; weight 0 by default).

    Matryoshka (``matryoshka_dims``): the same terms again on the embeddings cut to each size
    ``d`` (first ``d`` dimensions, re-normalised), ``L + sum_d w_d * L(d)`` (``w_d`` = 1 / number of
    sizes unless ``matryoshka_weights`` says otherwise), as in Kusupati et al.
    2022 (Matryoshka Representation Learning), so the trained embedding can be cut to those sizes.
    The local term and the linear classifier (its head is sized for the full embedding) apply
    to the full size only.

    A weight of 0 removes its term entirely (it is not computed), so single-objective
    baselines — InfoNCE only, CoSENT only — are this module with other weights.
    ``forward`` returns ``(total, parts)`` where parts holds each weighted-off term detached.
    """

    def __init__(self, cfg: Any, dim: int):
        super().__init__()
        self.w_con, self.w_cls, self.w_rank = cfg.contrastive_weight, cfg.classification_weight, cfg.ranking_weight
        self.w_local = cfg.local_weight
        if self.w_con + self.w_cls + self.w_rank + self.w_local <= 0:
            raise ValueError("all loss weights are 0: nothing to train")
        self.contrastive = GradedInfoNCELoss(cfg.temperature, cfg.weak_weight, cfg.learn_temperature, cfg.ignore_weak,
                                             cfg.ignore_negatives, cfg.symmetric)
        self.classification = (
            OrdinalClassificationLoss(cfg.classification_temperature)
            if cfg.classifier == "ordinal" else LinearPairClassificationLoss(dim)
        )
        self.ranking = GradedCoSENTLoss(cfg.ranking_scale, cfg.ranking_margin, cfg.use_scores,
                                        cfg.ranking_pairs)
        self.local = SegmentInfoNCELoss(self.contrastive)
        dims = list(cfg.matryoshka_dims)
        # by default the cut sizes together weigh as much as the full size (benchmarks/RESULTS.md)
        weights = cfg.matryoshka_weights or [1.0 / max(1, len(dims))] * len(dims)
        wide = matryoshka_too_wide(dims, dim)
        if wide:
            raise ValueError(wide)
        self.matryoshka = [(d, w) for d, w in zip(dims, weights) if w > 0]

    def forward(self, b: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = self._terms(b, full_size=True)
        if self.matryoshka:
            cut = _weighted_sum((weight, self._terms(b.truncated(d), full_size=False)[0]) for d, weight in self.matryoshka)
            parts["matryoshka"] = cut.detach()
            total = total + cut
        return total, parts

    def _terms(self, b: PairBatch, full_size: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        linear = isinstance(self.classification, LinearPairClassificationLoss)
        weighted = []
        for name, weight, term in (("contrastive", self.w_con, self.contrastive),
                                   ("classification", self.w_cls if full_size or not linear else 0.0, self.classification),
                                   ("ranking", self.w_rank, self.ranking),
                                   ("local", self.w_local if full_size else 0.0, self.local)):
            if weight > 0:
                value = term(b)
                parts[name] = value.detach()
                weighted.append((weight, value))
        if not weighted:  # only the full size can have a term the cut sizes lack, so this is a cut
            return b.anchors.new_zeros((), dtype=torch.float32), parts
        return _weighted_sum(weighted), parts


def _weighted_sum(terms) -> torch.Tensor:
    """``sum(weight * value)`` without a multiplication by 1 or a zero to start from (on a GPU
    each is a kernel launch per step)."""
    total = None
    for weight, value in terms:
        value = value if weight == 1 else weight * value
        total = value if total is None else total + value
    return total
