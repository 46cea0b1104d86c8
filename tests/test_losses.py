import math

import pytest
import torch
from torch.nn import functional as F

from hmcl_cli.losses import GradedCoSENTLoss, GradedInfoNCELoss, HMCLLoss, OrdinalClassificationLoss, PairBatch
from hmcl_cli.losses.ranking import describe_ranking_pairs
from hmcl_cli.recipe import LossConfig


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def small_batch():
    # anchor 0: candidate 0 pos, 1 weak, 2 neg; anchor 1: candidate 3 pos
    a = unit([1.0, 0.0], [0.0, 1.0])
    c = unit([1.0, 0.2], [1.0, 1.0], [0.2, 1.0], [0.1, 1.0])
    return PairBatch(a, c, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 1, 0, 2]),
                     torch.tensor([float("nan")] * 4), torch.tensor([10, 11]), torch.tensor([20, 21, 22, 23]))


def test_infonce_matches_hand_computation():
    b = small_batch()
    T, w = 0.1, 0.5
    sim = (b.anchors @ b.candidates.T) / T
    # anchor 0: targets pos 1, weak 0.5 -> normalised (2/3, 1/3)
    lp0 = torch.log_softmax(sim[0], 0)
    l0 = -(2 / 3 * lp0[0] + 1 / 3 * lp0[1])
    l1 = -torch.log_softmax(sim[1], 0)[3]
    got = GradedInfoNCELoss(T, w)(b)
    assert torch.allclose(got, (l0 + l1) / 2, atol=1e-6)


def test_infonce_ignore_weak_leaves_weak_positives_out_of_the_softmax():
    b = small_batch()
    T = 0.1
    sim = (b.anchors @ b.candidates.T) / T
    keep0 = [0, 2, 3]  # anchor 0's weak candidate 1 is neither target nor negative
    l0 = -torch.log_softmax(sim[0, keep0], 0)[0]
    l1 = -torch.log_softmax(sim[1], 0)[3]  # candidate 1 is anchor 0's weak, not anchor 1's: still a negative
    assert torch.allclose(GradedInfoNCELoss(T, 0.0, ignore_weak=True)(b), (l0 + l1) / 2, atol=1e-6)
    as_negative = -(torch.log_softmax(sim[0], 0)[0] + torch.log_softmax(sim[1], 0)[3]) / 2
    assert torch.allclose(GradedInfoNCELoss(T, 0.0)(b), as_negative, atol=1e-6)
    # with a soft-target weight the weak candidate stays a target: ignore_weak changes nothing
    assert torch.allclose(GradedInfoNCELoss(T, 0.5, ignore_weak=True)(b), GradedInfoNCELoss(T, 0.5)(b))


def test_infonce_ignore_negatives_leaves_labelled_negatives_out_of_their_anchors_softmax():
    b = small_batch()
    T = 0.1
    sim = (b.anchors @ b.candidates.T) / T
    l1 = -torch.log_softmax(sim[1], 0)[3]  # candidate 2 is anchor 0's negative, not anchor 1's: still a negative
    keep0 = [0, 1, 3]  # anchor 0's labelled negative (candidate 2) is neither target nor negative
    got = GradedInfoNCELoss(T, 0.0, ignore_negatives=True)(b)
    assert torch.allclose(got, (-torch.log_softmax(sim[0, keep0], 0)[0] + l1) / 2, atol=1e-6)
    both = GradedInfoNCELoss(T, 0.0, ignore_weak=True, ignore_negatives=True)(b)
    assert torch.allclose(both, (-torch.log_softmax(sim[0, [0, 3]], 0)[0] + l1) / 2, atol=1e-6)


def test_symmetric_infonce_adds_candidates_picking_their_anchor():
    b = small_batch()
    T = 0.1
    sim = (b.anchors @ b.candidates.T) / T
    forward = GradedInfoNCELoss(T, 0.0)(b)
    # candidate 0 (anchor 0's positive) and candidate 3 (anchor 1's) each pick their anchor among both
    backward = -(torch.log_softmax(sim[:, 0], 0)[0] + torch.log_softmax(sim[:, 3], 0)[1]) / 2
    assert torch.allclose(GradedInfoNCELoss(T, 0.0, symmetric=True)(b), (forward + backward) / 2, atol=1e-6)
    # an anchor with the candidate's own text is not its negative
    same = PairBatch(b.anchors, b.candidates, b.pair_anchor, b.pair_candidate, b.pair_level, b.pair_score,
                     torch.tensor([23, 11]), b.candidate_hash)  # anchor 0's text == candidate 3's
    forward = GradedInfoNCELoss(T, 0.0)(same)
    backward = -(torch.log_softmax(sim[:, 0], 0)[0] + 0.0) / 2  # candidate 3 sees only its anchor 1
    assert torch.allclose(GradedInfoNCELoss(T, 0.0, symmetric=True)(same), (forward + backward) / 2, atol=1e-6)


