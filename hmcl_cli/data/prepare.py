"""``hmcl prepare``: sources -> merged, deduplicated, split graded datasets + stats.json.

Python use::

    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.data.prepare import prepare
    stats = prepare(load_recipe("recipes/quickstart.yaml"))
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from hmcl_cli.console import ProgressBar, log, show_table, warn
from hmcl_cli.data.example import LEVEL_NAMES, LEVELS, BadRow, GradedExample, add_candidate, parse_graded, spread_sample
from hmcl_cli.data.pair_groups import PairGroups
from hmcl_cli.data.readers import (NO_GOLD_LABEL, is_pattern, is_saved_dataset, json_records, read_source, source_files,
                                   source_labels)
from hmcl_cli.errors import DataError
from hmcl_cli.io_utils import gc_paused, write_json_atomic, write_jsonl_atomic
from hmcl_cli.modeling.tokenizing import token_ids
from hmcl_cli.recipe import Recipe, SourceConfig

SPLITS = ("train", "dev", "test")
SPLIT_BIT = {"train": 1, "dev": 2, "test": 4}  # the splits a query was drawn or given to, as bits of one int
SMALL_DEV = 20  # fewer dev queries drawn than this: a warning that checkpoint choice rests on few


def seeded_draw(query: str, seed: int) -> float:
    """A query's seeded hash in [0, 1): what draws its split."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{query}".encode()).digest()[:8], "big") / 2**64


def split_of(h: float, dev_fraction: float, test_fraction: float) -> str:
    """The split a draw in [0, 1) lands in: a query's :func:`seeded_draw`, or its pair group's
    (the same query always lands in one split)."""
    if h < test_fraction:
        return "test"
    if h < test_fraction + dev_fraction:
        return "dev"
    return "train"


LARGE_DEV = 20000  # more dev queries drawn than this, without data.dev_max_queries: a note that it caps them


def _cap_dev(recipe: Recipe, merged: dict, drawn_dev: dict, given_dev: set, origin_split: dict,
             per_source: dict, totals: Counter, draw_of: Any) -> int:
    """``data.dev_max_queries``: the drawn dev queries beyond it (the last by the seeded hash that
    drew them, ``draw_of(key)``) go to train, with their rows' per-source counts; returns how many
    moved. A query that a ``split: dev`` source also holds stays (and counts), and so does the rest
    of its pair group. A pair group (queries with one draw) moves whole or stays whole, so the cap
    may keep a few fewer than it allows. Without a cap, a note where the draw made a dev split
    large enough to slow every dev evaluation."""
    cap = recipe.data.dev_max_queries
    if cap is None:
        if len(drawn_dev) > LARGE_DEV:
            log(f"dev: {len(drawn_dev)} queries drawn by data.dev_fraction {recipe.data.dev_fraction:g}; every dev "
                "evaluation encodes them and their texts: data.dev_max_queries caps them (the others train)")
        return 0
    if len(drawn_dev) <= cap:
        return 0
    draws = {k: draw_of(k) for k in drawn_dev}
    held = {draws[k] for k in drawn_dev if k in given_dev}  # a given dev query's group stays with it
    movable = sorted((k for k in drawn_dev if draws[k] not in held), key=lambda k: (draws[k], k))
    keep = max(0, cap - (len(drawn_dev) - len(movable)))
    while 0 < keep < len(movable) and draws[movable[keep - 1]] == draws[movable[keep]]:
        keep -= 1  # not through a pair group: its pairs would be in two splits
    for key in movable[keep:]:
        ex = merged["dev"].pop(key)
        target = merged["train"].get(key)
        if target is None:
            merged["train"][key] = ex
        else:
            for cand in ex.candidates.values():
                totals[add_candidate(target, cand.text, cand.level, cand.score, recipe.data.conflict)] += 1
        origin_split[key] = origin_split[key] & ~SPLIT_BIT["dev"] | SPLIT_BIT["train"]
        for label, rows in drawn_dev[key].items():
            per_source[label].splits["dev"] -= rows
            per_source[label].splits["train"] += rows
    moved = len(movable) - keep
    log(f"dev: {moved} of {len(drawn_dev)} queries drawn for dev train instead (data.dev_max_queries {cap})")
    return moved


