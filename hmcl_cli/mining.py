"""``hmcl mine``: add mined negatives and weak-positives to the prepared training data.

For each query, the corpus (the dataset's own candidate texts plus ``mine.corpus`` files) is
searched for the top ``top_k`` texts: exactly by a chunked matrix product on the device, the
corpus moved there a block at a time (``search: exact``), or with faiss (``search: faiss``: flat,
or IVF for very large corpora; GPU when available). Then:

* weak-positives: texts whose score lies in ``weak_band`` relative to the positive's score;
* negatives: texts ranked in [``range_min``, ``range_max``), minus any scoring above
  ``(1 - relative_margin) * positive`` (or ``positive - absolute_margin``, or ``max_score``):
  the false-negative guard; picked by ``sampling`` (top or random);
* with ``teacher`` (a cross-encoder or a stronger embedder), the top ``range_max`` candidates
  of each query are scored by the teacher too: weak-positives are those inside
  ``teacher.band`` (relative to the teacher's score of the positive), and a candidate the
  teacher scores above the band's low end is never taken as a negative;
* levels already in the data are never changed; mined candidates carry no score by default
  (``scores: none``, ``null`` in ``*_scores``: with ``loss.ranking_pairs: auto`` the ranking
  term leaves them to InfoNCE where their query's positive has a score, and orders them by
  level where it has none), the miner's cosine (``scores: cosine``: ordered against the data's own
  scores), or that cosine on the data's scale (``scores: relative``: the positive's own score
  times cosine / the positive's cosine). Their cosines are summarised in
  ``mining_report.json``.

The original training file is kept as ``train.unmined.jsonl``; re-running starts from it (until
``hmcl prepare`` writes new data, which removes it).
Corpus embeddings are cached by a digest of the weights, the encoding settings and the corpus
(the two most recently used entries are kept).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from hmcl_cli.console import log, warn
from hmcl_cli.data.example import BadRow, Candidate, GradedExample
from hmcl_cli.data.prepare import load_graded
from hmcl_cli.data.readers import delimited_records, is_saved_dataset, json_records, saved_dataset, source_files
from hmcl_cli.errors import DataError, import_optional
from hmcl_cli.evaluation.graded import encode_queries
from hmcl_cli.io_utils import (atomic_path, binary_lines, data_suffix, find_data_file, text_lines, use_cache_entry,
                               write_json_atomic, write_jsonl)
from hmcl_cli.recipe import Recipe


def _table_texts(columns: dict[str, list], where: Path) -> list[str]:
    """The documents of a table (parquet, CSV/TSV, a saved dataset): its ``text`` column, each after its
    ``title`` where there is one (as a JSONL corpus reads); without ``text``, its one column of
    strings. A table with several such columns is an error naming them (its first column, an id,
    was read as the documents)."""
    key = "text" if "text" in columns else None
    if key is None:
        strings = [name for name, values in columns.items()
                   if any(v is not None for v in values[:1000])
                   and all(isinstance(v, str) or v is None for v in values[:1000])]
        if len(strings) != 1:
            raise DataError(f"mine.corpus: {where} has no `text` column to read the documents from (its columns: "
                            f"{', '.join(columns) or 'none'})",
                            hint="name the documents' column `text` (an optional `title` column goes before each)")
        key = strings[0]
    titles = columns.get("title") if key == "text" else None
    texts = []
    for i, value in enumerate(columns[key]):
        text = "" if value is None else str(value).strip()
        title = str(titles[i]).strip() if titles and titles[i] is not None else ""
        texts.append(f"{title} {text}".strip() if title else text)
    return [t for t in texts if t]


def _delimited_columns(path: Path, delimiter: str, encoding: str) -> dict[str, list]:
    """The columns of a CSV/TSV corpus by its header row; a file of one column may have none."""
    rows = []
    for item in delimited_records(path, delimiter, encoding):
        if isinstance(item, BadRow):
            raise DataError(item.located())
        rows.append(item[1])
    if not rows:
        return {}
    width = max(len(r) for r in rows)
    header = [c.strip() for c in rows[0]]
    if width == 1 and "text" not in header:  # one document per row, no header
        return {"text": [r[0] if r else None for r in rows]}
    if len(header) != width or len(set(header)) != width:
        raise DataError(f"mine.corpus: {path} is a table of {width} columns without a header row naming them",
                        hint="add a header row with a `text` column (and an optional `title`)")
    return {name: [r[i] if i < len(r) else None for r in rows[1:]] for i, name in enumerate(header)}


def read_corpus(path: Path, encoding: str = "utf-8") -> list[str]:
    """Texts of a corpus: a BEIR folder's corpus.jsonl, a JSONL file (or a .json array) of
    ``{"title", "text"}`` objects, a parquet, CSV or TSV file's or saved dataset's ``text`` (and
    ``title``) columns (:func:`_table_texts`) or a text file of one document
    per line (the JSONL and text files may be compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``, and
    in another text ``encoding`` than UTF-8)."""
    if is_saved_dataset(path):  # (a dataset dict: its only split)
        corpus = saved_dataset(path, None, hint="save the corpus split alone (`dataset_dict[split].save_to_disk(folder)`)")
        return _table_texts(corpus.to_dict(), path)
    if path.is_dir():
        path = find_data_file(path, "corpus.jsonl") or path / "corpus.jsonl"
    if not path.is_file():
        raise DataError(f"mine.corpus: {path} does not exist")
    texts = []
    suffix = data_suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _table_texts(pq.read_table(path).to_pydict(), path)
    if suffix in (".csv", ".tsv"):  # a table: its text column, never its lines (ids, commas and header included)
        return _table_texts(_delimited_columns(path, "\t" if suffix == ".tsv" else ",", encoding), path)
    if suffix in (".jsonl", ".json"):
        for item in json_records(path, encoding):
            if isinstance(item, BadRow):
                raise DataError(item.located())
            lineno, rec = item
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with `text` (and optional `title`), "
                                f"got {type(rec).__name__}")
            title = (rec.get("title") or "").strip()
            text = str(rec.get("text", "")).strip()
            texts.append(f"{title} {text}".strip() if title else text)
        return [t for t in texts if t.strip()]
    if codecs.lookup(encoding).name != "utf-8":
        texts = [line.rstrip("\r\n") for _, line in text_lines(path, encoding)]
        return [t for t in texts if t.strip()]
    for lineno, raw in binary_lines(path):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})",
                            hint="set mine.encoding (or the eval task's encoding) to the file's encoding, e.g. cp1252") from None
        texts.append(line.rstrip("\r\n"))
    return [t for t in texts if t.strip()]


def top_k_search(q: torch.Tensor, c: torch.Tensor, k: int, chunk: int = 4096, device: Optional[torch.device] = None,
                 block_bytes: int = 1 << 30, sim_bytes: int = 1 << 30) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine (inputs normalised): (scores [Q, k], indices [Q, k]).

    ``q`` and ``c`` may stay on the host: the corpus goes to ``device`` (default: where ``c`` is)
    a block at a time, each block once, the queries ``chunk`` rows at a time, and each query keeps
    a running top-k over the blocks seen. The device holds one block (at most ``block_bytes``),
    one chunk and their similarities (at most ``sim_bytes``), not the corpus (1M texts x 4096
    dimensions are 16 GiB); a block of narrow embeddings is as long as the similarities allow
    (a block of 1 GiB of 32-dimension embeddings was 8M texts: 4096 x 8M similarities, 128 GiB)."""
    device = torch.device(device) if device is not None else c.device
    k = min(k, c.size(0))
    chunk = max(1, min(chunk, q.size(0)))
    rows = max(k, min(block_bytes // max(1, c.size(1) * c.element_size()), sim_bytes // (chunk * 4)))
    best_v = torch.full((q.size(0), k), -torch.inf, dtype=torch.float32)
    best_i = torch.zeros((q.size(0), k), dtype=torch.long)
    for b in range(0, c.size(0), rows):
        block = c[b:b + rows].to(device, non_blocking=True)
        for s in range(0, q.size(0), chunk):
            v, i = torch.topk(q[s:s + chunk].to(device, non_blocking=True) @ block.T, min(k, block.size(0)), dim=1)
            if b:  # merge with the best of the earlier blocks
                v = torch.cat([best_v[s:s + chunk].to(device), v], dim=1)
                i = torch.cat([best_i[s:s + chunk].to(device), i + b], dim=1)
                v, pos = torch.topk(v, k, dim=1)
                i = i.gather(1, pos)
            best_v[s:s + chunk], best_i[s:s + chunk] = v.float().cpu(), i.cpu()
    return best_v.numpy(), best_i.numpy()


def require_faiss() -> Any:
    """The faiss module, or a DataError saying how to get it."""
    return import_optional("faiss", need="mine.search: faiss needs", error=DataError, pip="faiss-cpu",
                           install="pip install faiss-cpu (or faiss-gpu)", instead="use mine.search: exact")


def faiss_search(q: np.ndarray, c: np.ndarray, k: int, exact_below: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with faiss: exact (flat) for corpora up to ``exact_below`` texts, an
    IVF index (nlist ~ 4 sqrt(N), 32 probes) beyond; on the GPUs when faiss was built with them.
    Where the IVF lists probed for a query hold fewer than ``k`` texts, its last indices are -1
    (score -3.4e38): no text."""
    faiss = require_faiss()
    q = np.ascontiguousarray(q, dtype=np.float32)
    c = np.ascontiguousarray(c, dtype=np.float32)
    k = min(k, c.shape[0])
    dim = c.shape[1]
    if c.shape[0] <= exact_below:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(c.shape[0]))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = c[np.random.default_rng(0).choice(c.shape[0], min(c.shape[0], 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = 32
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    scores, idx = index.search(q, k)
    return scores, idx


class Picks(NamedTuple):
    weak: list[tuple[int, float]]
    negatives: list[tuple[int, float]]
    removed_by_margin: int
    removed_by_teacher: int = 0
    examined: int = 0  # candidates in ranks range_min..range_max not known or taken as weak


def grade_candidates(pos_score: float, ranked: list[tuple[int, float]], known: set[int], cfg: Any,
                     rng: np.random.Generator, teacher: Optional[dict[int, float]] = None) -> Picks:
    """Pick weak-positives and negatives for one query from its ranked (index, score) list.

    ``teacher`` maps corpus index -> the teacher's score relative to its score of the positive.
    With it, weak-positives are the candidates inside ``cfg.teacher.band``; a candidate above the
    band (positive-like) or inside it but not taken as weak is never a negative.
    """
    if teacher is None:
        lo, hi = cfg.weak_band
        weak = [(i, s) for i, s in ranked if i not in known and lo * pos_score <= s <= hi * pos_score]
    else:
        lo, hi = cfg.teacher.band
        weak = [(i, s) for i, s in ranked if i not in known and i in teacher and lo <= teacher[i] <= hi]
    weak = weak[: cfg.num_weak]
    taken = known | {i for i, _ in weak}
    limit = np.inf
    if cfg.relative_margin is not None:
        limit = min(limit, (1 - cfg.relative_margin) * pos_score)
    if cfg.absolute_margin is not None:
        limit = min(limit, pos_score - cfg.absolute_margin)
    if cfg.max_score is not None:
        limit = min(limit, cfg.max_score)
    window = [(i, s) for r, (i, s) in enumerate(ranked) if cfg.range_min <= r < cfg.range_max and i not in taken]
    kept = [(i, s) for i, s in window if s <= limit]
    removed = len(window) - len(kept)
    by_teacher = 0
    if teacher is not None:
        before = len(kept)
        kept = [(i, s) for i, s in kept if teacher.get(i, -np.inf) < lo]
        by_teacher = before - len(kept)
    if cfg.sampling == "random" and len(kept) > cfg.num_negatives:
        pick = sorted(rng.choice(len(kept), cfg.num_negatives, replace=False))
        negs = [kept[p] for p in pick]
    else:
        negs = kept[: cfg.num_negatives]
    return Picks(weak, negs, removed, by_teacher, len(window))


def _margin_words(cfg: Any) -> str:
    """The false-negative margin's settings, as a sentence fragment."""
    parts = []
    if cfg.relative_margin is not None:
        parts.append(f"mine.relative_margin {cfg.relative_margin:g}: texts above {1 - cfg.relative_margin:g}x "
                     "the positive's score are left out")
    if cfg.absolute_margin is not None:
        parts.append(f"mine.absolute_margin {cfg.absolute_margin:g}: texts within {cfg.absolute_margin:g} of it")
    if cfg.max_score is not None:
        parts.append(f"mine.max_score {cfg.max_score:g}: texts above {cfg.max_score:g}")
    return "; ".join(parts)


def mined_score(mode: str, cosine: float, pos_cosine: float, pos_data_score: Optional[float]) -> Optional[float]:
    """The ranking score a mined candidate carries (``mine.scores``).

    ``cosine``: the miner's cosine. ``none``: no score. ``relative``: the cosine put on the data's
    own scale, ``pos_data_score * cosine / pos_cosine`` (the query's best positive by the miner
    anchors the scale), so a candidate the false-negative margin kept below the positive also
    scores below it, and other queries' pairs are compared on the data's scale; no score where
    the positive has none or the miner scores it at or below 0.
    """
    if mode == "cosine":
        return cosine
    if mode == "none" or pos_data_score is None or pos_cosine <= 0:
        return None
    return pos_data_score * cosine / pos_cosine


def teacher_relative_scores(teacher: Any, jobs: list[tuple[str, list[str], list[str]]],
                            progress: bool = False) -> list[Optional[list[float]]]:
    """Teacher scores of each job's candidates relative to its best-scored positive.

    ``jobs``: per query (query, positive texts, candidate texts); all pairs are scored in one
    call. A query whose positives the teacher scores at or below 0 gets None: the teacher
    disagrees with the label, so it grades nothing there.
    """
    queries, texts = [], []
    for q, pos, cands in jobs:
        queries += [q] * (len(pos) + len(cands))
        texts += pos + cands
    flat = teacher.score(queries, texts, progress=progress) if texts else np.zeros(0)
    out, at = [], 0
    for _, pos, cands in jobs:
        best = float(flat[at:at + len(pos)].max()) if pos else 0.0
        at += len(pos)
        out.append([float(x) / best for x in flat[at:at + len(cands)]] if best > 0 else None)
        at += len(cands)
    return out


def query_embeddings(model: Any, examples: list, position: dict[str, int], c: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings of the examples' queries. When queries and documents are encoded alike (same
    prompt, same max length: symmetric data such as STS, NLI or duplicate questions), a query that
    is also a corpus text takes its corpus embedding instead of being encoded a second time."""
    s = model.settings
    alike = s.query_prompt == s.doc_prompt and s.query_max_length == s.doc_max_length
    reuse = [i for i, ex in enumerate(examples)
             if alike and ex.prompt in (None, s.query_prompt) and ex.query in position]
    q = np.zeros((len(examples), c.shape[1]), dtype=np.float32)
    if reuse:
        q[reuse] = c[[position[examples[i].query] for i in reuse]]
        log(f"mine: {len(reuse)} of {len(examples)} queries are corpus texts encoded alike: embeddings reused")
    rest = sorted(set(range(len(examples))) - set(reuse))
    if rest:
        q[rest] = encode_queries(model, [examples[i].query for i in rest], [examples[i].prompt for i in rest],
                                 batch_size, True)
    return q


def mine(recipe: Recipe, model: Any = None) -> dict:
    from hmcl_cli.modeling.encoder import EmbeddingModel, best_device

    cfg = recipe.mine
    data_dir = recipe.run_dir / "data"
    source = data_dir / "train.unmined.jsonl"
    if not source.is_file():
        source = data_dir / "train.jsonl"
    examples = load_graded(source)
    model = model or EmbeddingModel.from_recipe(recipe.model, recipe.base_dir)
    model.to(best_device())
    corpus = list(dict.fromkeys([t for ex in examples for t in ex.candidates] +
                                [t for p in cfg.corpus for f in source_files(recipe.resolve(p)) for t in read_corpus(f, cfg.encoding)]))
    if not corpus:
        raise DataError("mine: the corpus is empty")
    # the weights themselves, every encoding setting and the device type: a model folder trained
    # again, another revision, pooling or device never reuses embeddings of the one before
    key = hashlib.sha256(json.dumps([model.cache_identity(), hashlib.sha256("\n".join(corpus).encode()).hexdigest()])
                         .encode()).hexdigest()[:16]
    cache = recipe.run_dir / "cache" / f"corpus-emb-{key}.npy"
    if cache.is_file():
        c = np.load(cache)
        log(f"mine: reused corpus embeddings {cache.name}")
        use_cache_entry(cache)
    else:
        c = model.encode(corpus, side="doc", batch_size=cfg.batch_size, progress=True, description="encode corpus").numpy()
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), c)
        cache.with_suffix(".tmp.npy").replace(cache)
        use_cache_entry(cache)
    position = {t: i for i, t in enumerate(corpus)}
    q = query_embeddings(model, examples, position, c, cfg.batch_size)
    dev = model.device
    if cfg.search == "faiss":
        scores, idx = faiss_search(q, c, cfg.top_k)
    else:
        scores, idx = top_k_search(torch.from_numpy(q), torch.from_numpy(c), cfg.top_k, device=dev)
    rng = np.random.default_rng(recipe.seed)

    def job(qi: int) -> tuple[set, list, list]:
        """Example ``qi``'s known corpus indices, positive texts and ranked (index, score) list,
        made when it is mined (every query's as Python tuples up front, with every row as a dict,
        grew the RSS by 1.5 GB after the search: 100,000 queries, top_k 100)."""
        ex = examples[qi]
        # faiss's IVF index answers -1 where the lists it probed held fewer than top_k texts
        ranked = [(i, s) for i, s in zip(idx[qi].tolist(), scores[qi].tolist()) if i >= 0 and corpus[i] != ex.query]
        return {position[t] for t in ex.candidates}, [t for t, x in ex.candidates.items() if x.level == 2], ranked

    jobs = [qi for qi, ex in enumerate(examples) if any(x.level == 2 for x in ex.candidates.values())]
    out: list[GradedExample] = list(examples)  # each mined example replaces its own
    dist: dict[str, list[float]] = {"pos": [], "weak": [], "neg": []}
    relative: list = [None] * len(jobs)
    if cfg.teacher is not None:
        from hmcl_cli.teacher import load_teacher

        teacher = load_teacher(cfg.teacher, recipe.base_dir)
        graded, asked = [], []
        for qi in jobs:
            known, pos, ranked = job(qi)
            graded.append([i for i, _ in ranked[: cfg.range_max] if i not in known])
            asked.append((examples[qi].query, pos, [corpus[i] for i in graded[-1]]))
        rel = teacher_relative_scores(teacher, asked, progress=True)
        relative = [dict(zip(g, r)) if r is not None else None for g, r in zip(graded, rel)]
        del teacher, asked
    added = {"weak": 0, "neg": 0}
    removed_total = by_teacher = short = 0
    short_window = {"examined": 0, "margin": 0, "teacher": 0}  # the short queries' own rank windows
    for qi, rel in zip(jobs, relative):
        ex = examples[qi]
        known, pos_texts, ranked = job(qi)
        pos_cos = {t: float(q[qi] @ c[position[t]]) for t in pos_texts}
        best_pos = max(pos_texts, key=pos_cos.__getitem__)
        pos_score = pos_cos[best_pos]
        dist["pos"].append(pos_score)
        picks = grade_candidates(pos_score, ranked, known, cfg, rng, teacher=rel)
        removed_total += picks.removed_by_margin
        by_teacher += picks.removed_by_teacher
        if len(picks.negatives) < cfg.num_negatives:
            short += 1
            short_window["examined"] += picks.examined
            short_window["margin"] += picks.removed_by_margin
            short_window["teacher"] += picks.removed_by_teacher
        new = GradedExample(ex.query, dict(ex.candidates), ex.prompt, ex.source)
        for level, name, chosen in ((1, "weak", picks.weak), (0, "neg", picks.negatives)):
            for i, s in chosen:
                new.candidates[corpus[i]] = Candidate(corpus[i], level,
                                                      mined_score(cfg.scores, s, pos_score, ex.candidates[best_pos].score))
                added[name] += 1
                dist[name].append(s)
        out[qi] = new
    skipped = len(examples) - len(jobs)
    with atomic_path(data_dir / "train.jsonl") as tmp:
        write_jsonl(tmp, (ex.to_json() for ex in out))
        # the data as prepared is kept once the mined file is whole (stopped while writing it,
        # train.jsonl is the file it was)
        if source.name == "train.jsonl":
            (data_dir / "train.jsonl").replace(data_dir / "train.unmined.jsonl")
    report = {"queries": len(examples), "queries_without_positive": skipped,
              "queries_short_of_negatives": short, "corpus": len(corpus),
              "added": added, "removed_by_margin": removed_total,
              "teacher": None if cfg.teacher is None else {
                  "model": cfg.teacher.model, "queries_graded": sum(r is not None for r in relative),
                  "removed_as_positive_like_or_ambiguous": by_teacher},
              "score_percentiles": {k: {f"p{p}": round(float(np.percentile(v, p)), 4) for p in (10, 50, 90)}
                                    for k, v in dist.items() if v}}
    from hmcl_cli.data.origin import mined_from

    report["made_with"] = mined_from(recipe)  # what train compares the recipe and the corpus files with
    write_json_atomic(data_dir / "mining_report.json", report)
    guard = f", {by_teacher} more by the teacher" if cfg.teacher is not None else ""
    log(f"mine: +{added['weak']} weak, +{added['neg']} negatives over {len(examples)} queries "
        f"({removed_total} candidates removed by the margin{guard}) -> {data_dir / 'train.jsonl'}")
    if skipped:
        warn(f"mine: {skipped} of {len(examples)} queries have no positive, which mining measures candidates "
             "against: nothing was mined for them")
    if short and cfg.num_negatives:
        warn(_short_mining_words(cfg, short, len(jobs), len(corpus), short_window))
    return report


def _short_mining_words(cfg: Any, short: int, queries: int, corpus: int, short_window: dict[str, int]) -> str:
    """The warning for queries mined short of negatives: what left them short, counted in their own
    rank windows (``short_window``: candidates examined, removed by the margin, kept by the teacher):
    the margin, the teacher, else too few texts; and the settings that would change it, with no
    advice a setting already at its limit makes void (a lower range_min where it is 0, a higher
    range_max where it already reaches the whole corpus)."""
    said = f"mine: {short} of {queries} queries got fewer than mine.num_negatives {cfg.num_negatives} negatives"
    reach = min(cfg.top_k, corpus)
    window = f"ranks {cfg.range_min}-{cfg.range_max} of the top {reach}"
    deeper = f"a higher mine.range_max{' and mine.top_k' if cfg.range_max >= cfg.top_k else ''}"
    seen, margin, teacher = short_window["examined"], short_window["margin"], short_window["teacher"]
    if seen and margin >= seen / 2:  # the margin, not the corpus, left them short
        return (f"{said}: in their windows the false-negative margin ({_margin_words(cfg)}) removed {margin} of the "
                f"{seen} candidates at {window}: the model scores most of them close to or above the query's "
                "positive (a model far from this task, or positives that are not the best match). A teacher "
                "(mine.teacher) grades them instead" + (f"; {deeper} reaches texts ranked below the positives"
                                                        if cfg.range_max < corpus else ""))
    fixes = ["a larger corpus (mine.corpus)"]
    if cfg.range_min > 0:
        fixes.append("a lower mine.range_min")
    if cfg.range_max < corpus:
        fixes.append(deeper)
    either = ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]
    if cfg.teacher is not None and seen and teacher >= seen / 2:
        lo, hi = cfg.teacher.band
        return (f"{said}: in their windows ({window}) the teacher kept {teacher} of {seen} candidates "
                f"from being negatives (its score at or above mine.teacher.band's low end {lo:g} of the positive's: "
                f"above {hi:g} positive-like, between them weak or left out); a higher band low end lets closer texts "
                f"be negatives, and {either} offers more texts the teacher calls unrelated")
    removed_words = (f"the margin removed {margin}" + (f" and the teacher {teacher}"
                     if cfg.teacher is not None else "") + f" of their {seen} candidates")
    return (f"{said}: their windows ({window} of a corpus of {corpus} texts, less the data's own candidates) held "
            f"too few ({removed_words}); {either} finds more")
