"""Training data: tokenise once (cached), length-grouped batches, graded candidate groups.

Each step's batch is a deterministic function of (seed, epoch, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.profiler import record_function

from hmcl_cli.console import ProgressBar, log
from hmcl_cli.data.example import GradedExample
from hmcl_cli.io_utils import atomic_path, gc_paused, use_cache_entry
from hmcl_cli.modeling.tokenizing import PACK_CHUNK, TokenLists


def text_id(text: str) -> int:
    """A 63-bit hash of a text, used to mask identical texts across the (gathered) batch."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


@dataclass(slots=True)  # one per training example: millions
class Anchor:
    query: int  # index into TrainData.query_tokens
    pos: list[tuple[int, Optional[float]]]
    weak: list[tuple[int, Optional[float]]]
    neg: list[tuple[int, Optional[float]]]
    source: int = 0  # which data source the example came from (batches can be kept per source)


class AnchorTable(Sequence):
    """The training anchors as flat arrays, an :class:`Anchor` made on access (``table[i]``).

    One Anchor object per example, with its lists of (doc, score) tuples, took about 600 bytes:
    0.54 GB of a process's memory at 899,842 triplet anchors (measured: resident memory with the
    anchors and without them), held by every process of a training. Here an anchor is its query
    and source, and each candidate a doc index and a score (NaN: none; scores are finite), its
    positives, weak-positives and negatives in that order, each in the order the example lists
    them: ``table[i]`` equals the Anchor it was built from."""

    def __init__(self, query: np.ndarray, source: np.ndarray, ends: np.ndarray, n_pos: np.ndarray,
                 n_weak: np.ndarray, docs: np.ndarray, scores: np.ndarray):
        self.query, self.source, self.ends = query, source, ends  # ends[i]: where anchor i's candidates end
        self.n_pos, self.n_weak, self.docs, self.scores = n_pos, n_weak, docs, scores

    @classmethod
    def of(cls, anchors: Sequence[Anchor]) -> "AnchorTable":
        build = AnchorTableBuilder()
        for a in anchors:
            build.add(a.query, a.pos, a.weak, a.neg, a.source)
        return build.table()

    def __len__(self) -> int:
        return len(self.query)

    def __getitem__(self, i: int) -> Anchor:  # (an int: the table is read one anchor at a time)
        n = len(self.query)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"anchor {i} of {n}")
        start, end = (int(self.ends[i - 1]) if i else 0), int(self.ends[i])
        p, w = start + int(self.n_pos[i]), start + int(self.n_pos[i]) + int(self.n_weak[i])
        items = list(zip(self.docs[start:end].tolist(),
                         [None if s != s else s for s in self.scores[start:end].tolist()]))  # NaN: no score
        return Anchor(int(self.query[i]), items[: p - start], items[p - start: w - start], items[w - start:],
                      int(self.source[i]))

    def has_positive(self) -> np.ndarray:
        return self.n_pos > 0

    def unscored_counts(self) -> tuple[int, int, int]:
        """(pairs, pairs without a score, those of anchors whose every positive has a score): what
        :func:`~hmcl_cli.losses.ranking.describe_ranking_pairs` counts, from the arrays."""
        before = np.concatenate([[0], np.cumsum(np.isnan(self.scores), dtype=np.int64)])
        starts = self.ends - np.diff(self.ends, prepend=0)
        unscored = before[self.ends] - before[starts]
        pos_scored = (self.n_pos > 0) & (before[starts + self.n_pos] == before[starts])
        return int(self.ends[-1]) if len(self.ends) else 0, int(unscored.sum()), int(unscored[pos_scored].sum())

    def sizes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positives, weak-positives and negatives per anchor."""
        total = np.diff(self.ends, prepend=0)
        return self.n_pos, self.n_weak, total - self.n_pos - self.n_weak


class AnchorTableBuilder:
    """An :class:`AnchorTable` built one anchor at a time, in compact buffers (no object per anchor)."""

    def __init__(self) -> None:
        import array

        self._query, self._source = array.array("q"), array.array("q")
        self._ends, self._n_pos, self._n_weak = array.array("q"), array.array("q"), array.array("q")
        self._docs, self._scores = array.array("q"), array.array("d")

    def add(self, query: int, pos: Sequence, weak: Sequence, neg: Sequence, source: int = 0) -> None:
        """One anchor: its query index, its (doc, score or None) candidates per level, its source."""
        nan = float("nan")
        for items in (pos, weak, neg):
            for doc, score in items:
                self._docs.append(doc)
                self._scores.append(nan if score is None else score)
        self._query.append(query)
        self._source.append(source)
        self._n_pos.append(len(pos))
        self._n_weak.append(len(weak))
        self._ends.append(len(self._docs))

    def table(self) -> AnchorTable:
        def arr(buf: Any, dtype: Any) -> np.ndarray:
            return np.frombuffer(buf, dtype=np.int64 if buf.typecode == "q" else np.float64).astype(dtype)

        return AnchorTable(arr(self._query, np.int64), arr(self._source, np.int32), arr(self._ends, np.int64),
                           arr(self._n_pos, np.int32), arr(self._n_weak, np.int32), arr(self._docs, np.int64),
                           arr(self._scores, np.float64))


def lengths_of(tokens: Sequence) -> np.ndarray:
    """Each token list's length (a TokenLists knows them; otherwise counted)."""
    if isinstance(tokens, TokenLists):
        return tokens.lengths()
    return np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))