def test_infonce_masks_identical_texts():
    b = small_batch()
    b.candidate_hash = torch.tensor([20, 21, 22, 10])  # candidate 3 has anchor 0's text, unlabelled for anchor 0
    loss = GradedInfoNCELoss(0.1, 0.5)
    weight, mask = loss.targets_and_mask(b)
    assert mask[0, 3] and not mask[1, 3] and not mask[0, 2]
    sim = (b.anchors @ b.candidates.T) / 0.1
    lp0 = torch.log_softmax(sim[0, :3], 0)  # column 3 removed for anchor 0
    l0 = -(2 / 3 * lp0[0] + 1 / 3 * lp0[1])
    l1 = -torch.log_softmax(sim[1], 0)[3]
    assert torch.allclose(loss(b), (l0 + l1) / 2, atol=1e-6)


def test_ordinal_classification_matches_hand_computation():
    b = small_batch()
    loss = OrdinalClassificationLoss(temperature=0.1, init_thresholds=(0.3, 0.8))
    s = b.pair_cosines()
    expected = 0.0
    for si, lvl in zip(s.tolist(), [2, 1, 0, 2]):
        for theta, k in ((0.3, 1), (0.8, 2)):
            p = 1 / (1 + math.exp(-(si - theta) / 0.1))
            y = 1.0 if lvl >= k else 0.0
            expected += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    assert loss(b).item() == pytest.approx(expected / 4, rel=1e-5)
    th = loss.thresholds()
    assert th[0].item() == pytest.approx(0.3) and th[1].item() == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize("scores", [[5.0, 3.0, 1.0, 4.0],            # agree with the levels
                                    [5.0, 1.0, 3.5, float("nan")]])  # a negative above a weak; one unscored
def test_cosent_matches_hand_computation_with_margin_and_scores(scores):
    """Two scored pairs are ordered by score (no margin); otherwise by level, with the margin."""
    b = small_batch()
    b.pair_score = torch.tensor(scores)
    s = b.pair_cosines().tolist()
    lvl = [2, 1, 0, 2]
    scale, margin = 20.0, 0.1
    terms = [0.0]
    for p in range(4):
        for q in range(4):
            if not math.isnan(scores[p]) and not math.isnan(scores[q]):
                if scores[p] > scores[q]:
                    terms.append(scale * (s[q] - s[p]))
            elif lvl[p] > lvl[q]:
                terms.append(scale * (s[q] - s[p] + margin * (lvl[p] - lvl[q])))
    expected = math.log(sum(math.exp(t) for t in terms))
    assert GradedCoSENTLoss(scale, margin, use_scores=True, pairs="all")(b).item() == pytest.approx(expected, rel=1e-5)
    # without scores the pair (0 vs 3), both level 2, is not compared
    terms_no = [t for t in terms]  # recompute without the score tie-break
    terms_no = [0.0] + [scale * (s[q] - s[p] + margin * (lvl[p] - lvl[q]))
                        for p in range(4) for q in range(4) if lvl[p] > lvl[q]]
    assert GradedCoSENTLoss(scale, margin, use_scores=False, pairs="all")(b).item() == pytest.approx(
        math.log(sum(math.exp(t) for t in terms_no)), rel=1e-5)


