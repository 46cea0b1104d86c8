"""What a run's prepared data was made from, and whether the recipe still asks for that data.

``hmcl prepare`` records in ``stats.json`` (``made_from``) the recipe's data settings (the
``data`` section without the training-only ``weight``, and ``seed``, which draws the dev split)
and, for each local source file, its size, modification time and SHA-256. ``hmcl mine``,
``hmcl train`` and ``hmcl run --resume`` read the prepared files rather than the sources; if the
recipe's data settings or a source file changed since, they would train on the old data without
a word. :func:`origin_changes` says what changed, so they can stop with a pointer to ``hmcl
prepare`` instead. Data prepared before this record existed is not checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from hmcl_cli.recipe import Recipe

TRAINING_ONLY = {"weight"}  # source keys that shape the sampling of prepared data, not the data


def data_settings(recipe: Recipe) -> dict:
    """The settings ``prepare``'s output depends on."""
    data = recipe.data.model_dump(mode="json")
    data["sources"] = [{k: v for k, v in src.items() if k not in TRAINING_ONLY} for src in data["sources"]]
    for src, cfg in zip(data["sources"], recipe.data.sources):
        if cfg.path:  # where it is, not how the recipe spells it
            src["path"] = str(recipe.resolve(cfg.path).resolve())
    return {"data": data, "seed": recipe.seed}


def _files(recipe: Recipe) -> list[Path]:
    out = []
    for src in recipe.data.sources:
        if src.path:
            path = recipe.resolve(src.path).resolve()
            out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def made_from(recipe: Recipe) -> dict:
    """The record ``prepare`` keeps of what it read."""
    files = {}
    for p in _files(recipe):
        st = p.stat()
        files[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(p)}
    return {**data_settings(recipe), "files": files}


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


def origin_changes(recipe: Recipe, stats_path: Path) -> Optional[list[str]]:
    """What differs between the data ``stats_path``'s prepare read and what the recipe reads now
    (settings, then files); None when the stats hold no record (data prepared before it existed)."""
    try:
        record = json.loads(stats_path.read_text(encoding="utf-8")).get("made_from")
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    changes: list[str] = []
    _differences({k: record.get(k) for k in ("data", "seed")}, data_settings(recipe), "", changes)
    then = record.get("files", {})
    now = {str(p): p for p in _files(recipe)}
    for name in sorted(set(then) | set(now)):
        old, path = then.get(name), now.get(name)
        if old is None or path is None:
            changes.append(f"{name}: {'read then, not now' if path is None else 'read now, not then'}")
            continue
        st = path.stat()
        if st.st_size != old.get("size"):
            changes.append(f"{name}: {old.get('size'):,} bytes then, {st.st_size:,} now")
        elif st.st_mtime_ns != old.get("mtime_ns") and _sha256(path) != old.get("sha256"):
            changes.append(f"{name}: its content changed (same size)")
    return changes