def pack_tokens(tokens: Sequence, name: str, segmented: bool) -> dict[str, np.ndarray]:
    """Token id lists as flat arrays for the token cache (a pickle of a million Python lists took
    longer to load than tokenising them again): ``<name>_ids`` every id in order, ``<name>_ends``
    where each list ends; with segments (each text a list of (ids, weight)) each segment is one
    list, with ``<name>_weights`` per segment and ``<name>_texts`` where each text's segments end."""
    if not segmented:
        flat = tokens if isinstance(tokens, TokenLists) else TokenLists.of(tokens)
        return {f"{name}_ids": flat.ids, f"{name}_ends": flat.ends}
    flat = TokenLists.of([ids for segs in tokens for ids, _ in segs])
    return {f"{name}_ids": flat.ids, f"{name}_ends": flat.ends,
            f"{name}_weights": np.array([w for segs in tokens for _, w in segs], dtype=np.int64),
            f"{name}_texts": np.cumsum(np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)))}


def unpack_tokens(arrays: Any, name: str, segmented: bool) -> Sequence:
    """What :func:`pack_tokens` packed: a :class:`TokenLists`, or with segments each text's list
    of (ids, weight) as it was."""
    flat = TokenLists(arrays[f"{name}_ids"], arrays[f"{name}_ends"])
    if not segmented:
        return flat
    lists = _split(flat.ids.tolist(), flat.ends.tolist())  # (Python lists: segments are tokenised as such)
    return _split(list(zip(lists, arrays[f"{name}_weights"].tolist())), arrays[f"{name}_texts"].tolist())


def _split(items: list, ends: list) -> list:
    """``items`` cut into consecutive lists, each ending at the next of ``ends``."""
    return [items[a:b] for a, b in zip([0] + ends[:-1], ends)]


