"""Readers: one per source format, each yielding graded rows from local files or the hub.

Every reader is a generator of ``(line, GradedExample)`` or raises/yields :class:`BadRow`
for rows it cannot use; the caller decides (``on_error``) whether to stop or count them.
Files are streamed row by row, so a large source never sits in memory whole.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from hmcl_cli.data.example import LEVELS, BadRow, GradedExample, add_candidate, parse_graded
from hmcl_cli.errors import DataError
from hmcl_cli.io_utils import DATA_FORMATS, binary_lines, compression_of, data_suffix, find_data_file, is_utf8, text_lines
from hmcl_cli.recipe import SourceConfig, suggest

Row = Union[tuple[Any, GradedExample], BadRow]

ROLE_ALIASES: dict[str, list[str]] = {
    "query": ["query", "sentence1", "sentence_A", "sentence_a", "sentence_1", "text1", "text_a", "premise",
              "question", "question1", "qtext", "anchor", "s1"],
    "candidate": ["candidate", "sentence2", "sentence_B", "sentence_b", "sentence_2", "text2", "text_b",
                  "hypothesis", "question2", "answer", "atext", "document", "passage", "s2"],
    "score": ["score", "similarity", "similarity_score", "relatedness_score"],
    "label": ["label", "entailment_judgment", "gold_label", "is_duplicate", "relevance"],
    "positive": ["positive", "pos"],
    "negative": ["negative", "neg"],
    "prompt": ["prompt", "instruction"],
}
# positions in a header-less file
DEFAULT_INDEX: dict[str, dict[str, int]] = {
    "sts": {"query": 0, "candidate": 1, "score": 2},
    "nli": {"query": 0, "candidate": 1, "label": 2},
    "pairs": {"query": 0, "candidate": 1, "label": 2},
    "answer_selection": {"query": 0, "candidate": 1, "label": 2},
    "triplets": {"query": 0, "positive": 1, "negative": 2},
}
REQUIRED = {
    "sts": ["query", "candidate", "score"],
    "nli": ["query", "candidate", "label"],
    "pairs": ["query", "candidate", "label"],
    "answer_selection": ["query", "candidate", "label"],
    "triplets": ["query", "positive"],  # and negatives: none (in-batch ones only), one or several
}
# triplets: more negatives beside `negative` (sentence-transformers' hard-negative sets: negative_1, ...)
_MORE_NEGATIVES = re.compile(r"(?:negative|neg)[_\s-]?\d+", re.IGNORECASE)
NLI_DEFAULT = {"entailment": "pos", "neutral": "weak", "contradiction": "neg",
               "0": "pos", "1": "weak", "2": "neg"}
BINARY_DEFAULT = {"1": "pos", "0": "neg"}
# a pair-classification task's reading of NLI labels, where it gives no label map: entailment is the
# positive class, as in MTEB's NLI pair tasks (XNLI, KorNLI); those leave neutral pairs out, hmcl counts
# them negative with contradiction, as a task of `format: nli` does
NLI_AS_BINARY = {**BINARY_DEFAULT, "entailment": "pos", "neutral": "neg", "contradiction": "neg",
                 "not_entailment": "neg"}


# an NLI pair whose annotators did not agree: SNLI's and MultiNLI's gold label `-`, the Hub copies' -1.
# Such rows carry no label to learn or score; they are left out (counted) whatever data.on_error says
NO_GOLD_LABEL = "no gold label"


def source_label(src: SourceConfig) -> str:
    return src.name or (Path(src.path).name if src.path else f"{src.hub}")


def primed(names: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """``names`` with a ``'`` added to each one already used (by an earlier name or ``taken``)."""
    used, out = set(taken), []
    for n in names:
        while n in used:
            n += "'"
        used.add(n)
        out.append(n)
    return out


def source_labels(sources: Sequence[SourceConfig]) -> list[str]:
    """The label each source's examples carry (``source`` in the prepared data): its name, a
    repeated one marked with a prime per earlier use."""
    return primed([source_label(src) for src in sources])


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``: one dataset (``state.json``) or a
    dataset dict of splits (``dataset_dict.json``)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def file_type(src: SourceConfig, path: Path) -> str:
    if src.file_type != "auto":
        return src.file_type
    if is_saved_dataset(path):
        return "datasets"
    return DATA_FORMATS.get(data_suffix(path), "csv")


# --------------------------------------------------------------------------------------------
# raw record streams: (line, dict-or-list) from a file or the hub
# --------------------------------------------------------------------------------------------


