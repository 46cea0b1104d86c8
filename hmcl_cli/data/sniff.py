"""What a data file holds: the source settings that read it (``hmcl recipe new``).

:func:`guess_source` looks at a file's first rows (by default up to 50,000): its columns' names
where it has a header, else what the columns hold (long texts, numbers, a few label names), and
picks the format, the columns, the score range or label map and ``symmetric`` that read it. The
guess is then read back with the same reader ``hmcl prepare`` uses, so a guess the reader would
reject is found here, not in the first stage of the run. Each decision comes with the evidence
for it, in words (``Guess.reasons``), for the recipe's comments::

    from hmcl_cli.data.sniff import guess_source
    g = guess_source(Path("faq.csv"))
    g.format, g.columns, g.reasons   # 'pairs', {}, ['columns question, answer, label: ...', ...]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hmcl_cli.data.example import BadRow
from hmcl_cli.data.readers import (DEFAULT_INDEX, ROLE_ALIASES, Columns, file_type, is_saved_dataset,
                                   read_source, records)
from hmcl_cli.errors import DataError
from hmcl_cli.io_utils import binary_lines, find_data_file, is_utf8
from hmcl_cli.recipe import SourceConfig

SAMPLE_ROWS = 50000
FALLBACK_ENCODING = "cp1252"  # a file whose lines are not UTF-8 is read so
NLI_NAMES = {"entailment", "neutral", "contradiction"}
BINARY = {"0", "1", "true", "false"}
NLI_COLUMNS = {"premise", "hypothesis", "gold_label"}  # names that make labels 0, 1, 2 NLI's
ID_NAMES = {"id", "_id", "idx", "index", "qid", "pid", "docid", "doc_id"}
# two-valued labels whose meaning is plain: which of them is the positive
POSITIVE_WORDS = {"yes", "true", "relevant", "match", "matched", "similar", "duplicate", "positive", "pos", "correct",
                  "good", "same", "paraphrase"}
NEGATIVE_WORDS = {"no", "false", "irrelevant", "not_relevant", "nonrelevant", "mismatch", "dissimilar", "not_duplicate",
                  "negative", "neg", "incorrect", "wrong", "bad", "different", "not_paraphrase"}
_PAIRED_NAME = re.compile(r"^(.*?)[_\s-]?([12ab])$", re.IGNORECASE)  # sentence1/sentence2, text_a/text_b, s1/s2


@dataclass
class Guess:
    """How to read one data file, and why (see the module docstring)."""

    path: Path
    format: str
    columns: dict[str, Union[str, int]] = field(default_factory=dict)  # only what the reader would not find itself
    score_range: Optional[tuple[float, float]] = None
    label_map: Optional[dict[str, str]] = None
    symmetric: bool = False
    delimiter: Optional[str] = None
    rows: int = 0  # rows read (at most the sample)
    more_rows: bool = False  # the file holds more rows than were read
    queries: int = 0  # distinct queries among the examples read
    candidates: int = 0  # distinct candidate texts among them
    levels: Counter = field(default_factory=Counter)  # candidates read per level name
    reasons: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # the first rows of the sample the reader rejects (file:line: why)
    rejected_rows: int = 0  # how many it rejects
    total_rows: Optional[int] = None  # rows of the whole file, where it is a text file (lines less a header)
    header: bool = False  # a delimited file's first row names its columns
    qrels_split: Optional[str] = None  # a BEIR folder's qrels file, where it has no train.tsv
    header_key: Optional[bool] = None  # `header:` where the reader would not tell the header row itself
    encoding: str = "utf-8"
    texts: dict[str, list[str]] = field(default_factory=dict)  # a seeded draw of its queries and candidates

    def source(self, **more: Any) -> SourceConfig:
        """The data source that reads the file as guessed (``more``: split, name, ...)."""
        if self.qrels_split:
            more.setdefault("qrels_split", self.qrels_split)
        more.setdefault("encoding", self.encoding)
        return SourceConfig(path=str(self.path), format=self.format, columns=dict(self.columns),
                            score_range=self.score_range, label_map=self.label_map, symmetric=self.symmetric,
                            delimiter=self.delimiter, header=self.header_key, **more)

    def source_keys(self) -> dict[str, Any]:
        """The source's keys other than path, format and split, as a recipe writes them (none at its default)."""
        out: dict[str, Any] = {}
        if self.columns:
            out["columns"] = dict(self.columns)
        if self.score_range is not None:
            out["score_range"] = [_num(v) for v in self.score_range]
        if self.label_map:
            out["label_map"] = dict(self.label_map)
        if self.symmetric:
            out["symmetric"] = True
        if self.delimiter:
            out["delimiter"] = self.delimiter
        if self.header_key is not None:
            out["header"] = self.header_key
        if not is_utf8(self.encoding):
            out["encoding"] = self.encoding
        if self.qrels_split:
            out["qrels_split"] = self.qrels_split
        return out