class _SourceStats:
    def __init__(self) -> None:
        self.rows = 0
        self.examples_in = 0
        self.rejected: Counter = Counter()
        self.first_errors: list[str] = []
        self.levels: Counter = Counter()
        self.splits: Counter = Counter()
        self.scores: list[float] = []  # lowest and highest candidate score seen

    def saw_score(self, score: Optional[float]) -> None:
        if score is not None:
            self.scores = [min(score, self.scores[0]), max(score, self.scores[1])] if self.scores else [score, score]


def prepare(recipe: Recipe, tokenizer: Any = None, progress: bool = True) -> dict:
    """Run the prepare stage; writes ``<run>/data/{train,dev,test}.jsonl`` and ``stats.json``."""
    with gc_paused():  # it builds every example of every source (io_utils.gc_paused)
        return _prepare(recipe, tokenizer, progress)


def _prepare(recipe: Recipe, tokenizer: Any, progress: bool) -> dict:
    data_cfg = recipe.data
    if not data_cfg.sources:
        raise DataError(
            "the recipe has no data sources (data.sources is empty)",
            hint="add at least one source: data: {sources: [{path: train.jsonl, format: graded}]}",
        )
    _check_outputs_are_not_sources(recipe)
    merged: dict[str, dict[tuple, GradedExample]] = {s: {} for s in SPLITS}
    origin_split: dict[tuple, int] = defaultdict(int)  # SPLIT_BIT of each split a query went to
    pool: dict[str, str] = {}  # each candidate text once: corpus-drawn negatives repeat across rows
    totals: Counter = Counter()
    per_source: dict[str, _SourceStats] = {}
    drawn_dev: dict[tuple, Counter] = defaultdict(Counter)  # dev queries drawn by dev_fraction: rows per source
    given_dev: set[tuple] = set()  # queries of `split: dev` sources
    groups = _pair_groups(recipe, progress)

    def draw_of(key: tuple) -> float:
        group_draw = groups.draw(key) if groups is not None else None
        return seeded_draw(key[1], recipe.seed) if group_draw is None else group_draw

    for index, (src, label) in enumerate(zip(data_cfg.sources, source_labels(data_cfg.sources))):
        st = per_source[label] = _SourceStats()
        path = _source_path(recipe, src, st)
        if path is False:
            continue
        bar = ProgressBar(f"prepare {label}", None, "rows", enabled=progress)
        last_line: Any = None
        try:
            for item in read_source(src, path):
                if isinstance(item, BadRow):
                    st.rows += 1
                    _reject(item, data_cfg.on_error, st)
                    continue
                line, ex = item
                if line != last_line:  # a row may yield two examples (symmetric pairs)
                    st.rows += 1
                    last_line = line
                    if st.rows % 1000 == 0:
                        bar.update(1000)
                st.examples_in += 1
                key = (ex.prompt or "", ex.query)
                split = src.split or split_of(draw_of(key), data_cfg.dev_fraction, data_cfg.test_fraction)
                origin_split[key] |= SPLIT_BIT[split]
                if split == "dev":
                    if src.split:
                        given_dev.add(key)
                    else:
                        drawn_dev[key][label] += 1
                st.splits[split] += 1
                target = merged[split].get(key)
                if target is None:
                    target = merged[split][key] = GradedExample(ex.query, prompt=ex.prompt, source=ex.source or label)
                for cand in ex.candidates.values():
                    st.levels[LEVEL_NAMES[cand.level]] += 1
                    st.saw_score(cand.score)
                    text = pool.setdefault(cand.text, cand.text)
                    totals[add_candidate(target, text, cand.level, cand.score, data_cfg.conflict)] += 1
        finally:
            bar.update(st.rows % 1000)
            bar.close()
        if st.rows == 0:
            warn(f"data source {path or label} holds no rows: is it the source you meant?")
        if st.rejected.get(NO_GOLD_LABEL):
            log(f"prepare {label}: {st.rejected[NO_GOLD_LABEL]} pair(s) without a gold label (SNLI's and MultiNLI's "
                "'-', the Hub copies' -1: the annotators did not agree) left out")
        _check_sts_scale(src, label, st, index)

    del pool
    capped = _cap_dev(recipe, merged, drawn_dev, given_dev, origin_split, per_source, totals, draw_of)
    pair_groups = {"texts": len(groups), "groups": groups.groups, "largest": groups.largest()} if groups else None
    groups = None  # freed: draw_of is not used after the cap
    # rows of one query (within a split, across sources too) make one example: the sources'
    # example counts add up to the splits' only with these
    combined = sum(st.examples_in for st in per_source.values()) - sum(len(m) for m in merged.values())
    from hmcl_cli.data.origin import made_from

    stats: dict[str, Any] = {"sources": {}, "splits": {}, "combined_same_query": combined,
                             "duplicates_removed": totals["duplicate"], "dev_capped": capped,
                             "conflicts": {"count": totals["conflict"], "rule": data_cfg.conflict}}
    if pair_groups:  # the drawn symmetric sources' texts, drawn by group (data/pair_groups.py)
        stats["pair_groups"] = pair_groups
    for label, st in per_source.items():
        stats["sources"][label] = {
            "rows": st.rows, "examples": st.examples_in, "examples_per_split": dict(st.splits),
            "candidates_per_level": dict(st.levels),
            "rejected": sum(st.rejected.values()), "rejected_by_reason": dict(st.rejected),
            "first_rejections": st.first_errors,
        }

    out_dir = recipe.run_dir / "data"
    # the kept examples of each split, written one JSON line at a time below (rows of a million
    # examples as dicts took ~450 MB more)
    outputs: dict[str, list[GradedExample]] = {}
    need = max(1, data_cfg.min_candidates)
    for split in SPLITS:
        kept, dropped = [], 0
        for ex in merged[split].values():
            if any(c.level < 0 for c in ex.candidates.values()):  # marked by conflict: "drop"
                ex.candidates = {t: c for t, c in ex.candidates.items() if c.level >= 0}
            if len(ex.candidates) >= need:
                kept.append(ex)
            else:
                dropped += 1
        outputs[split] = kept
        merged[split] = {}
        stats["splits"][split] = {**_split_stats(kept), "dropped_too_few_candidates": dropped}
        if dropped:
            warn(f"{split}: {dropped} of {dropped + len(kept)} examples have fewer than {need} candidate(s) "
                 f"(after conflicts were resolved) and are left out; data.min_candidates sets the bound")

    leaked_queries = sum(1 for s in origin_split.values() if s & (s - 1))  # more than one split's bit
    drawn_labels = {label for src, label in zip(data_cfg.sources, source_labels(data_cfg.sources)) if src.split is None}
    stats["leakage"] = {"queries_in_several_splits": leaked_queries, **_held_out_overlap(outputs, drawn_labels)}
    if leaked_queries:
        (_, query), bits = next((k, s) for k, s in origin_split.items() if s & (s - 1))
        splits = " and ".join(split for split in SPLITS if bits & SPLIT_BIT[split])
        warn(f"{leaked_queries} queries are in more than one split (the sources' `split` put them there; "
             f"e.g. {_clip(query)!r} in {splits}): the model trains on these queries, so the dev/test metrics on them "
             "are partly on training data. Kept; for held-out figures leave them out of one of those sources")
    leak = stats["leakage"]
    if leak["dev_test_pairs_in_train"]:
        drawn = leak["drawn_dev_test_pairs_in_train"]
        why = ("They are kept (a published dev set compares whole); leave them out of dev/test sources of your own"
               if not drawn else
               f"{'All' if drawn == leak['dev_test_pairs_in_train'] else drawn} of them are in examples that "
               "data.dev_fraction drew: the data also holds each such pair the other way round (text2 -> text1), "
               "and each direction was drawn by its own query. Read such a source with `symmetric: true` (each row "
               "both ways, the texts its pairs link drawn into one split together; a pair listed in both orders is "
               "then a duplicate, merged), or give a dev source (`split: dev`)")
        warn(f"{leak['dev_test_pairs_in_train']} dev/test (query, candidate) pairs are also train pairs (in either "
             "order): the model is trained on them, so the dev/test metrics on them measure recall of training data, "
             f"not generalisation. {why}")
    drawn = sum(stats["splits"][split]["examples"] + stats["splits"][split]["dropped_too_few_candidates"]
                for split in SPLITS)
    if (data_cfg.dev_fraction > 0 and len(outputs["dev"]) < SMALL_DEV
            and any(src.split is None for src in data_cfg.sources)):
        n_dev = len(outputs["dev"])
        warn(f"dev: {n_dev} example{'' if n_dev == 1 else 's'} of {drawn} queries (data.dev_fraction {data_cfg.dev_fraction:g} "
             "draws each query by a seeded hash): the dev metrics that pick the best checkpoint rest on them; "
             "raise data.dev_fraction or give a dev source (`split: dev`)")

    if not outputs["train"]:
        raise DataError(
            "no training examples were produced"
            + (f" ({sum(sum(s.rejected.values()) for s in per_source.values())} rows rejected)"
               if any(s.rejected for s in per_source.values()) else ""),
            hint="check the sources' paths, formats and `split`, and stats of rejected rows",
        )
    if tokenizer is not None:
        m = recipe.model
        train = outputs["train"]
        stats["token_lengths"] = token_length_stats(
            tokenizer, {"query": [ex.query for ex in train], "candidate": [t for ex in train for t in ex.candidates]},
            {"query": m.query_max_length or m.max_length, "candidate": m.doc_max_length or m.max_length})
        for side, st in stats["token_lengths"].items():
            if st["over_max_length"]:
                warn(truncation_warning(side, st))
        if said := unknown_tokens_warning(stats["token_lengths"], m.name_or_path):
            warn(said)

    for split in SPLITS:
        if outputs[split] or split != "test":
            write_jsonl_atomic(out_dir / f"{split}.jsonl", (ex.to_json() for ex in outputs[split]))
        else:  # no test split this time: an earlier one's file would be evaluated as this data's
            (out_dir / "test.jsonl").unlink(missing_ok=True)
    # an earlier `hmcl mine` kept the training data it mined from; `mine` would start from it
    # again, mining the old data over this one: gone with its report
    for stale in ("train.unmined.jsonl", "mining_report.json"):
        (out_dir / stale).unlink(missing_ok=True)
    stats["made_from"] = made_from(recipe)  # what mine, train and run --resume check the recipe against
    write_json_atomic(out_dir / "stats.json", stats)
    log(f"prepare: wrote {out_dir} (train {len(outputs['train'])}, dev {len(outputs['dev'])}, test {len(outputs['test'])} examples)")
    return stats


