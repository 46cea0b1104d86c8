"""Ranking and correlation metrics on graded data (numpy), used in-loop and by `hmcl eval`.

Conventions follow MTEB / pytrec_eval: nDCG uses linear gains (the relevance grade),
MAP and MRR treat grade >= ``min_relevant`` as relevant.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# the in-loop dev metrics (hmcl_cli.evaluation.graded), named `dev_<name>` in training; a dev set
# that mixes sources also has `spearman/<source>` per source
RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")
RERANK_METRICS = ("map", "rerank_mrr@10")
DEV_METRICS = RETRIEVAL_METRICS + RERANK_METRICS + ("spearman",)


def dcg(gains: np.ndarray) -> float:
    return float((gains / np.log2(np.arange(2, gains.size + 2))).sum())


def ndcg_at_k(ranked_grades: Sequence[float], all_grades: Sequence[float], k: int = 10) -> float:
    ideal = np.sort(np.asarray(all_grades, dtype=float))[::-1][:k]
    denom = dcg(ideal)
    return dcg(np.asarray(ranked_grades, dtype=float)[:k]) / denom if denom > 0 else 0.0


def average_precision(ranked_relevant: Sequence[bool], n_relevant: int | None = None) -> float:
    rel = np.asarray(ranked_relevant, dtype=bool)
    total = int(rel.sum()) if n_relevant is None else n_relevant
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    return float((hits[rel] / (np.flatnonzero(rel) + 1)).sum() / total)


def reciprocal_rank(ranked_relevant: Sequence[bool], k: int = 10) -> float:
    rel = np.asarray(ranked_relevant, dtype=bool)[:k]
    idx = np.flatnonzero(rel)
    return float(1.0 / (idx[0] + 1)) if idx.size else 0.0


def recall_at_k(ranked_relevant: Sequence[bool], n_relevant: int, k: int) -> float:
    return float(np.asarray(ranked_relevant, dtype=bool)[:k].sum() / n_relevant) if n_relevant else 0.0


def rerank_scores(groups: list[tuple[np.ndarray, np.ndarray]], min_relevant: int = 2) -> dict[str, float]:
    """``groups``: per query (cosines of its candidates, their grades). MAP, MRR@10, nDCG@10.

    As MTEB's reranking (pytrec_eval) counts them, so the in-loop ``dev_map`` of a model equals
    ``hmcl eval``'s reranking MAP on the same split: a query with no relevant candidate is left
    out; one whose candidates are all relevant counts (1 on every metric). When no query has a
    relevant and an irrelevant candidate, nothing is ranked and the metrics are NaN (no model
    can be told from another by them).
    """
    aps, rrs, ndcgs = [], [], []
    ranked = False
    for sims, grades in groups:
        rel = grades >= min_relevant
        if not rel.any():
            continue
        ranked = ranked or not rel.all()
        order = np.argsort(-sims, kind="stable")
        aps.append(average_precision(rel[order]))
        rrs.append(reciprocal_rank(rel[order], 10))
        ndcgs.append(ndcg_at_k(grades[order], grades, 10))
    if not ranked:
        return {"map": float("nan"), "mrr@10": float("nan"), "ndcg@10": float("nan"), "queries": 0}
    return {"map": float(np.mean(aps)), "mrr@10": float(np.mean(rrs)), "ndcg@10": float(np.mean(ndcgs)),
            "queries": len(aps)}


def retrieval_scores(sim: np.ndarray, qrels: list[dict[int, float]], ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """``sim``: [Q, N] query-corpus cosines; ``qrels``: per query {doc index: grade > 0}."""
    k = min(max(ks), sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
    return ranked_retrieval_scores(np.take_along_axis(top, order, axis=1), qrels, ks)


def ranked_retrieval_scores(ranked: np.ndarray, qrels: list[dict[int, float]], ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """:func:`retrieval_scores` from each query's best documents, best first (``ranked``: [Q, k]
    corpus indices, k at least ``max(ks)`` or the corpus size), as a top-k search gives them."""
    out: dict[str, list[float]] = {}
    for qi, judged in enumerate(qrels):
        if not judged:
            continue
        grades = np.array([judged.get(int(i), 0.0) for i in ranked[qi]])
        relevant = grades > 0
        n_rel = sum(1 for g in judged.values() if g > 0)
        for k in ks:
            out.setdefault(f"ndcg@{k}", []).append(ndcg_at_k(grades[:k], list(judged.values()), k))
            out.setdefault(f"recall@{k}", []).append(recall_at_k(relevant, n_rel, k))
        out.setdefault("mrr@10", []).append(reciprocal_rank(relevant, 10))
        out.setdefault("map@100", []).append(average_precision(relevant[:100], n_rel))
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res["queries"] = len(out.get("mrr@10", []))
    return res