def _num(v: float) -> Union[int, float]:
    return int(v) if float(v).is_integer() else v


@dataclass
class _Column:
    """One column of the sample: its name (None without a header) and its values."""

    key: Union[str, int]
    name: Optional[str]
    values: list[Any]
    decimal_comma: bool = False  # `4,5` is 4.5 (a `;`-separated file, as the reader reads it)

    @property
    def filled(self) -> list[Any]:
        return [v for v in self.values if v is not None and str(v).strip() != ""]

    def numbers(self) -> Optional[list[float]]:
        """Every filled value as a number, or None where one is not."""
        out = []
        for v in self.filled:
            if isinstance(v, bool):
                out.append(float(v))
                continue
            text = str(v).strip()
            if self.decimal_comma and re.fullmatch(r"[-+]?\d*,\d+", text):
                text = text.replace(",", ".")
            try:
                x = float(text)
            except ValueError:
                return None
            if not math.isfinite(x):
                return None
            out.append(x)
        return out or None

    def labels(self) -> set[str]:
        return {str(v).strip().lower() for v in self.filled}

    def is_text(self) -> bool:
        """Free text: not numbers, and more than a handful of distinct values or long ones."""
        filled = [v for v in self.filled if isinstance(v, str)]
        if not filled or len(filled) < len(self.filled) or self.numbers() is not None:
            return False
        return len(set(filled)) > 12 or sum(len(v) for v in filled) / len(filled) > 24

    def is_id(self) -> bool:
        """A row number or id, not a score or label: named so (pandas' index column has no name or
        `Unnamed: 0`), or a distinct whole number on every row."""
        name = (self.name or "").strip().lower()
        if self.name is not None and (not name or name.startswith("unnamed:") or name in ID_NAMES or name.endswith("_id")):
            return True
        numbers = self.numbers()
        return (numbers is not None and len(numbers) >= 20 and all(x.is_integer() for x in numbers)
                and len(set(numbers)) == len(numbers))

    def is_list(self) -> bool:
        return any(isinstance(v, (list, tuple)) for v in self.filled)