# what prepare and mine write under <run>/data
DATA_OUTPUTS = tuple(f"{split}.jsonl" for split in SPLITS) + ("stats.json", "train.unmined.jsonl", "mining_report.json")


def _check_outputs_are_not_sources(recipe: Recipe) -> None:
    """A source that is one of the files prepare (or mine) writes: with ``output_dir: .`` beside a
    ``data/train.jsonl`` source, prepare replaced the user's own file with its graded output."""
    out = recipe.run_dir / "data"
    written = {(out / name).resolve(): name for name in DATA_OUTPUTS}
    for i, src in enumerate(recipe.data.sources):
        path = recipe.resolve(src.path) if src.path else None
        hit = next((f.resolve() for f in source_files(path) if f.resolve() in written), None) if path else None
        if hit is not None:
            raise DataError(
                f"data.sources.{i}.path {src.path} {'matches' if is_pattern(path) else 'is'} {out / written[hit]}, a file "
                f"prepare writes (a run's prepared data goes to <output_dir>/data/, here {out}): preparing would "
                "overwrite your source",
                hint="set output_dir to a folder of its own (the default is runs/${name}), or rename the source file")


def _source_path(recipe: Recipe, src: SourceConfig, st: _SourceStats) -> Optional[Path] | bool:
    if not src.path:
        return None
    path = recipe.resolve(src.path)
    if src.format != "qrels" and is_pattern(path):
        exists = bool(source_files(path))
    else:
        exists = path.is_dir() if src.format == "qrels" else (path.is_file() or is_saved_dataset(path))
    if exists:
        return path
    msg = f"data source {path} {'matches no file' if is_pattern(path) else 'does not exist'}"
    if path.is_dir():  # (a qrels source is a folder; every other format reads a file or a saved dataset)
        msg = (f"data source {path} is a folder; format {src.format} reads a file, or a folder saved by `datasets`' "
               "save_to_disk (with state.json or dataset_dict.json), which this is not (a BEIR folder of corpus, "
               "queries and qrels reads with format: qrels)")
    elif path.is_file():
        msg = f"data source {path} is a file; format qrels reads a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)"
    if recipe.data.on_error == "skip":
        warn(msg + " (skipped, on_error: skip)")
        st.rejected["missing file"] += 1
        st.first_errors.append(msg)
        return False
    i = next(i for i, s in enumerate(recipe.data.sources) if s is src)
    key = ("data", "sources", i, "path")
    written = recipe.written_as(key)
    env = "".join(f", or export {name}=<folder>" for name in recipe.env_names(key))
    raise DataError(msg + (f" (data.sources.{i}.path {written})" if written else ""),
                    hint=f"fix data.sources.{i}.path (relative to the recipe file) or --set it{env}")