def test_cosent_scored_only_leaves_unscored_pairs_out():
    """``ranking_pairs: scored``: the loss is that of the batch without its unscored pairs."""
    b = small_batch()
    b.pair_score = torch.tensor([5.0, 1.0, float("nan"), 3.5])  # pair 2 (a negative) has no score
    b.candidates[2] = unit([1.0, 0.1])[0]  # and lies above the weak pair: ordering it would cost
    s = b.pair_cosines().tolist()
    sc = [5.0, 1.0, None, 3.5]
    terms = [0.0] + [20.0 * (s[q] - s[p]) for p in range(4) for q in range(4)
                     if sc[p] is not None and sc[q] is not None and sc[p] > sc[q]]
    expected = math.log(sum(math.exp(t) for t in terms))
    assert GradedCoSENTLoss(20.0, 0.1, pairs="scored")(b).item() == pytest.approx(expected, rel=1e-5)
    assert GradedCoSENTLoss(20.0, 0.1, pairs="all")(b).item() > expected + 1e-3  # with it, the negative is ordered by level
    cfg = LossConfig(contrastive_weight=0.0, ranking_weight=1.0, ranking_pairs="scored")
    assert HMCLLoss(cfg, dim=2)(b)[0].item() == pytest.approx(expected, rel=1e-5)
    # here every unscored pair's anchor has scored pairs, so `auto` (the default) is `scored`
    assert HMCLLoss(LossConfig(contrastive_weight=0.0), dim=2)(b)[0].item() == pytest.approx(expected, rel=1e-5)


def test_cosent_auto_keeps_unscored_pairs_whose_anchor_has_no_score():
    """``ranking_pairs: auto``: anchor 0's unscored negative (next to its scored positive, like a
    mined candidate) is left out; anchor 1's positive has no score (a source graded by level
    only), so it stays and is ordered by level against every other pair."""
    b = small_batch()
    b.pair_score = torch.tensor([5.0, 1.0, float("nan"), float("nan")])
    b.candidates[2] = unit([1.0, 0.1])[0]
    s = b.pair_cosines().tolist()
    sc, lvl, margin = [5.0, 1.0, None, None], [2, 1, 0, 2], 0.1
    kept = [0, 1, 3]
    terms = [0.0]
    for p in kept:
        for q in kept:
            if sc[p] is not None and sc[q] is not None:
                if sc[p] > sc[q]:
                    terms.append(20.0 * (s[q] - s[p]))
            elif lvl[p] > lvl[q]:
                terms.append(20.0 * (s[q] - s[p] + margin * (lvl[p] - lvl[q])))
    expected = math.log(sum(math.exp(t) for t in terms))
    assert len(terms) == 3  # (0 > 1) by score, (3 > 1) by level
    assert GradedCoSENTLoss(20.0, margin, pairs="auto")(b).item() == pytest.approx(expected, rel=1e-5)
    # `scored` drops anchor 1's positive too; `all` keeps anchor 0's negative
    assert GradedCoSENTLoss(20.0, margin, pairs="scored")(b).item() < expected - 1e-3
    assert GradedCoSENTLoss(20.0, margin, pairs="all")(b).item() > expected + 1e-3
    # without scores no pair is ordered by one, so their presence decides nothing: `auto` is `all`
    no_scores = GradedCoSENTLoss(20.0, margin, use_scores=False, pairs="auto")(b).item()
    assert no_scores == pytest.approx(GradedCoSENTLoss(20.0, margin, use_scores=False, pairs="all")(b).item())
    assert no_scores != pytest.approx(GradedCoSENTLoss(20.0, margin, use_scores=False, pairs="scored")(b).item())
    # level-only data with scores from the miner (`mine.scores: cosine`): anchor 0's positive has
    # no score, only its mined weak does, so nothing is left out and `auto` is `all`
    b.pair_score = torch.tensor([float("nan"), 0.7, float("nan"), float("nan")])
    assert GradedCoSENTLoss(20.0, margin, pairs="auto")(b).item() == pytest.approx(
        GradedCoSENTLoss(20.0, margin, pairs="all")(b).item())
    assert GradedCoSENTLoss(20.0, margin, pairs="auto")(b).item() != pytest.approx(
        GradedCoSENTLoss(20.0, margin, pairs="scored")(b).item())
    with pytest.raises(ValueError, match="pairs must be"):
        GradedCoSENTLoss(pairs="some")