def guess_source(path: Path, sample: int = SAMPLE_ROWS, encoding: str = "utf-8") -> Guess:
    """How to read ``path`` (a data file, a folder saved by ``datasets`` or a BEIR folder) as a
    data source; a :class:`DataError` where its rows fit no format, saying what was found."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist", hint="name a data file (csv, tsv, jsonl, json, parquet) or folder")
    if path.is_dir() and not is_saved_dataset(path):
        guess = _guess_beir(path)
        _read_back(guess, sample, encoding)
        return guess
    probe = SourceConfig(path=str(path), encoding=encoding)
    kind = file_type(probe, path)
    delimiter = _delimiter(path, kind, encoding) if kind in ("csv", "tsv") else None
    probe = SourceConfig(path=str(path), encoding=encoding, delimiter=delimiter)
    rows: list[Any] = []
    broken = not_utf8 = 0
    for item in records(probe, path):
        if isinstance(item, BadRow):
            broken += 1
            not_utf8 += item.kind == "not UTF-8"
            continue
        rows.append(item[1])
        if len(rows) > sample:
            break
    if not_utf8 and is_utf8(encoding):  # a file saved by Excel or an older tool: Windows' Western European encoding
        guess = guess_source(path, sample, FALLBACK_ENCODING)
        guess.reasons.insert(0, f"not UTF-8 ({not_utf8} of the first {not_utf8 + len(rows)} rows): read as "
                                f"{FALLBACK_ENCODING} (Windows' Western European encoding, as Excel saves a CSV); "
                                "check its accented letters (`encoding` sets another)")
        return guess
    more_rows = len(rows) > sample
    rows = rows[:sample]
    if not rows:
        raise DataError(f"{path} holds no rows" + (f" ({broken} broken line(s))" if broken else ""),
                        hint="name a file with data in it")
    if isinstance(rows[0], dict) and any(isinstance(r, dict) and "query" in r and r.keys() & {"pos", "weak", "neg"}
                                         for r in rows[:100]):
        guess = Guess(path, "graded", reasons=["rows with query and pos/weak/neg: the graded format"])
    else:
        guess = _guess_table(path, rows, delimiter)
    guess.delimiter = delimiter if delimiter not in (None, ",", "\t") or (delimiter == "," and kind == "tsv") else None
    _read_back(guess, sample, encoding)
    guess.more_rows = more_rows
    if more_rows and kind in ("csv", "tsv", "jsonl"):
        guess.total_rows = sum(1 for _ in binary_lines(path)) - guess.header
    return guess


def _delimiter(path: Path, kind: str, encoding: str) -> str:
    """The separator of a delimited file's first line: `;` (a European Excel's CSV), a tab, or `,`."""
    first = ""
    for _, raw in binary_lines(path):
        first = raw.decode(encoding if encoding.lower().replace("-", "") != "utf8" else "utf-8-sig", errors="replace")
        if first.strip():
            break
    counts = {sep: first.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=lambda s: counts[s])
    if counts[best] == 0:
        return "\t" if kind == "tsv" else ","
    default = "\t" if kind == "tsv" else ","
    return default if counts[default] == counts[best] else best


def _guess_beir(path: Path) -> Guess:
    if find_data_file(path, "corpus.jsonl") and find_data_file(path, "queries.jsonl") and (path / "qrels").is_dir():
        splits = sorted(p.name.split(".")[0] for p in (path / "qrels").iterdir() if ".tsv" in p.name)
        guess = Guess(path, "qrels", reasons=[f"a BEIR folder (corpus, queries, qrels: {', '.join(splits)})"])
        if "train" not in splits and splits:
            guess.reasons.append(f"no qrels/train.tsv: reads qrels/{splits[0]}.tsv")
            guess.qrels_split = splits[0]
        return guess
    raise DataError(f"{path} is a folder but neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) nor one saved "
                    "by `datasets` (save_to_disk)", hint="name a data file, or such a folder")


def _has_header(rows: list[list], decimal_comma: bool = False) -> bool:
    """A delimited file's first row names its columns: a role's name among them, or a column of
    numbers below a first cell that is none."""
    first = [str(c).strip() for c in rows[0]]
    known = {a.lower() for aliases in ROLE_ALIASES.values() for a in aliases}
    if any(c.lower() in known for c in first):
        return True
    body = rows[1:201]
    for j, cell in enumerate(first):
        column = [r[j] for r in body if j < len(r) and str(r[j]).strip()]
        if (column and _Column(j, None, column, decimal_comma).numbers() is not None
                and _Column(j, None, [cell], decimal_comma).numbers() is None):
            return True
    if body and all(re.fullmatch(r"[A-Za-z_][\w.-]{0,39}", c) for c in first):
        # every first cell a name, and the column below it longer texts (title, body, ...)
        return all(sum(len(str(r[j])) for r in body if j < len(r)) / len(body) > 2 * len(c) for j, c in enumerate(first)
                   if _Column(j, None, [r[j] for r in body if j < len(r)]).is_text())
    return False


def _columns_of(rows: list[Any], delimiter: Optional[str]) -> tuple[list[_Column], bool]:
    """The sample's columns, and whether the first row was a header."""
    if isinstance(rows[0], dict):
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        return [_Column(k, str(k), [r.get(k) for r in rows]) for k in keys], False
    header = _has_header(rows, delimiter == ";")
    body = rows[1:] if header else rows
    width = max(len(r) for r in rows)
    names = [str(c).strip() for c in rows[0]] if header else [None] * width
    names += [None] * (width - len(names))
    return [_Column(names[j] if header else j, names[j], [r[j] if j < len(r) else None for r in body],
                    decimal_comma=delimiter == ";") for j in range(width)], header