def _check_sts_scale(src: SourceConfig, label: str, st: _SourceStats, index: int) -> None:
    """An sts source none of whose pairs reached ``weak``: its scores are on another scale than the
    thresholds (sentence-transformers' STS-B copies score 0-1, the defaults are for 0-5), and every
    pair would train as a negative. An error with the default thresholds, a warning with given ones."""
    if src.format != "sts" or not st.scores or st.levels["pos"] or st.levels["weak"]:
        return
    th = src.level_thresholds()
    lo, hi = st.scores
    said = (f"data source {label}: all {st.levels['neg']} pairs are graded neg: its scores run from {lo:g} to "
            f"{hi:g}, all below the weak threshold {th['weak']:g} (pos {th['pos']:g})")
    key = f"data.sources.{index}"
    if src.thresholds:
        warn(f"{said}; is {key}.thresholds on the scale of its scores?")
        return
    span = f"[{lo:g}, {1 if hi <= 1 else hi:g}]"
    raise DataError(said + " — the default thresholds are for scores from 0 to 5",
                    hint=f"declare the scale, e.g. {key}.score_range: {span} (the thresholds follow it: "
                         f"pos from 80% of the way, weak from 40%), or set {key}.thresholds: {{pos: ..., weak: ...}}")


def _pair_groups(recipe: Recipe, progress: bool) -> Optional[PairGroups]:
    """The groups of texts that the drawn symmetric sources pair (:mod:`hmcl_cli.data.pair_groups`),
    read in a first pass over those sources; ``None`` where no source is both. Bad rows and missing
    files are left to the main pass, which reports them."""
    data_cfg = recipe.data
    drawn = [(src, label) for src, label in zip(data_cfg.sources, source_labels(data_cfg.sources))
             if src.symmetric and src.split is None]  # (the recipe allows `symmetric` on sts, nli, pairs)
    if not drawn or data_cfg.dev_fraction + data_cfg.test_fraction <= 0:
        return None
    groups = PairGroups(recipe.seed, lambda text: seeded_draw(text, recipe.seed))
    for src, label in drawn:
        path = recipe.resolve(src.path) if src.path else None
        if path is not None and not (source_files(path) if is_pattern(path) else path.exists()):
            continue
        bar = ProgressBar(f"prepare {label}: pair groups", None, "examples", enabled=progress)
        n = 0
        try:
            for n, item in enumerate(read_source(src, path), 1):  # (a row's reversed example links the same texts)
                if not isinstance(item, BadRow):
                    ex = item[1]
                    groups.link((ex.prompt or "", ex.query), ((ex.prompt or "", t) for t in ex.candidates))
                if n % 1000 == 0:
                    bar.update(1000)
        finally:
            bar.update(n % 1000)
            bar.close()
    if groups.groups:
        log(f"prepare: {len(groups)} texts of symmetric pairs in {groups.groups} groups (largest {groups.largest()} "
            "texts); each group's split is drawn whole, so no pair is in two splits")
        share = groups.largest() / len(groups)
        drawn_share = min(f for f in (data_cfg.dev_fraction, data_cfg.test_fraction) if f > 0)
        if share > drawn_share / 2 and groups.largest() > SMALL_DEV:
            warn(f"{groups.largest()} of the {len(groups)} texts of symmetric pairs ({share:.0%}) are linked by their "
                 "pairs into one group, which lands in one split whole: the splits' sizes may be far from "
                 f"data.dev_fraction {data_cfg.dev_fraction:g} (test_fraction {data_cfg.test_fraction:g}). A dev "
                 "source of its own (`split: dev`) gives a dev split of the size it holds")
    return groups


