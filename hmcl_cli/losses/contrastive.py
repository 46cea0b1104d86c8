"""Graded InfoNCE: contrastive learning with positives and soft weak-positive targets."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch, prepared_for


class GradedInfoNCELoss(nn.Module):
    """InfoNCE over every candidate in the batch, with graded (soft) targets.

    Inputs: a :class:`PairBatch`. For anchor *i* the logits are ``cos(a_i, c_j) / temperature``
    over all candidates *j* of the (gathered) batch. The target distribution puts weight 1 on
    each positive of *i* and ``weak_weight`` on each weak-positive, normalised to sum 1; the
    anchor's labelled negatives and every other anchor's candidates act as negatives.
    A candidate whose text equals the anchor's text, or equals one of the anchor's targets
    without being labelled itself, is masked out (never a false negative). Anchors with no
    positive or weak candidate in the batch are skipped.

    Loss: mean over anchors of ``-sum_j t_ij log softmax_j(s_ij / T)``.

    With ``weak_weight=0`` this is multi-positive InfoNCE (MultipleNegativesRankingLoss with
    hard negatives), weak-positives contrasted like negatives — or, with ``ignore_weak``, left out
    of their anchor's softmax (``ignore_negatives``: the same for labelled negatives). With
    ``symmetric`` the loss is the mean of both directions: anchors pick their candidates, and each
    positive (or weighted weak) candidate picks its anchor among all anchors of the batch
    (MultipleNegativesSymmetricRankingLoss in sentence-transformers). At the optimum, positives
    outrank weak-positives by ``T*ln(1/w)``.

    References: van den Oord et al. 2018 (InfoNCE); Henderson et al. 2017 (in-batch negatives).
    """

    def __init__(self, temperature: float = 0.05, weak_weight: float = 0.3, learn_temperature: bool = False,
                 ignore_weak: bool = False, ignore_negatives: bool = False, symmetric: bool = False):
        super().__init__()
        self.symmetric = symmetric
        self.weak_weight = weak_weight
        self.ignore_weak = ignore_weak and weak_weight == 0
        self.ignore_negatives = ignore_negatives
        # learnt: a parameter (its log); fixed: a number, which divides in one operation
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature))) if learn_temperature else None
        self.fixed_temperature = max(temperature, 1e-3)

    @property
    def temperature(self) -> torch.Tensor | float:
        """The temperature: a tensor when learnt, else the number."""
        if self.log_temperature is None:
            return self.fixed_temperature
        return self.log_temperature.exp().clamp(min=1e-3)

    def targets_and_mask(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[A, C] target weights and the mask of candidates that are no negatives of an anchor."""
        p = self.prepare(b)
        return p["weight"], p["mask"]

    def prepare(self, b: PairBatch) -> dict[str, torch.Tensor]:
        """What the loss reads from the batch's labels alone, built once per batch
        (:func:`prepared_for`): the target weights and no-negative mask, and for each direction
        the scaled targets of :func:`_nll_labels`."""
        return prepared_for(self, b, self._prepare)

    def _prepare(self, b: PairBatch) -> dict[str, torch.Tensor]:
        weight, labelled, left_out = self._graded(b)
        mask = _not_negatives(weight, labelled, b.anchor_hash, b.candidate_hash)
        mask = mask if left_out is None else mask | left_out
        out = {"weight": weight, "mask": mask, "forward": _nll_labels(weight, mask)}
        if self.symmetric:  # candidate -> anchors: each target candidate picks its anchor(s) among all anchors
            mask_t = _not_negatives(weight.T, labelled.T, b.candidate_hash, b.anchor_hash)
            out["backward"] = _nll_labels(weight.T, mask_t if left_out is None else mask_t | left_out.T)
        return out

    def _graded(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """[A, C]: target weights, which pairs are labelled, and the labelled pairs left out of the
        softmax (``ignore_weak`` / ``ignore_negatives``; None when neither is set)."""
        A, C = b.anchor_hash.size(0), b.candidate_hash.size(0)
        dev = b.pair_level.device
        level = b.pair_level
        weight = torch.zeros(A, C, device=dev)
        weight[b.pair_anchor, b.pair_candidate] = (level == 2).float() + self.weak_weight * (level == 1).float()
        labelled = torch.zeros(A, C, dtype=torch.bool, device=dev)
        labelled[b.pair_anchor, b.pair_candidate] = True
        if not (self.ignore_weak or self.ignore_negatives):
            return weight, labelled, None
        left_out = torch.zeros(A, C, dtype=torch.bool, device=dev)
        left_out[b.pair_anchor, b.pair_candidate] = ((level == 1) & self.ignore_weak
                                                     | (level == 0) & self.ignore_negatives)
        return weight, labelled, left_out

    def forward(self, b: PairBatch) -> torch.Tensor:
        p = self.prepare(b)
        logits = (b.anchors @ b.candidates.T).float() / self.temperature
        loss = _scaled_nll(logits, p["forward"])
        if not self.symmetric:
            return loss
        return (loss + _scaled_nll(logits.T, p["backward"])) / 2


def _not_negatives(weight: torch.Tensor, labelled: torch.Tensor, row_hash: torch.Tensor,
                   col_hash: torch.Tensor) -> torch.Tensor:
    """[R, K]: unlabelled columns that must not be a row's negatives — copies of the text of one of
    its targets, or its own text (never a false negative)."""
    same_text = (col_hash[None, :] == col_hash[:, None]).float()  # [K, K]
    copies_of_target = ((weight > 0).float() @ same_text) > 0
    own_text = col_hash[None, :] == row_hash[:, None]
    return (copies_of_target | own_text) & ~labelled


def _row_targets(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's targets normalised to sum 1, the logits to mask, and which rows have a target.
    Rows without one keep finite logits (no all -inf row): their loss is 0, their gradient 0."""
    mass = weight.sum(1)
    valid = mass > 0
    return weight / torch.where(valid, mass, 1.0)[:, None], mask & valid[:, None], valid


def _target_log_softmax(logits: torch.Tensor, masked: torch.Tensor, no_target: torch.Tensor) -> torch.Tensor:
    """log_softmax over the unmasked logits, 0 where no target weighs it (the -inf * 0 guard)."""
    return torch.log_softmax(logits.masked_fill(masked, float("-inf")), dim=1).masked_fill(no_target, 0.0)


def _nll_labels(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labels' part of the mean of :func:`soft_target_nll` over the rows with a target, built
    once per batch: (the row targets divided by the number of rows with one; the logits to mask;
    where no target is). :func:`_scaled_nll` is the rest."""
    target, masked, valid = _row_targets(weight, mask)
    scaled = target / valid.sum().clamp(min=1)
    return scaled, masked, scaled == 0


def _scaled_nll(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    scaled, masked, no_target = labels
    return 0.0 - (scaled * _target_log_softmax(logits, masked, no_target)).sum()  # 0, not -0, without targets


def soft_target_nll(logits: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``-sum_j t_j log softmax_j`` over the unmasked logits, the targets being ``weight``
    normalised to sum 1. Returns (loss of every row, 0 where the row has no target weight; float
    0/1 mask of the rows that have one). No boolean indexing: the output shapes never depend on
    the data, so nothing waits for the GPU (see training/host_sync.py)."""
    target, masked, valid = _row_targets(weight, mask)
    return -(target * _target_log_softmax(logits, masked, target == 0)).sum(1), valid.to(logits.dtype)
