"""Evaluate an embedding model on a graded dataset (the fast in-loop dev evaluation).

Three views of one graded split:
* retrieval — every query against the pooled candidates of the split, grades as gains
  (pos 2, weak 1): nDCG@10, MRR@10, Recall@100;
* reranking — each query's own candidates, positives relevant: MAP, MRR@10;
* correlation — Spearman between pair cosine and level (or score where all pairs have one),
  computed per data source and averaged (``spearman/<source>`` each) when dev mixes sources.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import spearmanr

from hmcl_cli.data.example import GradedExample
from hmcl_cli.evaluation.metrics import rerank_scores, retrieval_scores


def evaluate_graded(model: Any, examples: Sequence[GradedExample], batch_size: int = 128, progress: bool = False) -> dict[str, float]:
    if not examples:
        return {}
    queries = [ex.query for ex in examples]
    prompts = [ex.prompt for ex in examples]
    corpus = list(dict.fromkeys(t for ex in examples for t in ex.candidates))
    q = encode_queries(model, queries, prompts, batch_size, progress)
    c = model.encode(corpus, side="doc", batch_size=batch_size, progress=progress, description="encode dev candidates").numpy()
    pos_of = {t: i for i, t in enumerate(corpus)}
    sim = q @ c.T
    qrels = [{pos_of[t]: float(cand.level) for t, cand in ex.candidates.items() if cand.level > 0} for ex in examples]
    ret = retrieval_scores(sim, qrels, ks=(10, 100))
    groups = []
    pairs: dict = {}  # source -> (cosines, levels, scores)
    for qi, ex in enumerate(examples):
        idx = np.array([pos_of[t] for t in ex.candidates])
        grades = np.array([c_.level for c_ in ex.candidates.values()])
        groups.append((sim[qi, idx], grades))
        sims, levels, scores = pairs.setdefault(ex.source, ([], [], []))
        sims.extend(sim[qi, idx])
        levels.extend(grades)
        scores.extend(c_.score for c_ in ex.candidates.values())
    rr = rerank_scores(groups, min_relevant=2)
    out = {"ndcg@10": ret.get("ndcg@10", float("nan")), "mrr@10": ret.get("mrr@10", float("nan")),
           "recall@100": ret.get("recall@100", float("nan")), "map": rr["map"], "rerank_mrr@10": rr["mrr@10"]}
    # Spearman within each source (scores of two datasets are on different scales), then the mean
    per_source = {src: _spearman(*v) for src, v in pairs.items()}
    valid = [v for v in per_source.values() if not np.isnan(v)]
    out["spearman"] = float(np.mean(valid)) if valid else float("nan")
    if len(per_source) > 1:
        out.update({f"spearman/{src}": v for src, v in per_source.items() if src})
    return out


def _spearman(sims: list, levels: list, scores: list) -> float:
    gold = scores if all(s is not None for s in scores) else levels
    return float(spearmanr(sims, gold).statistic) if len(set(gold)) > 1 else float("nan")


def encode_queries(model: Any, queries: list[str], prompts: list, batch_size: int, progress: bool) -> np.ndarray:
    """Encode queries, honouring per-example prompts (grouped so each prompt is set once)."""
    out = np.zeros((len(queries), model.dim), dtype=np.float32)
    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    default = model.settings.query_prompt
    try:
        for p, idx in groups.items():
            model.settings.query_prompt = p if p is not None else default
            out[idx] = model.encode([queries[i] for i in idx], side="query", batch_size=batch_size,
                                    progress=progress, description="encode queries").numpy()
    finally:
        model.settings.query_prompt = default
    return out