def _reject(bad: BadRow, on_error: str, st: _SourceStats) -> None:
    if on_error == "fail" and bad.kind != NO_GOLD_LABEL:
        hint = "fix the row, or set data.on_error: skip to drop bad rows (they are counted in stats.json)"
        if bad.kind == "unknown label":
            hint = ("map the file's labels to levels with the source's `label_map` (e.g. {entailment: pos, "
                    "neutral: weak, contradiction: neg}), or " + hint)
        elif bad.kind == "unknown field":  # every row of the file is likely to have it: skipping drops them all
            hint = "fix the file or the source's `format` as the message says"
        raise DataError(bad.located(), hint=hint)
    st.rejected[bad.kind] += 1
    if len(st.first_errors) < 20:
        st.first_errors.append(bad.located())


def _pair_key(a: str, b: str) -> int:
    """One key for the pair of texts ``a`` and ``b`` in either order."""
    return hash((a, b) if a <= b else (b, a))


def _held_out_overlap(outputs: dict[str, list[GradedExample]], drawn_labels: set) -> dict[str, int]:
    """What the dev and test splits share with train, in three counts that mean different things:

    * ``dev_test_pairs_in_train``: (query, candidate) pairs of dev/test that train also holds, in either
      order — leakage: the dev metrics on them measure what training saw (``drawn_...``: of them, those in
      examples of sources whose split ``dev_fraction`` drew, ``drawn_labels``: hmcl's split, not the user's);
    * ``dev_test_queries_in_train``: dev/test queries that are a train text (query or candidate): the
      model has seen the query, not necessarily with the candidates it is scored on;
    * ``dev_test_candidates_in_train`` of ``dev_test_candidates``: candidates also train texts, per
      example — normal where the splits draw on one collection of documents (retrieval from a fixed
      corpus), so told, not warned about.

    Train's pairs are kept as a sorted array of 64-bit keys (8 bytes a pair, not a set of tuples)."""
    train = outputs["train"]
    train_texts = {t for ex in train for t in _texts(ex)}
    keys = np.fromiter((_pair_key(ex.query, t) for ex in train for t in ex.candidates), dtype=np.int64,
                       count=sum(len(ex.candidates) for ex in train))
    keys.sort()
    held = outputs["dev"] + outputs["test"]
    pairs = np.fromiter((_pair_key(ex.query, t) for ex in held for t in ex.candidates), dtype=np.int64,
                        count=sum(len(ex.candidates) for ex in held))
    drawn = np.fromiter((ex.source in drawn_labels for ex in held for _ in ex.candidates), dtype=bool, count=pairs.size)
    at = np.minimum(np.searchsorted(keys, pairs), max(keys.size - 1, 0))
    found = keys[at] == pairs if keys.size else np.zeros(pairs.size, dtype=bool)
    return {"dev_test_pairs_in_train": int(found.sum()), "drawn_dev_test_pairs_in_train": int((found & drawn).sum()),
            "dev_test_queries_in_train": sum(1 for ex in held if ex.query in train_texts),
            "dev_test_candidates_in_train": sum(1 for ex in held for t in ex.candidates if t in train_texts),
            "dev_test_candidates": int(pairs.size)}


