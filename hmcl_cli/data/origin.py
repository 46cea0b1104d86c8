"""What a run's prepared data was made from, and whether the recipe still asks for that data.

``hmcl prepare`` records in ``stats.json`` (``made_from``) the recipe's data settings (the
``data`` section without the training-only ``weight`` and without the sources' paths, and
``seed``, which draws the dev split) and, per source, the files it read: each one's size,
modification time and SHA-256. ``hmcl mine``, ``hmcl train`` and ``hmcl run --resume`` read the
prepared files rather than the sources; if the recipe's data settings or a source's content
changed since, they would use the old data without a word. :func:`origin_changes` says what
changed, so they stop with a pointer to ``hmcl prepare`` instead. ``hmcl mine`` records its
settings and the ``mine.corpus`` files it read (:func:`mined_from`), which ``hmcl train``
compares with the recipe's now (:func:`mining_changes`).

Files are compared by content, not by where they are: a run directory restored on another machine
(another checkout path, another ``$HMCL_DATA``) with the same files passes; a file whose time
changed is hashed again, so one that was only touched passes too. Data prepared before this
record existed is not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from hmcl_cli.data.readers import is_pattern, source_files
from hmcl_cli.recipe import Recipe

NOT_COMPARED = {"weight", "path"}  # sampling only; where the files are (their content is compared)


def data_settings(recipe: Recipe) -> dict:
    """The settings ``prepare``'s output depends on, besides the files' content."""
    data = recipe.data.model_dump(mode="json")
    data["sources"] = [{k: v for k, v in src.items() if k not in NOT_COMPARED} for src in data["sources"]]
    return {"data": data, "seed": recipe.seed}


def _files_of(path: Optional[Path]) -> list[Path]:
    """The local files a data path reads: the files a pattern matches now (one more or fewer is a
    change), every file of a folder (BEIR, `save_to_disk`), sorted, or the file itself."""
    if path is None:
        return []
    if is_pattern(path):
        return [p.resolve() for p in source_files(path)]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []


def _source_files(recipe: Recipe) -> list[list[Path]]:
    """Per source, the local files it reads."""
    return [_files_of(recipe.resolve(src.path).resolve() if src.path else None) for src in recipe.data.sources]


def _corpus_files(recipe: Recipe) -> list[list[Path]]:
    """Per ``mine.corpus`` entry, the files it reads."""
    return [_files_of(recipe.resolve(entry).resolve()) for entry in recipe.mine.corpus]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_records(groups: list[list[Path]]) -> list[list[dict]]:
    return [[{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": _sha256(p)}
             for p in files] for files in groups]


def made_from(recipe: Recipe) -> dict:
    """The record ``prepare`` keeps of what it read."""
    return {**data_settings(recipe), "files": _file_records(_source_files(recipe))}


def _file_changes(then: list, now: list[list[Path]], where: str) -> list[str]:
    """How the files read now (per entry of ``where``) differ from the record of those read then."""
    changes = []
    for i, (old_files, files) in enumerate(zip(then, now)):
        if len(old_files) != len(files):
            changes.append(f"{where}.{i}: {len(old_files)} file(s) read then, {len(files)} now")
            continue
        for old, path in zip(old_files, files):
            why = _same_file(old, path)
            if why:
                changes.append(f"{where}.{i}: {path}: {why}")
    return changes


def _differences(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k), out)
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            out.append(f"{where}: {len(old)} then, {len(new)} now")
        for i, (a, b) in enumerate(zip(old, new)):
            _differences(a, b, f"{where}.{i}", out)
    elif old != new:
        out.append(f"{where}: {json.dumps(old)} then, {json.dumps(new)} now")


def _same_file(then: dict, path: Path) -> Optional[str]:
    """None when ``path`` holds what ``then`` recorded, else how it differs."""
    st = path.stat()
    if st.st_size != then.get("size"):
        return f"{then.get('size'):,} bytes then, {st.st_size:,} now"
    if str(path) == then.get("path") and st.st_mtime_ns == then.get("mtime_ns"):
        return None
    return None if _sha256(path) == then.get("sha256") else "its content changed (same size)"


def differences(old: Any, new: Any) -> list[str]:
    """Each leaf that differs between two settings records: ``key: <then> then, <now> now``."""
    out: list[str] = []
    _differences(old, new, "", out)
    return out


def listed(changes: list[str], most: int, sep: str = "; ") -> str:
    """The first ``most`` changes joined by ``sep``, with how many more there are."""
    return sep.join(changes[:most] + ([f"... and {len(changes) - most} more"] if len(changes) > most else []))


def _record(path: Path, key: str) -> Optional[dict]:
    """The settings record ``key`` of a JSON file hmcl wrote, or None (no file, no record)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def origin_changes(recipe: Recipe, stats_path: Path) -> Optional[list[str]]:
    """What differs between the data ``stats_path``'s prepare read and what the recipe reads now
    (settings, then each source's files); None when the stats hold no record (data prepared
    before it existed)."""
    record = _record(stats_path, "made_from")
    if record is None or not isinstance(record.get("files"), list):
        return None
    changes = differences({k: record.get(k) for k in ("data", "seed")}, data_settings(recipe))
    return changes + _file_changes(record["files"], _source_files(recipe), "data.sources")


# the model keys that decide what a text encodes to (mining's candidates, a training's course)
ENCODING_KEYS = ("name_or_path", "revision", "pooling", "include_prompt", "normalize", "max_length", "query_max_length",
                 "doc_max_length", "query_prompt", "doc_prompt", "padding_side", "append_eos", "segments")


def mining_settings(recipe: Recipe) -> dict:
    """The settings ``hmcl mine``'s candidates depend on: the mine section (less ``enabled``, which
    only says whether ``hmcl run`` mines) and the model's :data:`ENCODING_KEYS`."""
    mine = recipe.mine.model_dump(mode="json")
    mine.pop("enabled", None)
    return {"mine": mine, "model": recipe.model.model_dump(mode="json", include=set(ENCODING_KEYS))}


def mined_from(recipe: Recipe) -> dict:
    """The record ``hmcl mine`` keeps: :func:`mining_settings` and the ``mine.corpus`` files it read
    (each one's size, time and SHA-256), so a corpus edited since is told apart."""
    return {**mining_settings(recipe), "corpus_files": _file_records(_corpus_files(recipe))}


def mining_changes(recipe: Recipe, report_path: Path) -> Optional[list[str]]:
    """What differs between what the training data was mined with (settings, corpus files) and
    what the recipe names now; None without a record."""
    record = _record(report_path, "made_with")
    if record is None:
        return None
    then_files = record.pop("corpus_files", None)
    changes = differences(record, mining_settings(recipe))
    if isinstance(then_files, list):
        changes += _file_changes(then_files, _corpus_files(recipe), "mine.corpus")
    return changes