def _by_name(columns: list[_Column], role: str) -> Optional[_Column]:
    lowered = {str(c.name).lower(): c for c in columns if c.name is not None}
    return next((lowered[a.lower()] for a in ROLE_ALIASES[role] if a.lower() in lowered), None)


def _paired_names(a: Optional[str], b: Optional[str]) -> bool:
    """Two column names of one kind of text: sentence1/sentence2, question1/question2, text_a/text_b."""
    if a is None or b is None:
        return False
    ma, mb = _PAIRED_NAME.match(a), _PAIRED_NAME.match(b)
    return bool(ma and mb and ma.group(1).lower() == mb.group(1).lower() and ma.group(2).lower() != mb.group(2).lower())


def _guess_table(path: Path, rows: list[Any], delimiter: Optional[str]) -> Guess:
    columns, header = _columns_of(rows, delimiter)
    named = [c.name for c in columns if c.name is not None]
    said = f"columns {', '.join(map(str, named))}" if named else f"{len(columns)} columns without a header"
    roles: dict[str, _Column] = {}
    for role in ("query", "candidate", "positive", "negative", "score", "label"):
        found = _by_name(columns, role)
        if found is not None and found not in roles.values():
            roles[role] = found
    by_type: list[str] = []  # roles given by what the columns hold, not by their names
    texts = [c for c in columns if c.is_text() and c not in roles.values()]
    values = [c for c in columns if not c.is_text() and not c.is_list() and c not in roles.values()
              and c.filled and not c.is_id()]
    for role in ("query", "candidate"):
        if role not in roles and not (role == "candidate" and "positive" in roles) and texts:
            roles[role] = texts.pop(0)
            by_type.append(role)
    if "positive" in roles or "negative" in roles:
        fmt = "triplets"
    elif "query" not in roles or "candidate" not in roles:
        raise DataError(f"{path}: {said}: cannot tell which column is the query and which the candidate (two "
                        "columns of text are needed)",
                        hint="name them (e.g. query/candidate, sentence1/sentence2, question/answer, anchor/positive), "
                             "or write the recipe's source by hand (`hmcl recipe schema columns`)")
    else:
        fmt = ""
    guess = Guess(path, fmt, header=header)
    label, score = roles.get("label"), roles.get("score")
    if fmt == "triplets":
        more = [c for c in texts if c.name is None or re.fullmatch(r"(?:negative|neg)[_\s-]?\d+", c.name, re.I)]
        guess.reasons.append(f"{said}: anchor and positive{' and negatives' if 'negative' in roles or more else ''}"
                             " (triplets)")
    elif label is None and score is None and values:
        # an unnamed column of numbers or label names after the texts: a score or a label
        column = values[0]
        by_type.append("label/score")
        if column.numbers() is not None and not column.labels() <= BINARY | {"0.0", "1.0"}:
            score = column
        else:
            label = column
    if not fmt:
        guess.format = _pair_format(guess, roles, label, score, said)  # (it sets the score or label role)
    if by_type:
        guess.reasons.append("guessed from what the columns hold (" + ", ".join(by_type) + "): check them")
    guess.columns = _needed_columns(path, guess, roles, rows, header, delimiter)
    used = [c for role, c in roles.items() if c is not None and role in _roles_of(guess.format)]
    rest = [c for c in columns if c not in used and not c.is_id()]
    if guess.format == "triplets" and not header and isinstance(rows[0], list):
        taken = [c for c in rest if isinstance(c.key, int) and c.key > roles["positive"].key]
        if taken:  # (a file without a header: every field after the positive is a negative)
            guess.reasons.append(f"column{'s' if len(taken) > 1 else ''} {', '.join(str(c.key) for c in taken)} "
                                 "read as negatives")
        rest = [c for c in rest if c not in taken]
    elif guess.format == "triplets":
        rest = [c for c in rest if not re.fullmatch(r"(?:negative|neg)[_\s-]?\d+", str(c.name), re.I)]
    if rest:
        guess.reasons.append("not read: " + ", ".join(f"column {c.name if c.name is not None else c.key}"
                                                      for c in rest))
    return guess