def test_hmcl_is_the_weighted_sum_and_zero_weight_removes_a_term():
    b = small_batch()
    cfg = LossConfig(contrastive_weight=1.0, classification_weight=0.3, ranking_weight=0.5, temperature=0.1, weak_weight=0.5)
    loss = HMCLLoss(cfg, dim=2)
    total, parts = loss(b)
    assert set(parts) == {"contrastive", "classification", "ranking"}
    p = {k: v.item() for k, v in parts.items()}
    assert total.item() == pytest.approx(p["contrastive"] + 0.3 * p["classification"] + 0.5 * p["ranking"], rel=1e-6)
    only = HMCLLoss(cfg.model_copy(update={"classification_weight": 0.0, "ranking_weight": 0.0}), dim=2)
    total2, parts2 = only(b)
    assert set(parts2) == {"contrastive"} and total2.item() == pytest.approx(parts["contrastive"].item(), rel=1e-6)
    with pytest.raises(ValueError):
        HMCLLoss(cfg.model_copy(update={"contrastive_weight": 0, "classification_weight": 0, "ranking_weight": 0}), 2)


def test_local_segment_term_matches_hand_computation():
    from hmcl_cli.losses import SegmentInfoNCELoss

    # anchor 0 has 2 segments, anchor 1 one; candidate 0 (pos of anchor 0) 2 segments,
    # candidate 1 (neg of anchor 0, pos of anchor 1) 1 segment, candidate 2 (weak of anchor 1) 1 segment
    a_seg = unit([1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0])
    c_seg = unit([1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8])
    oa, oc = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 2])
    b = PairBatch(unit([1.0, 0.3, 0.0], [0.0, 0.0, 1.0]), unit([1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]),
                  torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 2]), torch.tensor([2, 0, 2, 1]),
                  torch.full((4,), float("nan")), torch.tensor([10, 11]), torch.tensor([20, 21, 22]),
                  a_seg, oa, c_seg, oc)
    T, w = 0.1, 0.5
    loss = SegmentInfoNCELoss(GradedInfoNCELoss(T, w))(b)
    cos = a_seg @ c_seg.T

    def row(i, target):
        logp = torch.log_softmax(cos[i] / T, dim=0)
        return -sum(t * logp[j] for j, t in target.items())
    # anchor 0: positive candidate 0 spread over its 2 segments; anchor 1: pos cand 1 (1), weak cand 2 (0.5)
    a0 = (row(0, {0: 0.5, 1: 0.5}) + row(1, {0: 0.5, 1: 0.5})) / 2
    a1 = row(2, {2: 1 / 1.5, 3: 0.5 / 1.5})
    assert torch.allclose(loss, (a0 + a1) / 2, atol=1e-5)


def test_local_term_equals_contrastive_term_with_one_segment_per_text():
    from hmcl_cli.losses import SegmentInfoNCELoss

    b = small_batch()
    con = GradedInfoNCELoss(0.05, 0.3)
    b.anchor_segments, b.anchor_segment_owner = b.anchors, torch.arange(b.anchors.size(0))
    b.candidate_segments, b.candidate_segment_owner = b.candidates, torch.arange(b.candidates.size(0))
    assert torch.allclose(SegmentInfoNCELoss(con)(b), con(b), atol=1e-6)


def test_describe_ranking_pairs_counts_what_auto_leaves_out():
    """The start-of-training line: under `auto`, unscored pairs of a query whose positive has a
    score are left to InfoNCE; those of a level-only query (or one without a positive) are ordered."""
    from hmcl_cli.training.batching import Anchor, AnchorTable

    def A(pos, weak, neg):
        return Anchor(0, pos, weak, neg)

    anchors = AnchorTable.of([A(pos=[(0, 0.9)], weak=[(1, None)], neg=[(2, None), (3, 0.1)]),  # scored positive: 2 left out
                              A(pos=[(4, None)], weak=[], neg=[(5, None)]),                    # level only: 2 ordered
                              A(pos=[], weak=[], neg=[(6, None)])])                            # no positive: 1 ordered
    line = describe_ranking_pairs(anchors, "auto", True)
    assert line == ("loss.ranking_pairs auto: 5 of 7 pairs have no score; 2 left to InfoNCE "
                    "(their query's positive has a score), 3 ordered by level")
    assert "all are left to the other terms" in describe_ranking_pairs(anchors, "scored", True)
    assert "all are ordered by level (loss.use_scores false)" in describe_ranking_pairs(anchors, "auto", False)
    assert describe_ranking_pairs(AnchorTable.of([A(pos=[(0, 0.9)], weak=[], neg=[(1, 0.2)])]), "auto", True) is None


def _wide_batch(dim: int = 8, seed: int = 0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(2, dim, generator=g), dim=-1)
    c = F.normalize(torch.randn(4, dim, generator=g), dim=-1)
    return PairBatch(a, c, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 1, 0, 2]),
                     torch.tensor([4.5, 2.0, float("nan"), 5.0]), torch.tensor([10, 11]), torch.tensor([20, 21, 22, 23]))