class TrainData:
    """Tokenised graded examples: distinct queries and distinct candidate texts, each once.

    Once tokenised and hashed the texts themselves are let go (``queries`` and ``docs`` are None,
    ``n_queries`` and ``n_docs`` count them): training reads token ids, and every process of a
    training held them all as Python strings (899,842 anchors, a tiny model: 2.57 GB resident once
    built, 1.66 GB without the texts). ``KEEP_TEXTS`` keeps them (tests that look texts up). The
    anchors are an :class:`AnchorTable` (arrays), and the examples are read as they come: with both,
    1.23 GB resident once built, 1.99 GB at the peak (2.68 GB before)."""

    KEEP_TEXTS = False

    def __init__(self, examples: Iterable[GradedExample], model: Any, cache_dir: Optional[Path] = None, data_key: str = "",
                 check: Optional[Callable[[AnchorTable], None]] = None):
        """``examples``: read once, in order (an iterator: :func:`~hmcl_cli.data.prepare.iter_graded`
        keeps none of them). ``check``: called with the anchors before the texts are tokenised (a
        problem with the data is then said before that work)."""
        with gc_paused():  # millions of token lists (io_utils.gc_paused)
            self._build(examples, model, cache_dir, data_key, check)

    def _build(self, examples: Iterable[GradedExample], model: Any, cache_dir: Optional[Path], data_key: str,
               check: Optional[Callable[[AnchorTable], None]] = None) -> None:
        query_index: dict[tuple, int] = {}
        doc_index: dict[str, int] = {}
        build = AnchorTableBuilder()
        sources: dict[Optional[str], int] = {}  # label -> Anchor.source
        for ex in examples:
            qi = query_index.setdefault((ex.prompt, ex.query), len(query_index))
            groups: dict[int, list] = {2: [], 1: [], 0: []}
            for text, cand in ex.candidates.items():
                groups[cand.level].append((doc_index.setdefault(text, len(doc_index)), cand.score))
            build.add(qi, groups[2], groups[1], groups[0], sources.setdefault(ex.source, len(sources)))
        self.anchors: AnchorTable = build.table()
        self.source_names = list(sources)  # Anchor.source -> the examples' `source` label (None: none)
        if check is not None:
            check(self.anchors)
        self.queries = list(query_index)
        self.docs = list(doc_index)
        self.query_hash = np.array([text_id(q) for _, q in self.queries], dtype=np.int64)
        self.doc_hash = np.array([text_id(d) for d in self.docs], dtype=np.int64)
        # with model.segments each text is a list of segments (token id lists) and the segments'
        # content token counts are their pooling weights; otherwise each text is one id list
        self.segments = getattr(model, "segments", None)
        self.query_tokens, self.doc_tokens = self._tokenize(model, cache_dir, data_key)
        # leading tokens the pooling leaves out (the prompt's, where the model's pooling does not
        # include it): per query (its own prompt or the side's), one count for the documents
        self.query_skip: Optional[np.ndarray] = None
        self.doc_skip = model.prompt_skip("doc")
        if not model.settings.include_prompt:
            default = model.settings.query_prompt
            skips = np.array([model.prompt_skip("query", default if p is None else p) for p, _ in self.queries],
                             dtype=np.int64)
            if skips.any() or self.doc_skip:
                self.query_skip = skips
        self.n_queries, self.n_docs = len(self.queries), len(self.docs)
        if not self.KEEP_TEXTS:
            self.queries = self.docs = None  # type: ignore[assignment]

    def _tokenize(self, model: Any, cache_dir: Optional[Path], data_key: str) -> tuple[Sequence, Sequence]:
        s = model.settings
        key_src = json.dumps({"tok": type(model.tokenizer).__name__, "vocab": len(model.tokenizer),
                              "name": getattr(model.tokenizer, "name_or_path", ""),
                              "settings": [s.query_prompt, s.doc_prompt, s.query_max_length, s.doc_max_length, s.append_eos,
                                           s.lowercase],
                              "segments": str(self.segments),
                              "data": data_key, "n": [len(self.queries), len(self.docs)]}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        cache = cache_dir / f"tokens-{key}.npz" if cache_dir and data_key else None
        segmented = self.segments is not None
        if cache is not None and cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as blob:
                    q_tokens = unpack_tokens(blob, "q", segmented)
                    d_tokens = unpack_tokens(blob, "d", segmented)
                if (len(q_tokens), len(d_tokens)) == (len(self.queries), len(self.docs)):
                    log(f"tokens: reused cache {cache.name}")
                    use_cache_entry(cache)
                    return q_tokens, d_tokens
            except Exception:  # noqa: BLE001 - a broken cache is rebuilt
                pass
        by_prompt: dict = {}
        for i, (prompt, _) in enumerate(self.queries):
            by_prompt.setdefault(prompt, []).append(i)
        default = s.query_prompt
        parts = []
        try:
            with ProgressBar("tokenize queries", len(self.queries), "texts", enabled=len(self.queries) > 20000) as bar:
                for prompt, idx in by_prompt.items():
                    s.query_prompt = prompt if prompt is not None else default
                    parts.append(self._tokenize_many(model, [self.queries[i][1] for i in idx], "query", bar))
        finally:
            s.query_prompt = default
        # the prompts' groups in the queries' order
        asked = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in by_prompt.values()]) if by_prompt \
            else np.zeros(0, np.int64)
        if segmented:
            q_tokens: Sequence = [None] * len(self.queries)
            for i, ids in zip(asked.tolist(), (t for part in parts for t in part)):
                q_tokens[i] = ids
        else:
            q_tokens = TokenLists.joined(parts)
            if not np.array_equal(asked, np.arange(len(asked))):
                q_tokens = q_tokens.take(np.argsort(asked, kind="stable"))
        with ProgressBar("tokenize candidates", len(self.docs), "texts", enabled=len(self.docs) > 20000) as bar:
            d_tokens: Sequence = self._tokenize_many(model, self.docs, "doc", bar)
        if cache is not None:  # every process of a multi-process run may write it: each its own temp file
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.savez(f, **pack_tokens(q_tokens, "q", segmented), **pack_tokens(d_tokens, "d", segmented))
            use_cache_entry(cache)
        return q_tokens, d_tokens

    TOKENIZE_CHUNK = PACK_CHUNK  # texts tokenised at a time

    def _tokenize_many(self, model: Any, texts: list[str], side: str, bar: ProgressBar) -> Sequence:
        """``texts`` tokenised ``TOKENIZE_CHUNK`` at a time, each chunk packed before the next is made: the
        tokenizer's Python lists of a million texts at once (ids, mask and type ids, ~36 bytes a
        token) took gigabytes more than the packed ids. With segments, a list of each text's
        segments."""
        chunk = self.TOKENIZE_CHUNK
        if self.segments is None:
            return TokenLists.tokenized(lambda part: self._tokenize_side(model, part, side), texts, chunk, bar.update)
        out: list = []
        for start in range(0, len(texts), chunk):
            got = self._tokenize_side(model, texts[start:start + chunk], side)
            out.extend(got)
            bar.update(len(got))
        return out

    def _tokenize_side(self, model: Any, texts: list[str], side: str) -> list:
        if self.segments is None:
            return model.tokenize(texts, side=side)
        from hmcl_cli.modeling.segments import split_segments

        weighted = self.segments.pooling == "weighted"
        return [[(ids, n if weighted else 1) for ids, n in segs]
                for segs in split_segments(model, texts, side, self.segments)]

    def token_count(self, side: str, i: int) -> int:
        """Tokens of text ``i`` of ``side`` ("query" / "doc") as encoded (all its segments)."""
        t = (self.query_tokens if side == "query" else self.doc_tokens)[i]
        return sum(len(ids) for ids, _ in t) if self.segments is not None else len(t)

    def longest(self) -> tuple[int, int]:
        """Longest query and document in tokens (segments: the longest segment), for the planner."""
        def side(tokens: Sequence) -> int:
            if self.segments is None:
                lengths = lengths_of(tokens)
                return int(lengths.max()) if lengths.size else 1
            return max((len(ids) for segs in tokens for ids, _ in segs), default=1)
        return side(self.query_tokens), side(self.doc_tokens)

    def heaviest_step(self, batch_size: int, group_size: int) -> tuple[int, int]:
        """The most real tokens one step's queries and candidates can hold: the ``batch_size``
        longest queries and the ``batch_size x group_size`` longest documents of the data (an
        upper bound of any batch; for the planner of unpadded runs)."""
        def top(tokens: Sequence, k: int) -> int:
            lengths = lengths_of(tokens)
            k = min(k, lengths.size)
            return int(np.partition(lengths, lengths.size - k)[lengths.size - k:].sum()) if k else 0
        return top(self.query_tokens, batch_size), top(self.doc_tokens, batch_size * group_size)

    def segments_per_text(self) -> tuple[int, int]:
        """Most segments of one query / one document (1 without segments), for the planner."""
        if self.segments is None:
            return 1, 1
        return (max(map(len, self.query_tokens), default=1), max(map(len, self.doc_tokens), default=1))

    def anchor_length(self, i: int) -> int:
        return self.token_count("query", int(self.anchors.query[i]))


