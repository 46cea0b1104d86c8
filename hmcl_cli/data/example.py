"""The graded example: one query with candidates on three levels.

JSONL format (compatible with FlagEmbedding's fine-tune format, plus ``weak``)::

    {"query": "...", "pos": ["..."], "weak": ["..."], "neg": ["..."],
     "pos_scores": [..], "weak_scores": [..], "neg_scores": [..], "prompt": "optional",
     "source": "optional: the data source, written by prepare"}

Levels: pos = 2, weak = 1, neg = 0. ``*_scores`` are optional finer similarities; an entry may
be ``null`` (that candidate has no score: mined with ``mine.scores: none``, or merged from a
source without scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, TypeVar

T = TypeVar("T")

LEVELS = {"pos": 2, "weak": 1, "neg": 0}
LEVEL_NAMES = {v: k for k, v in LEVELS.items()}


def spread_sample(items: Sequence[T], limit: int, seed: int = 0) -> list[T]:
    """At most ``limit`` of ``items``, in their order: all of them when there are no more, else a
    seeded uniform draw. Never the first ``limit``: prepared data run source by source, so the
    head of a list of short texts followed by long ones says nothing about the long ones."""
    if len(items) <= limit:
        return list(items)
    import numpy as np

    picked = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[int(i)] for i in picked]


class BadRow(ValueError):
    """A row that cannot become (part of) a graded example; ``reason`` says why."""

    def __init__(self, reason: str, file: str = "", line: int | str = "", kind: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.file = file
        self.line = line
        self.kind = kind or reason.split(":")[0]

    def located(self) -> str:
        where = f"{self.file}:{self.line}" if self.line != "" else self.file
        return f"{where}: {self.reason}"


# slotted: prepare and training hold millions of these (a candidate 56 bytes instead of ~150)
@dataclass(slots=True)
class Candidate:
    text: str
    level: int
    score: Optional[float] = None


@dataclass(slots=True)
class GradedExample:
    query: str
    candidates: dict[str, Candidate] = field(default_factory=dict)
    prompt: Optional[str] = None
    source: Optional[str] = None  # the data source it came from (first one, when merged)

    def levels(self) -> dict[int, list[Candidate]]:
        out: dict[int, list[Candidate]] = {2: [], 1: [], 0: []}
        for c in self.candidates.values():
            out[c.level].append(c)
        return out

    def to_json(self) -> dict:
        row: dict = {"query": self.query}
        by_level = self.levels()
        for name, level in LEVELS.items():
            row[name] = [c.text for c in by_level[level]]
        for name, level in LEVELS.items():
            scores = [c.score for c in by_level[level]]
            if any(s is not None for s in scores):  # null where one candidate has none: no score is lost
                row[f"{name}_scores"] = scores
        if self.prompt:
            row["prompt"] = self.prompt
        if self.source:
            row["source"] = self.source
        return row


GRADED_FIELDS = ("query", "pos", "weak", "neg", "pos_scores", "weak_scores", "neg_scores", "prompt", "source")


def _graded_field_advice(obj: dict, unknown: set) -> str:
    """What a row with fields the graded format does not know most likely is: the rows of a table
    format (sentence-transformers' anchor/positive/negative JSON lines are `format: triplets`), or a
    misspelt graded field."""
    from hmcl_cli.recipe import suggest

    names = {str(k).lower() for k in obj}
    fmt = None if names & {"pos", "weak", "neg"} else _table_format(names)  # with them: a graded row
    if fmt is not None:
        return (f": these are the fields of rows of `format: {fmt}`; set the source's `format: {fmt}` (and "
                "`columns` where a role's name is not one it knows)")
    said = [f"{k!r}: did you mean {close!r}?" for k in sorted(unknown, key=str)
            if (close := suggest(str(k), list(GRADED_FIELDS)))]
    if said:
        return f" ({'; '.join(said)})"
    return ("; a graded row holds only these (and id, type, query_id, meta): leave the others out of the file, or "
            "read it with a table format (`format: pairs`, `triplets`, `sts`, `nli`) and its `columns`")


def _table_format(names: set[str]) -> Optional[str]:
    """The table format whose roles the (lower-cased) field names fill, if one does."""
    from hmcl_cli.data.readers import ROLE_ALIASES

    def has(role: str) -> bool:
        return bool(names & {a.lower() for a in ROLE_ALIASES[role]})

    if not has("query"):
        return None
    if has("positive"):
        return "triplets"
    if has("candidate") and has("score"):
        return "sts"
    if has("candidate") and has("label"):
        return "nli" if names & {"premise", "hypothesis", "entailment_judgment", "gold_label"} else "pairs"
    return None


def parse_graded(obj: object, pool: Optional[dict[str, str]] = None) -> GradedExample:
    """Validate one JSON object of the graded format; raise BadRow with the reason. With
    ``pool``, candidate texts are kept once per file: a text seen before is the earlier
    string object (mined or corpus-drawn negatives repeat across rows)."""
    if not isinstance(obj, dict):
        raise BadRow(f"expected a JSON object, got {type(obj).__name__}", kind="not an object")
    unknown = set(obj) - {"query", "prompt", "source", *LEVELS, *(f"{k}_scores" for k in LEVELS)}
    unknown -= {"type", "id", "query_id", "meta"}  # common harmless extras
    if unknown:
        raise BadRow(
            f"unknown field(s) {sorted(unknown)}; expected query, pos, weak, neg, "
            "*_scores, prompt" + _graded_field_advice(obj, unknown),
            kind="unknown field",
        )
    query = obj.get("query")
    if not isinstance(query, str):
        raise BadRow("`query` must be a string", kind="missing query")
    if not query.strip():
        raise BadRow("empty text in `query`", kind="empty text")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRow("`prompt` must be a string", kind="bad prompt")
    source = obj.get("source")
    ex = GradedExample(query=query, prompt=prompt or None, source=str(source) if source else None)
    for name, level in LEVELS.items():
        texts = obj.get(name)
        if texts is None:  # left out, or null (a parquet table's list column without a value)
            texts = []
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRow(f"`{name}` must be a list of strings", kind="bad candidates")
        scores = obj.get(f"{name}_scores")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != len(texts):
                raise BadRow(
                    f"`{name}_scores` must be a list as long as `{name}` "
                    f"({len(texts)} items)",
                    kind="bad scores",
                )
            for s in scores:
                if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                    raise BadRow(f"`{name}_scores` holds a non-number {s!r} (use null for no score)",
                                 kind="bad scores")
        for i, text in enumerate(texts):
            if not text.strip():
                raise BadRow(f"empty text in `{name}`[{i}]", kind="empty text")
            score = float(scores[i]) if scores is not None and scores[i] is not None else None
            add_candidate(ex, text if pool is None else pool.setdefault(text, text), level, score, conflict="highest")
    if not ex.candidates:
        raise BadRow("no candidates (pos, weak and neg are all empty)", kind="no candidates")
    return ex


def add_candidate(
    ex: GradedExample, text: str, level: int, score: Optional[float], conflict: str
) -> str:
    """Add a candidate; returns 'added', 'duplicate' or 'conflict'."""
    old = ex.candidates.get(text)
    if old is None:
        ex.candidates[text] = Candidate(text, level, score)
        return "added"
    if old.level == level:
        if old.score is None and score is not None:
            old.score = score
        return "duplicate"
    if conflict == "highest" and level > old.level or conflict == "lowest" and level < old.level:
        ex.candidates[text] = Candidate(text, level, score)
    elif conflict == "drop":
        old.level = -1  # marked; removed when the example is finalised
    return "conflict"
