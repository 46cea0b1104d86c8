"""Local (segment-level) contrastive term for texts encoded as segments (HiCL)."""

from __future__ import annotations

import torch
from torch import nn

from hmcl_cli.losses.batch import PairBatch
from hmcl_cli.losses.contrastive import GradedInfoNCELoss, soft_target_nll


class SegmentInfoNCELoss(nn.Module):
    """InfoNCE between the *segments* of anchors and the segments of candidates.

    Inputs: a :class:`PairBatch` with segment fields (``anchor_segments`` [Sa, D] and
    ``candidate_segments`` [Sc, D], L2-normalised, with the text each segment belongs to in
    ``anchor_segment_owner`` / ``candidate_segment_owner``); the batch comes from training with
    ``model.segments``. Labels are the text-level pair levels.

    For each anchor segment the logits are ``cos(segment, candidate segment) / T`` over every
    candidate segment of the (gathered) batch. Targets follow the text-level graded targets of
    :class:`GradedInfoNCELoss` (positive 1, weak-positive ``weak_weight``), each candidate's target
    spread evenly over its segments, so a positive split into four segments weighs what a
    one-segment positive weighs; segments of other texts are negatives; segments of a candidate
    whose text is the anchor's own (or a copy of one of its targets) are masked, so segments of one
    sequence are never each other's negatives. The loss is averaged over an anchor's segments,
    then over anchors (a long anchor counts once, not once per segment); anchors without a
    positive or weak candidate are skipped.

    Use with a small weight beside the sequence-level terms when texts are longer than one
    segment: it makes every part of a long passage align with what it should match, not only
    their average (HiCL, Wu et al. 2023, arXiv 2310.09720, uses a lower weight on the local term).
    For texts that fit one segment it equals the sequence-level contrastive term.
    """

    def __init__(self, contrastive: GradedInfoNCELoss):
        super().__init__()
        self.contrastive = contrastive  # shares temperature, weak weight and masking rules

    def forward(self, b: PairBatch) -> torch.Tensor:
        if b.anchor_segments is None or b.candidate_segments is None:
            raise ValueError("the local term needs segment embeddings (train with model.segments)")
        weight, mask = self.contrastive.targets_and_mask(b)  # [A, C] text level
        oa, oc = b.anchor_segment_owner, b.candidate_segment_owner
        ones = torch.ones_like(oc, dtype=weight.dtype)
        per_text = weight.new_zeros(b.candidates.size(0)).index_add_(0, oc, ones)  # segments per candidate
        seg_weight = weight[oa][:, oc] / per_text[oc][None, :]  # [Sa, Sc]
        seg_mask = mask[oa][:, oc]
        logits = (b.anchor_segments @ b.candidate_segments.T).float() / self.contrastive.temperature
        row_loss, valid = soft_target_nll(logits, seg_weight, seg_mask)  # per anchor segment; valid: has a target
        n_anchor = b.anchors.size(0)
        total = row_loss.new_zeros(n_anchor).index_add_(0, oa, row_loss * valid)
        count = row_loss.new_zeros(n_anchor).index_add_(0, oa, valid)
        has = (count > 0).to(row_loss.dtype)
        per_anchor = total / count.clamp(min=1)  # mean over an anchor's segments
        return (per_anchor * has).sum() / has.sum().clamp(min=1)