def with_positive(anchors: AnchorTable) -> int:
    """How many of ``anchors`` have a positive."""
    return int(anchors.has_positive().sum())


def resolve_positive_repeats(setting: int | str, anchors: AnchorTable) -> int:
    """``train.positive_repeats`` as a number: ``auto`` is 2 where fewer than half of the anchors
    have a positive (graded STS/NLI-style data, where InfoNCE sees few rows per step), else 1
    (retrieval-style data, where nearly every anchor has one and repeats would only lengthen the
    epoch)."""
    if setting != "auto":
        return int(setting)
    return 2 if 2 * with_positive(anchors) < len(anchors) else 1


class BatchPlan:
    """Which anchors form each step's batch, per epoch.

    Anchors are shuffled per epoch (seeded), sorted by length within mega-batches of 16 batches
    (less padding), cut into global batches and the batches shuffled. With ``by_source`` and
    training data from several sources, every batch holds anchors of one source only, so
    in-batch negatives and the ranking term's pairs never mix two datasets' annotation scales
    (a batch of STS scores 0-5 is never ranked against one of relatedness 1-5). With
    ``positive_repeats`` r > 1, an anchor that has a positive is listed r times per epoch (the
    epoch grows accordingly); its copies land in different batches unless the shuffle puts them
    together. ``source_weights`` (per ``Anchor.source``, ``data.sources[].weight``) list each anchor of
    a source that many times more (a fraction: that share of the source's anchors, drawn again each
    epoch; the epoch's length stays fixed).
    """

    def __init__(self, data: TrainData, batch_size: int, seed: int, world_size: int = 1, group_by_length: bool = True,
                 by_source: bool = True, positive_repeats: int = 1, source_weights: Sequence[float] = ()):
        self.data, self.batch_size, self.seed, self.world = data, batch_size, seed, world_size
        self.group_by_length = group_by_length
        n_global = batch_size * world_size
        groups: dict[int, list[int]] = {}
        # a weight's fraction: per (group, source, copies) the anchors one is drawn from, each epoch
        drawn: dict[tuple, list[int]] = {}
        has_pos, anchor_sources = data.anchors.has_positive().tolist(), data.anchors.source.tolist()
        for i, (pos, source) in enumerate(zip(has_pos, anchor_sources)):
            copies = positive_repeats if pos else 1
            weight = source_weights[source] if source < len(source_weights) else 1.0
            whole, fraction = int(weight), weight - int(weight)
            group = source if by_source else 0
            groups.setdefault(group, []).extend([i] * (whole * copies))
            if fraction > 1e-9:
                drawn.setdefault((group, source, copies, fraction), []).append(i)
        keys = list(groups)
        self.groups = [groups[k] for k in keys]
        # per group: (anchors, how many of them are drawn per epoch, copies of each)
        self.drawn: list[list[tuple[list[int], int, int]]] = [
            [(pool, round(fraction * len(pool)), copies) for (g, _, copies, fraction), pool in drawn.items() if g == k]
            for k in keys]
        sizes = [len(g) + sum(n * copies for _, n, copies in d) for g, d in zip(self.groups, self.drawn)]
        self.anchors_per_epoch = sum(sizes)
        per_group = [n // n_global if world_size > 1 else -(-n // n_global) for n in sizes]
        self.steps_per_epoch = sum(per_group)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data.anchors)} training anchors are fewer than one global batch ({n_global})")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n_global = self.batch_size * self.world
        batches: list[list[int]] = []
        pick = np.random.default_rng([self.seed, epoch, 1])  # fractional weights' draws (apart: unweighted plans stay as they were)
        for group, drawn in zip(self.groups, self.drawn):
            if drawn:  # a fractional source weight: this epoch's share of the group's anchors
                group = group + [pool[j] for pool, n, copies in drawn
                                 for j in np.sort(pick.choice(len(pool), n, replace=False)) for _ in range(copies)]
            if not group:
                continue
            order = [group[i] for i in rng.permutation(len(group))]
            if self.group_by_length:
                mega = n_global * 16
                order = [i for s in range(0, len(order), mega)
                         for i in sorted(order[s:s + mega], key=lambda i: -self.data.anchor_length(int(i)))]
            cut = [list(map(int, order[s:s + n_global])) for s in range(0, len(order), n_global)]
            if self.world > 1:  # every process needs a full share
                cut = [b for b in cut if len(b) == n_global]
            batches.extend(cut)
        return [batches[i] for i in rng.permutation(len(batches))]


