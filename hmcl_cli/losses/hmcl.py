"""The HMCL objective: weighted sum of contrastive, classification and ranking terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch
from hmcl_cli.losses.classification import LinearPairClassificationLoss, OrdinalClassificationLoss
from hmcl_cli.losses.contrastive import GradedInfoNCELoss
from hmcl_cli.losses.local import SegmentInfoNCELoss
from hmcl_cli.losses.ranking import GradedCoSENTLoss


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

    def forward(self, b: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = b.anchors.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name, weight, term in (("contrastive", self.w_con, self.contrastive),
                                   ("classification", self.w_cls, self.classification),
                                   ("ranking", self.w_rank, self.ranking),
                                   ("local", self.w_local, self.local)):
            if weight > 0:
                value = term(b)
                parts[name] = value.detach()
                total = total + weight * value
        return total, parts