def _pair_format(guess: Guess, roles: dict, label: Optional[_Column], score: Optional[_Column], said: str) -> str:
    """sts, nli, pairs or answer_selection for a file of (query, candidate) rows; triplets without a label."""
    q, c = roles["query"], roles["candidate"]
    per_query = len(q.filled) / max(1, len(set(map(str, q.filled))))
    scores = score.numbers() if score is not None else None
    if score is not None and scores is None:
        raise DataError(f"{guess.path}: column {score.name} is named as a score but holds values that are not numbers "
                        f"(e.g. {next(v for v in score.filled if _Column(0, None, [v]).numbers() is None)!r})",
                        hint="fix the file, or write the recipe's source by hand")
    if label is not None and label.labels() & NLI_NAMES and len(label.labels() & NLI_NAMES) >= 2 and scores is None:
        other = label.labels() - NLI_NAMES - {"-", "-1"}
        if other:
            raise DataError(f"{guess.path}: column {label.name} holds NLI's labels and others too: {sorted(other)[:5]}",
                            hint="map every label to a level in the source's `label_map`")
        guess.reasons.append(f"{said}: labels {', '.join(sorted(label.labels() & NLI_NAMES))} (NLI: entailment pos, "
                             "neutral weak, contradiction neg)")
        roles["label"] = label
        return "nli"
    if scores is None and label is not None:
        numbers = label.numbers()
        labels = label.labels()
        names = {str(col.name).lower() for col in (q, c, label)}
        if labels <= {"0", "1", "2", "-1"} and len(labels - {"-1"}) == 3 and names & NLI_COLUMNS:
            guess.reasons.append(f"{said}: labels 0, 1, 2 beside NLI's column names: NLI's numbering (0 entailment "
                                 "pos, 1 neutral weak, 2 contradiction neg)")
            roles["label"] = label
            return "nli"
        if labels <= BINARY | {"0.0", "1.0"}:
            fmt = "answer_selection" if per_query >= 2 else "pairs"
            guess.reasons.append(f"{said}: labels {', '.join(sorted(labels))} (1 pos, 0 neg)"
                                 + (f"; {per_query:.1f} rows per question: answer selection" if fmt != "pairs" else ""))
            if fmt == "pairs" and _paired_names(q.name, c.name):
                guess.symmetric = True
                guess.reasons.append(f"{q.name} and {c.name} are texts of one kind: read both ways (symmetric)")
            roles["label"] = label
            return fmt
        if numbers is not None:
            scores, score = numbers, label  # graded relevance 0-3, a 0-5 similarity under the name label
            roles.pop("label", None)
        elif len(labels) == 2 and labels & POSITIVE_WORDS and labels & NEGATIVE_WORDS:
            pos = next(iter(labels & POSITIVE_WORDS))
            neg = next(iter(labels - {pos}))
            guess.label_map = {_original(label, pos): "pos", _original(label, neg): "neg"}
            guess.reasons.append(f"{said}: labels {pos} (pos) and {neg} (neg)")
            roles["label"] = label
            return "answer_selection" if per_query >= 2 else "pairs"
        else:
            shown = sorted({str(v).strip() for v in label.filled})
            raise DataError(f"{guess.path}: column {label.name if label.name is not None else label.key} holds labels "
                            f"{', '.join(shown[:8])}{', ...' if len(shown) > 8 else ''}: which level each means cannot "
                            "be told", hint="give the source a `label_map` by hand (label -> pos, weak or neg; "
                            "`hmcl recipe schema label_map`)")
    if scores is not None:
        lo, hi = min(scores), max(scores)
        guess.score_range = _score_range(lo, hi, all(x.is_integer() for x in scores))
        roles["score"] = score
        name = score.name if score.name is not None else f"column {score.key}"
        guess.reasons.append(f"{said}: scores {lo:g} to {hi:g} in {name} (sts, declared range "
                             f"{_num(guess.score_range[0])}-{_num(guess.score_range[1])}: pos from 80% of it, weak "
                             "from 40%)")
        if label is not None and label is not score and len(label.labels() & NLI_NAMES) >= 2:
            guess.reasons.append(f"{label.name} holds NLI labels too: `format: nli` would grade by them instead")
        if q.name is None or _paired_names(q.name, c.name):
            guess.symmetric = True
            guess.reasons.append("both texts are sentences of one kind: read both ways (symmetric)")
        return "sts"
    guess.reasons.append(f"{said}: (query, positive) rows without a label or score, read as triplets (in-batch "
                         "negatives; `hmcl mine` adds hard ones)")
    roles["positive"] = roles.pop("candidate")
    return "triplets"