def sample_group(anchor: Anchor, group_size: int, rng: np.random.Generator) -> list[tuple[int, int, Optional[float]]]:
    """(doc index, level, score) for one anchor: one positive (if any), then weak and negatives."""
    out: list[tuple[int, int, Optional[float]]] = []

    def take(items: list, level: int, k: int) -> None:
        if k <= 0 or not items:
            return
        idx = rng.permutation(len(items))[:k]
        out.extend((items[i][0], level, items[i][1]) for i in idx)

    take(anchor.pos, 2, 1)
    room = group_size - len(out)
    n_weak = min(len(anchor.weak), (room + 1) // 2 if anchor.neg else room)
    take(anchor.weak, 1, n_weak)
    take(anchor.neg, 0, group_size - len(out))
    if len(out) < group_size and len(anchor.weak) > n_weak:
        extra = [w for w in anchor.weak if w[0] not in {o[0] for o in out}]
        take(extra, 1, group_size - len(out))
    return out


def group_fill(anchors: AnchorTable, group_size: int) -> float:
    """Mean candidates per anchor that :func:`sample_group` can take (one positive at most)."""
    if not len(anchors):
        return 0.0
    pos, weak, neg = anchors.sizes()
    return float(np.mean(np.minimum(group_size, np.minimum(1, pos) + weak + neg)))


def collate(data: TrainData, model: Any, anchor_ids: Sequence[int], group_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Token tensors for the batch's anchors and distinct candidates, plus the labelled pairs."""
    cols: dict[int, int] = {}
    pa, pc, pl, ps = [], [], [], []
    anchors = [data.anchors[ai] for ai in anchor_ids]
    queries = [a.query for a in anchors]
    for row, anchor in enumerate(anchors):
        for doc, level, score in sample_group(anchor, group_size, rng):
            col = cols.setdefault(doc, len(cols))
            pa.append(row)
            pc.append(col)
            pl.append(level)
            ps.append(float("nan") if score is None else score)
    q_ids = [data.query_tokens[q] for q in queries]
    docs = list(cols)
    d_ids = [data.doc_tokens[d] for d in docs]
    q_skip = data.query_skip[queries] if data.query_skip is not None else None
    segmented = {}
    if data.segments is not None:  # rows become segments; owner/weight map them back to texts
        for side, texts in (("q", q_ids), ("c", d_ids)):
            segmented[f"{side}_segment_owner"] = torch.tensor([t for t, segs in enumerate(texts) for _ in segs], dtype=torch.long)
            segmented[f"{side}_segment_weight"] = torch.tensor([w for segs in texts for _, w in segs], dtype=torch.float32)
        if q_skip is not None:  # every segment holds the prompt
            q_skip = np.repeat(q_skip, [len(segs) for segs in q_ids])
        q_ids = [ids for segs in q_ids for ids, _ in segs]
        d_ids = [ids for segs in d_ids for ids, _ in segs]
    q = model.pad(q_ids)
    batch = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
             "pair_anchor": torch.tensor(pa, dtype=torch.long), "pair_candidate": torch.tensor(pc, dtype=torch.long),
             "pair_level": torch.tensor(pl, dtype=torch.long), "pair_score": torch.tensor(ps, dtype=torch.float32),
             "anchor_hash": torch.tensor(data.query_hash[queries], dtype=torch.long),
             "candidate_hash": torch.tensor(data.doc_hash[docs] if docs else np.zeros(0, np.int64), dtype=torch.long),
             "n_tokens": torch.tensor(sum(map(len, q_ids)) + sum(map(len, d_ids))), **segmented}
    if q_skip is not None:
        batch["q_pool_skip"] = torch.from_numpy(np.ascontiguousarray(q_skip))
        batch["c_pool_skip"] = torch.full((len(d_ids),), data.doc_skip, dtype=torch.long)
    if d_ids:
        d = model.pad(d_ids)
        batch["c_input_ids"], batch["c_attention_mask"] = d["input_ids"], d["attention_mask"]
    else:
        batch["c_input_ids"] = torch.zeros((0, 8), dtype=torch.long)
        batch["c_attention_mask"] = torch.zeros((0, 8), dtype=torch.long)
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is the collated batch of step ``start + i`` of ``epoch``
    for this process's rank (so DataLoader workers can collate ahead)."""

    def __init__(self, data: TrainData, model: Any, plan: BatchPlan, epoch: int, start: int, group_size: int, rank: int):
        self.data, self.model, self.plan, self.epoch, self.group_size, self.rank = data, model, plan, epoch, group_size, rank
        self.batches = plan.epoch_batches(epoch)
        self.start = start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step = self.start + i
        global_batch = self.batches[step]
        b = self.plan.batch_size
        mine = global_batch[self.rank * b:(self.rank + 1) * b]
        rng = np.random.default_rng([self.plan.seed, self.epoch, step, self.rank, 7])
        with record_function("hmcl.collate"):  # a range in torch.profiler's tables (~5 µs a call without one)
            return collate(self.data, self.model, mine, self.group_size, rng)