def _texts(ex: GradedExample) -> Iterable[str]:
    yield ex.query
    yield from ex.candidates


def prepared_counts(data_dir: Path) -> dict[str, dict]:
    """Examples and candidates per level of each prepared split file as it is now (the training
    split with what `hmcl mine` added), read line by line: what a model trained on this data saw,
    where stats.json counts what `hmcl prepare` wrote."""
    out: dict[str, dict] = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            continue
        counts = dict.fromkeys(("examples", "pos", "weak", "neg"), 0)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    counts["examples"] += 1
                    for level in ("pos", "weak", "neg"):
                        counts[level] += len(row.get(level) or [])
        out[split] = counts
    return out


def _split_stats(examples: list[GradedExample]) -> dict:
    per_level, with_level = [0, 0, 0], [0, 0, 0]  # by level: neg 0, weak 1, pos 2
    for ex in examples:
        seen = [0, 0, 0]
        for c in ex.candidates.values():
            seen[c.level] += 1
        for level in (0, 1, 2):
            per_level[level] += seen[level]
            with_level[level] += seen[level] > 0
    return {"examples": len(examples), **{name: per_level[level] for name, level in LEVELS.items()},
            **{f"with_{name}": with_level[level] for name, level in LEVELS.items()}}


def token_length_stats(tokenizer: Any, texts: dict[str, Sequence[str]], max_length: Optional[dict] = None,
                       limit: int = 20000) -> dict:
    """Token-length percentiles of each side's texts (``{"query": [...], "candidate": [...]}``),
    and how many exceed ``max_length[side]`` (they will be truncated). Measured on every text
    where a side has at most ``limit``, else on a seeded uniform sample of ``limit`` (``texts``
    measured of ``all_texts``), so a long source after a short one is seen."""
    out = {}
    for side, side_texts in texts.items():
        measured = spread_sample(side_texts, limit)
        if not measured:
            continue
        ids = token_ids(tokenizer, measured)
        lengths = np.array([len(i) for i in ids])
        out[side] = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} | {"max": int(lengths.max())}
        out[side] |= {"texts": len(measured), "all_texts": len(side_texts)}
        if max_length:
            out[side] |= {"max_length": max_length[side],
                          "over_max_length": int((lengths > max_length[side]).sum())}
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and lengths.sum():  # (byte-level tokenizers have none: every text has its tokens)
            unknown = np.array([list(i).count(unk) for i in ids])
            out[side] |= {"unknown_tokens": round(float(unknown.sum() / lengths.sum()), 4),
                          "unknown_token": str(tokenizer.unk_token),
                          "unknown_example": _clip(measured[int(unknown.argmax())])}
    return out