def _original(column: _Column, lowered: str) -> str:
    return next(str(v).strip() for v in column.filled if str(v).strip().lower() == lowered)


def _score_range(lo: float, hi: float, whole: bool = False) -> tuple[float, float]:
    """A round range that holds the sample's scores: 0-1, 0-5 (1-5 where none is below 1), 0-10, 0-100;
    grades in whole numbers up to 2-4 (``whole``: relevance 0-3) are their own top."""
    top = hi if whole and 2 <= hi < 5 else next((b for b in (1, 5, 10, 100) if hi <= b), hi)
    bottom = 1.0 if top == 5 and lo >= 1 else min(0.0, lo)
    return (float(bottom), float(top))


def _needed_columns(path: Path, guess: Guess, roles: dict, rows: list, header: bool,
                    delimiter: Optional[str]) -> dict:
    """The ``columns`` entries the reader needs: those it would not bind to the same column itself."""
    wanted = {role: (col.name if header or isinstance(rows[0], dict) else col.key)
              for role, col in roles.items() if col is not None and role in _roles_of(guess.format)}
    if header or isinstance(rows[0], dict):  # the column the reader's names would pick for each role
        names = [str(k) for k in rows[0]] if isinstance(rows[0], dict) else [str(c).strip() for c in rows[0]]
        cols = Columns(SourceConfig(path=str(path), format=guess.format), guess.format, str(path))
        bound = {role: cols._choose(role, names) for role in wanted}
    else:  # by position
        bound = dict(DEFAULT_INDEX.get(guess.format, {}))
    needed = {role: col for role, col in wanted.items() if bound.get(role) != col}
    if isinstance(rows[0], list):
        # the reader's own call on the first row, given these columns: an sts file without a header
        # whose third field is a text (the score first) would lose its first row as a header
        own = Columns(SourceConfig(path=str(path), format=guess.format, delimiter=delimiter, columns=needed),
                      guess.format, str(path))
        try:
            told = own.bind_header(rows[0])
        except DataError:
            told = not header
        if told != header:
            guess.header_key = header
    return needed


def _roles_of(fmt: str) -> set[str]:
    if fmt == "triplets":
        return {"query", "positive", "negative"}
    return {"query", "candidate", "score"} if fmt == "sts" else {"query", "candidate", "label"}


def _read_back(guess: Guess, sample: int, encoding: str) -> None:
    """Read the sample with the guessed source, as ``hmcl prepare`` will: counts and rejected rows."""
    guess.encoding = encoding
    src = guess.source(max_rows=sample)
    queries: set = set()
    candidates: set = set()
    lines: set = set()  # (a row read both ways yields two examples of one line)
    drawn = {"query": _Reservoir(), "candidate": _Reservoir()}
    for item in read_source(src, guess.path):
        if isinstance(item, BadRow):
            lines.add(item.line)
            guess.rejected_rows += 1
            if len(guess.rejected) < 5:
                guess.rejected.append(item.located())
            continue
        line, ex = item
        lines.add(line)
        queries.add(ex.query)
        drawn["query"].add(ex.query)
        for cand in ex.candidates.values():
            candidates.add(cand.text)
            drawn["candidate"].add(cand.text)
            guess.levels[("neg", "weak", "pos")[cand.level]] += 1
    guess.rows, guess.queries, guess.candidates = len(lines), len(queries), len(candidates)
    guess.texts = {side: r.items for side, r in drawn.items()}
    if not queries:
        raise DataError(f"{guess.path}: read as format {guess.format}, none of its first rows gives an example"
                        + (f" (e.g. {guess.rejected[0]})" if guess.rejected else ""),
                        hint="write the recipe's source by hand (`hmcl recipe schema data.sources`)")


class _Reservoir:
    """A seeded uniform draw of at most ``size`` of the items it is given, one at a time (the
    texts whose token lengths size a recipe's max lengths: the whole sample, not its head)."""

    def __init__(self, size: int = 2000, seed: int = 0) -> None:
        import random

        self.items: list[str] = []
        self.size, self.seen, self.rng = size, 0, random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item