def test_matryoshka_adds_the_terms_on_each_cut_size():
    """L + sum_d w_d * L(cut to d): each cut built here by hand (first d dims, re-normalised)."""
    b = _wide_batch()
    base = LossConfig(contrastive_weight=1.0, classification_weight=0.3, ranking_weight=0.5, temperature=0.1)
    plain = HMCLLoss(base, dim=8)
    expected = plain(b)[0]
    for d, w in ((4, 1.0), (2, 0.5)):
        cut = PairBatch(F.normalize(b.anchors[:, :d], dim=-1), F.normalize(b.candidates[:, :d], dim=-1),
                        b.pair_anchor, b.pair_candidate, b.pair_level, b.pair_score, b.anchor_hash, b.candidate_hash)
        expected = expected + w * plain(cut)[0]
    mrl = HMCLLoss(base.model_copy(update={"matryoshka_dims": [4, 2], "matryoshka_weights": [1.0, 0.5]}), dim=8)
    total, parts = mrl(b)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() > plain(b)[0].item() + 1e-3 and "matryoshka" in parts
    # by default each of n sizes weighs 1/n
    halves = HMCLLoss(base.model_copy(update={"matryoshka_dims": [4, 2], "matryoshka_weights": [0.5, 0.5]}), dim=8)
    default = HMCLLoss(base.model_copy(update={"matryoshka_dims": [4, 2]}), dim=8)
    assert default(b)[0].item() == pytest.approx(halves(b)[0].item(), rel=1e-6)
    # a cut size's terms pull on its own dimensions only: the gradient of (loss with the d=2
    # term) - (loss without it) is zero past dimension 2
    a = b.anchors.clone().requires_grad_()
    ab = PairBatch(a, *[getattr(b, f) for f in ("candidates", "pair_anchor", "pair_candidate", "pair_level",
                                                "pair_score", "anchor_hash", "candidate_hash")])
    only_cut = HMCLLoss(base.model_copy(update={"matryoshka_dims": [2]}), dim=8)
    (only_cut(ab)[0] - plain(ab)[0]).backward()
    assert a.grad[:, 2:].abs().max().item() < 1e-5 < 1e-2 < a.grad[:, :2].abs().max().item()  # rounding aside