UNKNOWN_SHARE = 0.02  # more of a side's tokens than this the tokenizer's unknown token: a warning


def unknown_tokens_warning(lengths: dict, model: str) -> Optional[str]:
    """Where :func:`token_length_stats` found more than ``UNKNOWN_SHARE`` of a side's tokens to be the
    tokenizer's unknown token, what that means, in words (all-MiniLM-L6-v2 on STS-B's Chinese
    translation: 56% of the tokens); None where no side has that many."""
    over = {side: st for side, st in lengths.items() if st.get("unknown_tokens", 0.0) > UNKNOWN_SHARE}
    if not over:
        return None
    shares = " and ".join(f"{st['unknown_tokens']:.0%} of the {side} texts' tokens" for side, st in over.items())
    st = max(over.values(), key=lambda st: st["unknown_tokens"])
    return (f"{shares} are {model}'s unknown token {st['unknown_token']}: its vocabulary lacks the characters they "
            f"stand for, so the model cannot tell them apart (e.g. {st['unknown_example']!r}). Train a model whose "
            "vocabulary covers the texts: for other scripts than the Latin alphabet, a multilingual one (such as "
            "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2 or BAAI/bge-m3)")


def truncation_warning(side: str, st: dict) -> str:
    """What :func:`token_length_stats` found over max_length on one side, in words."""
    over, measured, total = st["over_max_length"], st["texts"], st.get("all_texts", st["texts"])
    if measured >= total:
        return (f"{over} of {total} {side} texts are longer than {st['max_length']} tokens and will be "
                f"truncated (longest: {st['max']} tokens)")
    return (f"about {over / measured:.1%} of {total} {side} texts ({over} of {measured} drawn at random) are "
            f"longer than {st['max_length']} tokens and will be truncated (longest drawn: {st['max']} tokens)")