# (private-use code points, not NUL: the csv module of Python 3.10 refuses a line with NUL in it)
_BAD = "\ue000hmcl-bad-line\ue000"


def _decoded_lines(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Lines of a text file (decompressed if compressed). In UTF-8 an undecodable line becomes a
    marker the caller turns into BadRow; in another encoding it stops the read (io_utils.text_lines)."""
    if not is_utf8(encoding):
        yield from (line for _, line in text_lines(path, encoding))
        return
    for lineno, raw in binary_lines(path):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield f"{_BAD}{raw[e.start]:#x}:{e.start + 1}\n"


def _bad_utf8(path: Path, line: int, marker: str) -> BadRow:
    byte, col = marker[len(_BAD):].strip().split(":")
    return BadRow(f"not UTF-8 text (byte {byte} at column {col}; for a file in another encoding set the "
                  "source's `encoding`, e.g. cp1252)", str(path), line, kind="not UTF-8")


def delimited_records(path: Path, delimiter: str, encoding: str = "utf-8") -> Iterator[Union[tuple[int, list], BadRow]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # Excel quotes a field holding its separator
    reader = csv.reader(_decoded_lines(path, encoding), delimiter=delimiter, quoting=quoting, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield BadRow(f"broken CSV line: {e}", str(path), start, kind="broken CSV line")
            continue
        if row and row[0].startswith(_BAD):
            yield _bad_utf8(path, start, row[0])
            continue
        if not row or all(not c.strip() for c in row):
            continue
        yield start, row


def _is_json_array(path: Path, encoding: str = "utf-8") -> bool:
    """A file whose first non-blank character is ``[``: one JSON array of records, not JSON Lines."""
    for line in _decoded_lines(path, encoding):
        text = line.lstrip("\ufeff \t\r\n")
        if text:
            return text.startswith("[")
    return False


_ARRAY_CHUNK = 1 << 20  # characters read ahead at a time
_ARRAY_RECORD_MAX = 64 << 20  # a record longer than this that does not parse is reported as broken


def _array_text(path: Path, encoding: str) -> Iterator[str]:
    """The decoded text of a JSON array file, line by line (BOM dropped); undecodable bytes are a
    DataError naming the line."""
    if not is_utf8(encoding):
        first = True
        for _, line in text_lines(path, encoding):
            yield line.lstrip("\ufeff") if first else line
            first = False
        return
    for lineno, raw in binary_lines(path):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})",
                            hint="save the file as UTF-8, or set the source's `encoding`") from None
        yield line


def _records_json_array(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any]]:
    """The records of a JSON array file, each with the line it starts on, read a megabyte at a
    time (memory: the records in flight, not the file). A broken record stops the read (nothing
    after it can be located), even with ``on_error: skip``."""
    lines = _array_text(path, encoding)
    buf, pos, eof = "", 0, False
    base_line, counted, line = 1, 0, 1  # the line buf[0] is on; line_at's cache: buf[counted] is on `line`

    def more(at_least: int = _ARRAY_CHUNK) -> bool:
        """Read on until ``at_least`` more characters are buffered or the file ends; False at the end."""
        nonlocal buf, pos, eof, base_line, counted, line
        if eof:
            return False
        if pos > _ARRAY_CHUNK:  # drop what was read, keeping count of its lines
            base_line += buf.count("\n", 0, pos)
            buf, counted, line = buf[pos:], 0, base_line
            pos = 0
        parts, n = [], 0
        for piece in lines:
            parts.append(piece)
            n += len(piece)
            if n >= at_least:
                break
        else:
            eof = True
        buf += "".join(parts)
        return bool(parts)

    def line_at(at: int) -> int:
        nonlocal counted, line
        if at < counted:
            counted, line = 0, base_line
        line += buf.count("\n", counted, at)
        counted = at
        return line

    def skip_blank() -> bool:
        """Past whitespace to the next character; False at the end of the file."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return pos < len(buf)

    decoder = json.JSONDecoder()
    skip_blank()
    pos += 1  # the `[` (_is_json_array saw it first)
    expect_value = True  # after `[` or a comma
    while True:
        if not skip_blank():
            raise DataError(f"{path}:{line_at(pos)}: the JSON array is not closed (no `]`)",
                            hint="the file may be cut short")
        if buf[pos] == "]":
            pos += 1
            if skip_blank():
                raise DataError(f"{path}:{line_at(pos)}: text after the JSON array's closing `]`")
            return
        if not expect_value:
            if buf[pos] != ",":
                raise DataError(f"{path}:{line_at(pos)}: invalid JSON: expected `,` or `]` between records")
            pos += 1
            expect_value = True
            continue
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                # the record may run on past what is read: read on (up to a limit) before calling it broken
                if len(buf) - pos < _ARRAY_RECORD_MAX and more(max(_ARRAY_CHUNK, len(buf) - pos)):
                    continue
                raise DataError(f"{path}:{line_at(e.pos)}: invalid JSON: {e.msg} (in a JSON array, the records "
                                "after a broken one cannot be read)", hint="fix the record") from None
            if end == len(buf) and more():
                continue  # a number or word at the end of what is read may go on
            break
        yield line_at(pos), obj
        pos, expect_value = end, False


def json_records(path: Path, encoding: str = "utf-8") -> Iterator[Union[tuple[int, Any], BadRow]]:
    """(line, record) of a JSON Lines file, or of a .json file holding one JSON array; BadRow for a bad line."""
    if data_suffix(path) == ".json" and _is_json_array(path, encoding):
        yield from _records_json_array(path, encoding)
        return
    for lineno, line in enumerate(_decoded_lines(path, encoding), 1):
        if line.startswith(_BAD):
            yield _bad_utf8(path, lineno, line)
        elif line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow(f"invalid JSON: {e.msg} at column {e.colno}", str(path), lineno, kind="invalid JSON")


def _records_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    if compression_of(path):
        raise DataError(f"{path}: a parquet file is compressed inside; it cannot be read {compression_of(path)}-compressed",
                        hint="decompress the file, or set the source's file_type if it is not parquet")

    n = 0
    file = pq.ParquetFile(path)
    name = _class_namer(_parquet_features(file)) or (lambda row: row)
    for batch in file.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, name(row)


def _parquet_features(file: Any) -> Any:
    """The ``datasets`` features a parquet file written by ``datasets`` (``to_parquet``, the Hub's
    parquet files) records in its metadata, for its ClassLabel names; None for another file."""
    if b"huggingface" not in (file.schema_arrow.metadata or {}):
        return None
    try:
        import datasets

        return datasets.Features.from_arrow_schema(file.schema_arrow)
    except Exception:  # noqa: BLE001 - metadata of another version: the numbers as they are
        return None


def _records_hub(src: SourceConfig) -> Iterator[tuple[int, dict]]:
    from hmcl_cli.hub_access import hub_unreachable

    why = hub_unreachable(datasets=True)  # (streamed: read from the Hub, never from a cache)
    if why:
        raise DataError(
            f"hub dataset {src.hub!r} cannot be read: {why}",
            hint="run with network, or export it to jsonl/csv once and read it with `path`",
        )
    try:
        import datasets

        ds = datasets.load_dataset(src.hub, src.hub_config, split=src.hub_split or "train", streaming=True)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds
        raise DataError(
            f"hub dataset {src.hub!r} could not be loaded: {type(e).__name__}: {e}",
            hint="check the name/config/split and your network, or use a local `path`",
        ) from None
    yield from _dataset_rows(ds)


class _ClassName(str):
    """A class label of a ``datasets`` ClassLabel column, read as its name (``entailment``, which
    the nli format's default label map knows), keeping its number for a label map written with
    numbers (``{0: pos}``)."""

    class_index: int

    def __new__(cls, name: str, index: int) -> "_ClassName":
        out = super().__new__(cls, name)
        out.class_index = index
        return out


def _class_namer(features: Any) -> Optional[Callable[[dict], dict]]:
    """``name(row)``: the row with each ClassLabel column's number as its name (:class:`_ClassName`),
    for ``features`` (a ``datasets`` dataset's; None: none known); None where no column is one."""
    if not features:
        return None
    import datasets

    classes = {col: f for col, f in features.items() if isinstance(f, datasets.ClassLabel)}
    if not classes:
        return None

    def name(row: dict) -> dict:
        for col, feature in classes.items():
            value = row.get(col)
            if isinstance(value, int) and 0 <= value < feature.num_classes:
                row[col] = _ClassName(feature.int2str(value), value)
        return row

    return name


def _dataset_rows(ds: Any) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a ``datasets`` dataset (in batches) or stream; a ClassLabel column's
    values as their names."""
    import datasets

    name = _class_namer(getattr(ds, "features", None)) or (lambda row: row)
    rows: Iterator[dict] = ds
    if isinstance(ds, datasets.Dataset):
        rows = (dict(zip(batch, values)) for batch in ds.iter(batch_size=4096) for values in zip(*batch.values()))
    for n, row in enumerate(rows, 1):
        yield n, name(row)


SPLIT_HINT = ("name the split to read: a data source's `hub_split` (a second source of the same folder can read "
              "another split, with `split: dev`), an eval task's `split` (`--split` with task flags)")


def saved_dataset(path: Path, split: Optional[str], hint: str = SPLIT_HINT) -> Any:
    """The dataset of a folder saved by ``datasets``' ``save_to_disk``; of a dataset dict, its
    ``split`` (or its only split), its splits named in the error where that is not there."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise DataError(f"{path}: cannot be read as a dataset saved by `datasets` (save_to_disk): {type(e).__name__}: {e}",
                        hint="save it again with `dataset.save_to_disk(folder)`, or export it to jsonl/csv/parquet") from None
    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split is None and len(ds) == 1:
        return next(iter(ds.values()))
    if split in ds:
        return ds[split]
    said = f"has no split {split!r}" if split else "holds several splits"
    raise DataError(f"{path} (a dataset dict saved by `datasets`) {said} (its splits: {', '.join(ds)})", hint=hint)


def records(src: SourceConfig, path: Optional[Path]) -> Iterator[Union[tuple[int, Any], BadRow]]:
    if path is None:
        yield from _records_hub(src)
        return
    kind = file_type(src, path)
    if kind == "jsonl":
        yield from json_records(path, src.encoding)
    elif kind == "parquet":
        yield from _records_parquet(path)
    elif kind == "datasets":
        yield from _dataset_rows(saved_dataset(path, src.hub_split))
    else:
        yield from delimited_records(path, delimiter_of(src, kind), src.encoding)


def delimiter_of(src: SourceConfig, kind: str) -> str:
    """The field separator of a csv/tsv source: its ``delimiter``, else `,` or a tab."""
    return src.delimiter or ("\t" if kind == "tsv" else ",")


def _as_float(raw: Any, src: SourceConfig) -> float:
    """A score as a number; with `;` between fields (a European Excel CSV) `4,5` is 4.5."""
    if isinstance(raw, str) and src.delimiter == ";" and re.fullmatch(r"\s*[-+]?\d*,\d+\s*", raw):
        raw = raw.replace(",", ".")
    return float(raw)


def ranking_format(src: SourceConfig, path: Path) -> Optional[str]:
    """For a reranking or retrieval file given without a format: a table (CSV/TSV/parquet) whose
    columns name a positive is ``triplets``, one whose columns name a label is ``pairs`` (label 1:
    relevant); None otherwise (read as graded JSON lines). JSON lines are looked at too: those of
    sentence-transformers (anchor, positive, negative) are triplets."""
    for item in records(src, path):
        if isinstance(item, BadRow):
            return None
        cells = item[1] if isinstance(item[1], (list, dict)) else []
        if isinstance(cells, dict) and any(isinstance(cells.get(k), (list, tuple)) for k in ("pos", "weak", "neg")):
            return None  # a graded table (parquet, a saved dataset): lists of candidates per query
        if isinstance(cells, dict) and file_type(src, path) == "jsonl" and set(cells) & {"pos", "weak", "neg"}:
            return None  # a graded JSON line (whatever its values: the graded reader says what is wrong)
        names = {str(c).strip().lower() for c in cells}
        for fmt, role in (("triplets", "positive"), ("pairs", "label")):
            if names & {a.lower() for a in ROLE_ALIASES[role]}:
                return fmt
        return None
    return None


# --------------------------------------------------------------------------------------------
# column mapping
# --------------------------------------------------------------------------------------------


class Columns:
    """Resolves roles (query, candidate, score, ...) to positions in list rows or keys in dicts."""

    def __init__(self, src: SourceConfig, fmt: str, where: str):
        self.src, self.fmt, self.where = src, fmt, where
        self.index: dict[str, Union[int, str]] = {}
        self.header: Optional[list[str]] = None
        self.more_negatives: list[Union[int, str]] = []  # triplets: negative_1, negative_2, ... columns
        self.first_keys: set = set()  # the keys of the first JSON record, whose roles are bound

    def bind_header(self, first: Any) -> bool:
        """Look at the first record; return True when it is a header row to skip."""
        roles = REQUIRED.get(self.fmt, []) + ["score", "label", "prompt"] + (["negative"] if self.fmt == "triplets" else [])
        if isinstance(first, dict):
            keys = list(first)
            self.first_keys = set(keys)
            for role in roles:
                col = self._choose(role, keys)
                if col is not None:
                    self.index[role] = col
            self._check_required(keys)
            self.more_negatives = self._more_negatives(keys, keys)
            return False
        is_header = self.src.header
        if is_header is None:
            configured = {c for c in self.src.columns.values() if isinstance(c, str)}
            known = {a.lower() for aliases in ROLE_ALIASES.values() for a in aliases}
            cells = {c.strip() for c in first}
            is_header = bool(cells & configured) or (
                sum(c.lower() in known for c in cells) >= 2
            ) or (self.fmt == "sts" and len(first) > 2 and not _is_number(first[DEFAULT_INDEX["sts"]["score"]], self.src))
        if is_header:
            self.header = [c.strip() for c in first]
            for role in roles:
                col = self._choose(role, self.header)
                if col is not None:
                    self.index[role] = self.header.index(col)
            self._check_required(self.header)
            self.more_negatives = self._more_negatives(self.header, list(range(len(self.header))))
        else:
            for role, col in self.src.columns.items():
                if isinstance(col, str):
                    raise DataError(
                        f"{self.where}: column {col!r} (role {role}) given by name but the "
                        "file has no header row",
                        hint="use a column index, or set `header: true`",
                    )
                self.index[role] = col
            for role, idx in DEFAULT_INDEX.get(self.fmt, {}).items():
                self.index.setdefault(role, idx)
        return bool(is_header)

    def _more_negatives(self, names: list, keys: list) -> list:
        """The negative_1, negative_2, ... columns among ``names`` (their ``keys``: names or positions)."""
        if self.fmt != "triplets" or "negative" in self.src.columns:
            return []
        return [k for name, k in zip(names, keys) if _MORE_NEGATIVES.fullmatch(str(name).strip())]

    def negatives(self, rec: Any) -> list[Any]:
        """A triplets row's negatives: its `negative` column (a list: several) and the negative_1,
        negative_2, ... beside it (one left empty or null skipped: such sets give rows different
        numbers), or, in a file without a header, every field after the positive. None: the
        positive pair alone (in-batch negatives only). JSON lines are read with their own keys."""
        if self.header is None and isinstance(rec, list) and "negative" not in self.src.columns:
            return list(rec[self.index["negative"]:])
        first = self.get(rec, "negative", required=False)
        out = list(first) if isinstance(first, (list, tuple)) else [] if first is None else [first]
        more = self.more_negatives
        if isinstance(rec, dict) and rec.keys() != self.first_keys:
            more = self._more_negatives(list(rec), list(rec))
        for k in more:
            value = rec[k] if (k < len(rec) if isinstance(k, int) else k in rec) else None
            if value is not None and str(value).strip():
                out.append(value)
        return out

    def _choose(self, role: str, keys: list[str]) -> Optional[str]:
        if role in self.src.columns:
            col = self.src.columns[role]
            if isinstance(col, int):
                return keys[col] if col < len(keys) else None
            return col if col in keys else None
        lowered = {k.lower(): k for k in keys}
        for alias in ROLE_ALIASES.get(role, []):
            if alias.lower() in lowered:
                return lowered[alias.lower()]
        if role == "positive" and self.fmt == "triplets" and "candidate" not in self.src.columns:
            # (question, answer) or (sentence1, sentence2) pairs: the second text is the positive
            return self._choose("candidate", keys)
        if role == "score" and self.fmt == "sts" and "label" not in self.src.columns:
            # GLUE's STS-B (sentence1, sentence2, label): an sts pair's label is its score
            return next((lowered[a] for a in ("label", "labels") if a in lowered), None)
        return None

    def _check_required(self, keys: list[str]) -> None:
        for role in REQUIRED.get(self.fmt, []):
            if role not in self.index:
                given = self.src.columns.get(role)
                what = f"column {given!r}" if given is not None else f"a {role} column"
                names = f" (named one of: {', '.join(ROLE_ALIASES[role])})" if given is None and role in ROLE_ALIASES else ""
                lowered = {str(k).lower() for k in keys}
                if "query" in lowered and lowered & {"pos", "neg", "weak"}:  # graded JSONL read as another format
                    hint = (f"this is graded data (query, pos, weak, neg), which format {self.fmt} does not read: "
                            "set `format: graded` (in `hmcl eval`: pass it as --reranking or --retrieval)")
                else:
                    hint = (f"name the column so, or map it: `columns: {{{role}: <column name>}}` in the recipe's "
                            "source or eval task")
                    if self.fmt == "pairs" and role == "label" and len(keys) == 2:
                        hint = ("rows that are all matching (query, positive) pairs, without a label, train as "
                                "`format: triplets` (its negative column is optional; `hmcl mine` adds hard "
                                "negatives); else " + hint)
                raise DataError(
                    f"{self.where}: format {self.fmt}: missing {what} for role `{role}`{names}"
                    f"{_column_meant(given, keys)} (columns: {', '.join(map(str, keys))})", hint=hint)
        for role, col in self.src.columns.items():
            if role not in self.index:
                raise DataError(
                    f"{self.where}: missing column {col!r} for role `{role}`{_column_meant(col, keys)} "
                    f"(columns: {', '.join(map(str, keys))})",
                    hint="fix the column name in the recipe's `columns`",
                )

    def get(self, rec: Any, role: str, required: bool = True) -> Any:
        if isinstance(rec, dict) and self.index.get(role) not in rec and rec.keys() != self.first_keys:
            # JSON lines (and hub rows) need not share keys: an optional key (score, prompt, ...)
            # absent from the first line is looked up on each line that lacks the bound one
            found = self._choose(role, list(rec))
            if found is not None:
                return rec[found]
        if role not in self.index:
            if required:
                raise BadRow(f"no {role} column", kind="missing column")
            return None
        col = self.index[role]
        try:
            value = rec[col]
        except (IndexError, KeyError):
            if required:
                n = len(rec) if isinstance(rec, list) else "?"
                raise BadRow(
                    f"broken line: {n} fields, no field for `{role}` (column {col})" + _other_separator(rec, self.src.delimiter),
                    kind="broken CSV line",
                ) from None
            return None
        return value


def _column_meant(given: Any, keys: list) -> str:
    """" — did you mean 'Question'?" where a column named in ``columns`` is not among ``keys`` but
    one is close (names are matched as written: case counts)."""
    close = suggest(given, [str(k) for k in keys]) if isinstance(given, str) else None
    return f" — did you mean {close!r}? (column names are matched as written)" if close else ""


def _other_separator(rec: Any, delimiter: Optional[str]) -> str:
    """A hint for a line read as one field that another separator would split."""
    if not (isinstance(rec, list) and len(rec) == 1 and isinstance(rec[0], str)):
        return ""
    for sep, name in ((";", "';'"), ("\t", "a tab"), (",", "','"), ("|", "'|'")):
        if sep in rec[0] and sep != delimiter:
            written = '"\\t"' if sep == "\t" else f"'{sep}'"
            return f"; the line holds {name}: for a file separated by {name}, set the source's `delimiter: {written}`"
    return ""


def _is_number(x: Any, src: Optional[SourceConfig] = None) -> bool:
    try:
        _as_float(x, src) if src is not None else float(x)
        return True
    except (TypeError, ValueError):
        return False


def _text(value: Any, role: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadRow(f"empty text in `{role}`", kind="empty text")
    if isinstance(value, (list, tuple, dict)):  # (str() of it would be trained and scored as a text)
        raise BadRow(f"`{role}` holds a {type(value).__name__}, not a text: {str(value)[:80]}"
                     + (" (a graded table, with lists of pos/neg texts, reads with format: graded)"
                        if isinstance(value, (list, tuple)) else ""), kind="not a text")
    text = str(value)
    if not text.strip():
        raise BadRow(f"empty text in `{role}`", kind="empty text")
    return text


def _level_from_label(value: Any, mapping: dict[str, str]) -> int:
    if isinstance(value, bool):  # a boolean column (parquet, JSON true/false): true/false, else 1/0, in the map
        value = _ClassName(str(value).lower(), int(value))
    key = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        key = str(int(value))
    lowered = {str(k).lower(): v for k, v in mapping.items()}
    if key.lower() not in lowered:  # "1.0" for 1: a CSV written from a float column (pandas, with a gap)
        try:
            number = float(key)
            if number.is_integer() and str(int(number)) in lowered:
                key = str(int(number))
        except ValueError:
            pass
    if key.lower() not in lowered and key.lower() in ("true", "false"):  # a CSV of a boolean column (pandas)
        as_number = "1" if key.lower() == "true" else "0"
        if as_number in lowered:
            key = as_number
    index = getattr(value, "class_index", None)  # a ClassLabel's name, whose number the map may name
    if key.lower() not in lowered and index is not None and str(index) in lowered:
        key = str(index)
    if key.lower() not in lowered and key in ("-", "-1") and "entailment" in lowered:
        raise BadRow(f"no gold label ({key!r}: the annotators did not agree)", kind=NO_GOLD_LABEL)
    if key.lower() not in lowered:
        bad = BadRow(f"unknown label {key!r} (known: {', '.join(map(str, mapping))})", kind="unknown label")
        bad.label = key
        raise bad
    return LEVELS[lowered[key.lower()]]


# --------------------------------------------------------------------------------------------
# format readers
# --------------------------------------------------------------------------------------------


def is_pattern(path: Optional[Path]) -> bool:
    """A (resolved) source path that is a glob pattern (``shards/train-*.parquet``): it names
    several files. A file that exists under the name (``pairs[1].csv``) is that file."""
    return path is not None and any(c in str(path) for c in "*?[") and not path.exists()


def absent(path: Path) -> Optional[str]:
    """Why ``path`` names nothing to read (``does not exist``; a pattern: ``matches no file``), or None."""
    if is_pattern(path):
        return None if source_files(path) else "matches no file"
    return None if path.exists() else "does not exist"


def source_files(path: Path) -> list[Path]:
    """The files a source path reads: itself, or the files a pattern matches, by name."""
    if not is_pattern(path):
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())


def read_source(src: SourceConfig, path: Optional[Path]) -> Iterator[Row]:
    """Stream ``(line, GradedExample)`` items and ``BadRow`` items from one source. A pattern
    (``shards/train-*.parquet``) reads the files it matches one after another (each with its own
    header), ``max_rows`` counting over them all; their lines are then (file number, line)."""
    if src.format == "qrels":
        yield from _read_qrels(src, path)
        return
    if not is_pattern(path):
        yield from _read_file(src, path, [0])
        return
    rows = [0]
    for i, file in enumerate(source_files(path)):
        for item in _read_file(src, file, rows):
            if not isinstance(item, BadRow):
                item = ((i, item[0]), item[1])
            yield item
        if src.max_rows and rows[0] >= src.max_rows:
            return


def _read_file(src: SourceConfig, path: Optional[Path], rows: list[int]) -> Iterator[Row]:
    """:func:`read_source` of one file (or hub dataset); ``rows[0]`` counts the rows read."""
    where = str(path) if path else f"hub:{src.hub}"
    cols = Columns(src, src.format, where)
    first = True
    for item in records(src, path):
        if isinstance(item, BadRow):
            yield item
            continue
        line, rec = item
        if src.format == "graded":
            if isinstance(rec, list):  # a CSV/TSV row: graded data are JSON objects
                raise DataError(
                    f"{where}: format graded reads JSON lines (or a JSON array, or parquet) of objects with "
                    f"query, pos, weak, neg; this file is read as {file_type(src, path)} (first row: {rec[:4]})",
                    hint="set the source's (or eval task's) `format` to what its columns hold: sts (text, text, score), nli, pairs "
                         "(text, text, label), answer_selection or triplets (anchor, positive[, negatives])")
            try:
                ex = parse_graded(rec)
                if src.prompt and not ex.prompt:
                    ex.prompt = src.prompt
                yield line, ex
            except BadRow as bad:
                bad.file, bad.line = where, line
                yield bad
        else:
            if first:
                first = False
                if cols.bind_header(rec):
                    continue
            try:
                for ex in _convert(src, cols, rec):
                    yield line, ex
            except BadRow as bad:
                bad.file, bad.line = where, line
                yield bad
        rows[0] += 1
        if src.max_rows and rows[0] >= src.max_rows:
            return


def _convert(src: SourceConfig, cols: Columns, rec: Any) -> Iterator[GradedExample]:
    fmt = src.format
    prompt_value = cols.get(rec, "prompt", required=False)
    prompt = src.prompt or (str(prompt_value) if prompt_value else None)
    if fmt == "triplets":
        q = _text(cols.get(rec, "query"), "query")
        ex = GradedExample(q, prompt=prompt)
        positive = cols.get(rec, "positive")
        for text in (positive if isinstance(positive, (list, tuple)) and positive else [positive]):  # a list: several
            add_candidate(ex, _text(text, "positive"), 2, None, "highest")
        for negative in cols.negatives(rec):
            add_candidate(ex, _text(negative, "negative"), 0, None, "highest")
        yield ex
        return
    q = _text(cols.get(rec, "query"), "query")
    c = _text(cols.get(rec, "candidate"), "candidate")
    score: Optional[float] = None
    if fmt == "sts":
        raw = cols.get(rec, "score")
        try:
            score = _as_float(raw, src)
        except (TypeError, ValueError):
            raise BadRow(f"score {raw!r} is not a number", kind="bad score") from None
        if not math.isfinite(score):
            raise BadRow(f"score {raw!r} is not finite", kind="bad score")
        if src.score_range and not (src.score_range[0] <= score <= src.score_range[1]):
            raise BadRow(
                f"score {score:g} outside the declared range "
                f"[{src.score_range[0]:g}, {src.score_range[1]:g}]",
                kind="score out of range",
            )
        th = src.level_thresholds()
        level = 2 if score >= th["pos"] else 1 if score >= th["weak"] else 0
    else:
        default = NLI_DEFAULT if fmt == "nli" else BINARY_DEFAULT
        level = _level_from_label(cols.get(rec, "label"), src.label_map or default)
        raw = cols.get(rec, "score", required=False)
        if raw not in (None, "") and _is_number(raw, src):
            score = _as_float(raw, src)
            if src.score_range and not (src.score_range[0] <= score <= src.score_range[1]):
                raise BadRow(
                    f"score {score:g} outside the declared range "
                    f"[{src.score_range[0]:g}, {src.score_range[1]:g}]",
                    kind="score out of range",
                )
    ex = GradedExample(q, prompt=prompt)
    add_candidate(ex, c, level, score, "highest")
    yield ex
    if src.symmetric:  # (the recipe allows it on sts, nli and pairs only)
        rev = GradedExample(c, prompt=prompt)
        add_candidate(rev, q, level, score, "highest")
        yield rev


def _read_qrels(src: SourceConfig, path: Optional[Path]) -> Iterator[Row]:
    """BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (query-id, corpus-id, score)."""
    if path is None:
        raise DataError("qrels sources are read from a local BEIR folder (`path`), not the hub")
    found = {}
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{src.qrels_split}.tsv"):
        found[need] = find_data_file(path, need)
        if found[need] is None:
            raise DataError(
                f"{path}: BEIR layout needs {need} (missing)",
                hint="expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv (each may be .gz, .bz2, .xz or .zst)",
            )
    corpus_file, queries_file, qrels_file = found.values()
    judgments: dict[str, dict[str, int]] = {}
    for item in delimited_records(qrels_file, "\t", src.encoding):
        if isinstance(item, BadRow):
            yield item
            continue
        line, row = item
        if line == 1 and not _is_number(row[-1]):
            continue  # header
        if len(row) < 3:
            yield BadRow(f"qrels line needs query-id, corpus-id, score; got {len(row)} fields",
                         str(qrels_file), line, kind="broken CSV line")
            continue
        qid, did, grade = row[0], row[1], row[-1]
        try:
            judgments.setdefault(qid, {})[did] = int(float(grade))
        except ValueError:
            yield BadRow(f"relevance grade {grade!r} is not a number", str(qrels_file), line, kind="bad score")
    grades = {g for d in judgments.values() for g in d.values()}
    top = max(grades) if grades else 1
    gmap = src.grade_map or {g: ("pos" if g == top else "weak" if g > 0 else "neg") for g in grades}
    needed = {d for docs in judgments.values() for d in docs}
    docs: dict[str, str] = {}
    for item in json_records(corpus_file, src.encoding):
        if isinstance(item, BadRow):
            yield item
            continue
        _, rec = item
        did = str(rec.get("_id", rec.get("id", "")))
        if did in needed:
            title = (rec.get("title") or "").strip()
            body = (rec.get("text") or "").strip()
            docs[did] = f"{title} {body}".strip() if title else body
    queries: dict[str, str] = {}
    for item in json_records(queries_file, src.encoding):
        if isinstance(item, BadRow):
            yield item
            continue
        _, rec = item
        qid = str(rec.get("_id", rec.get("id", "")))
        if qid in judgments:
            queries[qid] = rec.get("text", "")
    for qid, judged in judgments.items():
        where = str(qrels_file)
        if qid not in queries or not str(queries[qid]).strip():
            yield BadRow(f"query {qid!r} is judged but missing or empty in queries.jsonl", where, qid, kind="empty text")
            continue
        ex = GradedExample(queries[qid], prompt=src.prompt)
        for did, grade in judged.items():
            if did not in docs or not docs[did].strip():
                yield BadRow(f"document {did!r} is judged but missing or empty in corpus.jsonl", where, qid, kind="empty text")
                continue
            if grade not in gmap:
                yield BadRow(f"relevance grade {grade} has no level in grade_map", where, qid, kind="unknown label")
                continue
            add_candidate(ex, docs[did], LEVELS[gmap[grade]], float(grade), "highest")
        if ex.candidates:
            yield qid, ex