def test_matryoshka_sizes_are_checked():
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.recipe import load_recipe

    with pytest.raises(ValueError, match="smaller than the embedding size 8"):
        HMCLLoss(LossConfig(matryoshka_dims=[8, 4]), dim=8)
    for loss, message in (({"matryoshka_dims": [64, 64]}, "distinct positive sizes"),
                          ({"matryoshka_dims": [64, 32], "matryoshka_weights": [1.0]}, "one weight per size")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(data={"name": "x", "model": {"name_or_path": "m"}, "loss": loss})
    # the linear classifier's head is sized for the full embedding: the cut sizes skip it
    cfg = LossConfig(classification_weight=1.0, classifier="linear", matryoshka_dims=[4])
    total, parts = HMCLLoss(cfg, dim=8)(_wide_batch())
    assert torch.isfinite(total) and parts["matryoshka"].item() > 0


def test_labels_are_prepared_once_per_batch_for_every_cut_size(monkeypatch):
    """Targets and masks come from the labels alone: with matryoshka sizes (and the local term's
    reuse of the contrastive targets) each term builds them once per batch, not once per size."""
    from collections import Counter

    calls = Counter()
    for cls in (GradedInfoNCELoss, GradedCoSENTLoss, OrdinalClassificationLoss):
        def spy(self, b, _orig=cls._prepare, _name=cls.__name__):
            calls[_name] += 1
            return _orig(self, b)
        monkeypatch.setattr(cls, "_prepare", spy)
    b = _wide_batch()
    cfg = LossConfig(contrastive_weight=1.0, classification_weight=0.3, ranking_weight=0.5, temperature=0.1,
                     symmetric=True, matryoshka_dims=[4, 2])
    total, _ = HMCLLoss(cfg, dim=8)(b)
    assert calls == {"GradedInfoNCELoss": 1, "GradedCoSENTLoss": 1, "OrdinalClassificationLoss": 1}
    # and the sum is what fresh batches give, each size's terms computed from scratch
    plain = HMCLLoss(cfg.model_copy(update={"matryoshka_dims": []}), dim=8)
    expected = plain(_wide_batch())[0]
    for d in (4, 2):
        fresh = _wide_batch()
        cut = PairBatch(F.normalize(fresh.anchors[:, :d], dim=-1), F.normalize(fresh.candidates[:, :d], dim=-1),
                        fresh.pair_anchor, fresh.pair_candidate, fresh.pair_level, fresh.pair_score,
                        fresh.anchor_hash, fresh.candidate_hash)
        expected = expected + 0.5 * plain(cut)[0]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_prepared_labels_belong_to_the_loss_that_built_them():
    """Losses with other settings on one batch each read their own targets (one after the other,
    as temporaries whose memory the next may reuse)."""
    b = _wide_batch()
    for weak in (0.5, 0.0, 0.5):
        assert GradedInfoNCELoss(0.1, weak)(b).item() == pytest.approx(GradedInfoNCELoss(0.1, weak)(_wide_batch()).item())
    for margin in (0.0, 0.3):
        assert GradedCoSENTLoss(20.0, margin)(b).item() == pytest.approx(GradedCoSENTLoss(20.0, margin)(_wide_batch()).item())
    assert GradedInfoNCELoss(0.1, 0.0)(b).item() != pytest.approx(GradedInfoNCELoss(0.1, 0.5)(b).item())


def test_pair_cosines_are_computed_once_per_batch_and_afresh_for_a_cut():
    b = _wide_batch()
    assert b.pair_cosines() is b.pair_cosines()
    cut = b.truncated(2)
    expected = (F.normalize(b.anchors[:, :2], dim=-1)[b.pair_anchor]
                * F.normalize(b.candidates[:, :2], dim=-1)[b.pair_candidate]).sum(-1)
    assert torch.allclose(cut.pair_cosines(), expected) and not torch.allclose(expected, b.pair_cosines())
    assert cut.prepared is b.prepared  # the labels' tensors are shared


def test_learnt_temperature_starts_at_the_fixed_one_and_gets_a_gradient():
    b = _wide_batch()
    fixed, learnt = GradedInfoNCELoss(0.1, 0.5), GradedInfoNCELoss(0.1, 0.5, learn_temperature=True)
    assert not list(fixed.parameters()) and fixed.temperature == 0.1
    value = learnt(b)
    assert value.item() == pytest.approx(fixed(b).item(), rel=1e-6)
    value.backward()
    assert learnt.log_temperature.grad is not None and learnt.log_temperature.grad.abs().item() > 1e-4


def test_loss_ops_benchmark_counts_the_labels_built_once():
    """benchmarks/loss_ops.py (its figures are in RESULTS.md): kept label tensors save forward
    operations per matryoshka size and change nothing in the backward pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "loss_ops.py"), "--anchors", "8", "--dim", "384",
                          "--peak-anchors", "16"], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert all(r["forward, labels ready"] < r["forward"] for r in rows.values() if "forward, labels ready" in r)
    once, per_cut = rows["matryoshka"], rows["matryoshka, labels per cut size"]
    labels = once["forward"] - once["forward, labels ready"]  # built once
    assert per_cut["forward"] - once["forward"] == 4 * labels  # four cut sizes built them again
    assert per_cut["backward"] == once["backward"]
    # --peak-anchors: each setting's memory and loss, from its own process
    assert all(r["peak MiB at 16 anchors"] >= 0 and math.isfinite(r["loss at 16 anchors"]) and r["loss at 16 anchors"] > 0
               for name, r in rows.items() if "per cut" not in name)


def test_ranking_keeps_its_pair_order_in_bytes():
    """The ranking term's [P, P] order lives through the step: a bool mask, and a margin's level
    gaps as uint8, not floats (at 8,192 pairs a float [P, P] is 256 MiB)."""
    b = _wide_batch()
    plain, margin = GradedCoSENTLoss(20.0, 0.0), GradedCoSENTLoss(20.0, 0.3, use_scores=False)
    plain(b), margin(b)
    unordered, gap = b.prepared[plain]
    assert unordered.dtype == torch.bool and unordered.shape == (4, 4) and gap is None
    unordered, gap = b.prepared[margin]
    assert gap.dtype == torch.uint8 and gap.max().item() == 2  # positive over negative: two levels