def _clip(text: str, width: int = 80) -> str:
    """``text`` for a message: at most ``width`` characters, the cut marked."""
    return text if len(text) <= width else text[:width - 1] + "…"


def load_graded(path: str | Path) -> list[GradedExample]:
    """Read a graded JSONL file (ours or FlagEmbedding's) with the sources' JSON reader; errors
    name the file and line."""
    return list(iter_graded(path))


def iter_graded(path: str | Path) -> Iterator[GradedExample]:
    """:func:`load_graded` one example at a time, for a reader that keeps only what it makes of
    each (training: 899,842 examples held whole at once took 0.96 GB more than its own data). A
    file that does not exist is an error at the call; a bad row when it is reached."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"graded dataset {path} does not exist", hint="run `hmcl prepare RECIPE` first")
    return _graded_rows(path)


def _graded_rows(path: Path) -> Iterator[GradedExample]:
    pool: dict[str, str] = {}  # a candidate text once, however many rows list it
    with gc_paused():
        for item in json_records(path):
            if isinstance(item, BadRow):
                raise DataError(item.located())
            lineno, obj = item
            try:
                example = parse_graded(obj, pool)
            except BadRow as bad:
                raise DataError(f"{path}:{lineno}: {bad.reason}") from None
            yield example


def print_stats(stats: dict) -> None:
    from rich.table import Table

    from hmcl_cli.console import console

    t = Table(title="prepared data", show_lines=False)
    for col in ("split", "examples", "pos", "weak", "neg", "left out (too few candidates)"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, s in stats["splits"].items():
        t.add_row(split, *(str(s[k]) for k in ("examples", "pos", "weak", "neg")),
                  str(s.get("dropped_too_few_candidates", 0)))
    show_table(t)
    src = Table(title="sources")
    for col in ("source", "rows", "examples", "train/dev/test", "pos/weak/neg", "rejected"):
        src.add_column(col)
    for name, s in stats["sources"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in s["rejected_by_reason"].items())
        per_split = "/".join(str(s.get("examples_per_split", {}).get(k, 0)) for k in SPLITS)
        per_level = "/".join(str(s["candidates_per_level"].get(k, 0)) for k in ("pos", "weak", "neg"))
        src.add_row(name, str(s["rows"]), str(s["examples"]), per_split, per_level,
                    f"{s['rejected']}" + (f" ({reasons})" if reasons else ""))
    show_table(src)
    for side, st in stats.get("token_lengths", {}).items():
        measured, total = st.get("texts"), st.get("all_texts")
        drawn = f" ({measured} of {total} texts drawn at random)" if measured and total and measured < total else ""
        hidden = {"all_texts", "unknown_tokens", "unknown_token", "unknown_example"} | ({"texts"} if drawn else set())
        console.print(f"{side} length in tokens{drawn}: " + ", ".join(f"{k} {v}" for k, v in st.items() if k not in hidden))
    leak = stats["leakage"]
    combined = stats.get("combined_same_query", 0)
    console.print((f"examples of a query seen before, joined to it: {combined}; " if combined else "")
                  + f"duplicates removed: {stats['duplicates_removed']}; level conflicts: "
                  f"{stats['conflicts']['count']} (rule: {stats['conflicts']['rule']}); leakage: queries in "
                  f"several splits {leak['queries_in_several_splits']}, dev/test pairs also train pairs "
                  f"{leak['dev_test_pairs_in_train']}, dev/test queries that are train texts "
                  f"{leak['dev_test_queries_in_train']}")
    if leak["dev_test_candidates"]:
        console.print(f"dev/test candidates that are also train texts: {leak['dev_test_candidates_in_train']} of "
                      f"{leak['dev_test_candidates']} (normal where the splits share one document collection)")
