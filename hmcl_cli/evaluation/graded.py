"""Evaluate an embedding model on a graded dataset (the fast in-loop dev evaluation).

Three views of one graded split:
* retrieval — every query against the pooled candidates of the split, grades as gains
  (pos 2, weak 1): nDCG@10, MRR@10, Recall@100;
* reranking — each query's own candidates, positives relevant: MAP, MRR@10;
* correlation — Spearman between pair cosine and level (or score where all pairs have one),
  computed per data source and averaged (``spearman/<source>`` each) when dev mixes sources.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from hmcl_cli.data.example import GradedExample
from hmcl_cli.evaluation.metrics import DEV_METRICS, RERANK_METRICS, RETRIEVAL_METRICS, ranked_retrieval_scores, rerank_scores


def evaluate_graded(model: Any, examples: Sequence[GradedExample], batch_size: int = 128,
                    progress: Optional[bool] = None) -> dict[str, float]:
    """The dev metrics of ``model`` on ``examples``. ``progress``: show the encoding's progress
    (``None``: where the split has more than 20,000 texts, whose encoding can take minutes on a
    CPU). Memory grows with the split, not with its square."""
    if not examples:
        return {}
    queries = [ex.query for ex in examples]
    prompts = [ex.prompt for ex in examples]
    corpus = list(dict.fromkeys(t for ex in examples for t in ex.candidates))
    if progress is None:
        progress = len(queries) + len(corpus) > 20000
    q = encode_queries(model, queries, prompts, batch_size, progress)
    c = model.encode(corpus, side="doc", batch_size=batch_size, progress=progress, description="encode dev candidates").numpy()
    pos_of = {t: i for i, t in enumerate(corpus)}
    qrels = [{pos_of[t]: float(cand.level) for t, cand in ex.candidates.items() if cand.level > 0} for ex in examples]
    # each query's best 100 of the split's texts, on the model's device, 512 queries at a time:
    # never the whole [queries, texts] matrix (100,000 x 200,000 cosines are 80 GB)
    from hmcl_cli.mining import top_k_search

    found, ranked = top_k_search(torch.from_numpy(q), torch.from_numpy(c), 100, chunk=512,
                             device=getattr(model, "device", None) or "cpu", block_bytes=1 << 28, sim_bytes=1 << 28)
    ret = ranked_retrieval_scores(ranked, qrels, ks=(10, 100), scores=found)
    groups = []
    pairs: dict = {}  # source -> (cosines, levels, scores)
    for qi, ex in enumerate(examples):
        idx = np.array([pos_of[t] for t in ex.candidates])
        grades = np.array([c_.level for c_ in ex.candidates.values()])
        own = c[idx] @ q[qi] if idx.size else np.zeros(0, np.float32)
        groups.append((own, grades))
        sims, levels, scores = pairs.setdefault(ex.source, ([], [], []))
        sims.extend(own)
        levels.extend(grades)
        scores.extend(c_.score for c_ in ex.candidates.values())
    rr = rerank_scores(groups, min_relevant=2)
    out = {name: ret.get(name, float("nan")) for name in RETRIEVAL_METRICS}
    out.update({name: rr[name.removeprefix("rerank_")] for name in RERANK_METRICS})
    # Spearman within each source (scores of two datasets are on different scales), then the mean
    per_source = {src: _spearman(*v) for src, v in pairs.items()}
    valid = [v for v in per_source.values() if not np.isnan(v)]
    out["spearman"] = float(np.mean(valid)) if valid else float("nan")
    if len(per_source) > 1:
        out.update({f"spearman/{src}": v for src, v in per_source.items() if src})
    return out


def _gold(levels: list, scores: list) -> list:
    """What the cosines are correlated with: the scores where every pair has one, else the levels."""
    return scores if all(s is not None for s in scores) else levels


def _spearman(sims: list, levels: list, scores: list) -> float:
    gold = _gold(levels, scores)
    # undefined where either side is constant (a collapsed model's cosines): NaN, without scipy's warning
    if len(set(gold)) < 2 or np.ptp(np.asarray(sims, dtype=np.float64)) == 0:
        return float("nan")
    return float(spearmanr(sims, gold).statistic)


def metric_names(examples: Sequence[GradedExample]) -> list[str]:
    """The names :func:`evaluate_graded` returns for ``examples``."""
    sources = list(dict.fromkeys(ex.source for ex in examples))
    return [*DEV_METRICS, *([f"spearman/{src}" for src in sources if src] if len(sources) > 1 else [])]


def undefined_metrics(examples: Sequence[GradedExample]) -> dict[str, str]:
    """The metrics :func:`evaluate_graded` cannot compute on ``examples`` whatever the model (they
    come out NaN), each with the reason: what the data lacks."""
    out: dict[str, str] = {}
    cands = [list(ex.candidates.values()) for ex in examples]
    if not any(c.level > 0 for group in cands for c in group):
        out.update(dict.fromkeys(RETRIEVAL_METRICS, "no query has a positive or weak-positive candidate"))
    if not any(any(c.level == 2 for c in group) and any(c.level < 2 for c in group) for group in cands):
        out.update(dict.fromkeys(RERANK_METRICS, "no query has both a positive and a weak-positive or "
                                                 "negative candidate to rank"))
    gold: dict = {}
    for ex, group in zip(examples, cands):
        levels, scores = gold.setdefault(ex.source, ([], []))
        levels.extend(c.level for c in group)
        scores.extend(c.score for c in group)
    flat = {src: len(set(_gold(*v))) < 2 for src, v in gold.items()}
    why = "every pair has the same level, or the same score"
    if all(flat.values()):
        out["spearman"] = why
    if len(gold) > 1:
        out.update({f"spearman/{src}": why for src, same in flat.items() if same and src})
    return out


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
