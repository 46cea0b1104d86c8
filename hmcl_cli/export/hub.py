"""``export.push_to_hub``: the verified exports of a run, uploaded to a Hugging Face model repo.

The merged sentence-transformers folder is the repo's root (so ``SentenceTransformer("org/name")``
loads it, model card included); hmcl's ONNX graphs (pooling and normalisation inside, unlike the
transformer-only graph sentence-transformers' ONNX backend reads from ``onnx/``) go under
``hmcl_onnx/`` and ``hmcl_onnx_int8/``. Everything is one commit, made only after every format
was exported and verified; the commit message carries the run's name and its eval results.
Files an earlier push wrote and this one does not stay in the repo.

Python use::

    push_exports(exports_dir, PushConfig(repo="org/support-embedder"), message="...")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from hmcl_cli.errors import PushError
from hmcl_cli.export import export_folder

# export format -> where its folder goes in the repo
REPO_LAYOUT = {"merged": "", "onnx": "hmcl_onnx", "onnx-int8": "hmcl_onnx_int8"}


def check_push_possible(cfg: Any) -> None:
    """Before a run trains: a push needs the hub (no offline switch, and in reach) and a token."""
    from hmcl_cli.hub_access import hub_unreachable, offline

    why, switch = hub_unreachable(), offline()
    if why:
        raise PushError(f"export.push_to_hub {cfg.repo}: nothing can be uploaded: {why}",
                        hint=f"unset {switch} for this run, or remove export.push_to_hub" if switch else
                        "run where the Hub can be reached, or remove export.push_to_hub")
    if _token(cfg) is None:
        raise PushError(f"export.push_to_hub {cfg.repo}: no Hugging Face token"
                        + (f" (${cfg.token_env} is not set)" if cfg.token_env else ""),
                        hint=f"export {cfg.token_env or 'HF_TOKEN'}=<a token with write access>, or `hf auth login`")


def _token(cfg: Any) -> Optional[str]:
    if cfg.token_env:
        return os.environ.get(cfg.token_env) or None
    from huggingface_hub import get_token

    return get_token()


def repo_files(exports: Path, formats: Optional[list[str]] = None) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of every file the push uploads, in a stable order: the
    export folders of ``formats`` (those this export wrote; None: every one there)."""
    if (formats is not None and "merged" not in formats) or not (exports / "merged").is_dir():
        raise PushError(f"{exports}: no merged export to push (the repo's root is the sentence-transformers folder)",
                        hint="add merged to export.formats (or --format merged)")
    out = []
    for fmt, prefix in REPO_LAYOUT.items():
        root = exports / export_folder(fmt)
        if not root.is_dir() or (formats is not None and fmt not in formats):
            continue  # (an earlier export's folder that this one did not write is not pushed)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            out.append((f"{prefix}/{rel}" if prefix else rel, path))
    return out


def push_exports(exports: Path, cfg: Any, message: str, formats: Optional[list[str]] = None) -> str:
    """Upload the export folders of ``formats`` under ``exports`` to ``cfg.repo`` in one commit;
    returns its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = repo_files(exports, formats)
    token = _token(cfg)
    api = HfApi(token=token)
    try:
        api.create_repo(cfg.repo, private=cfg.private, exist_ok=True, repo_type="model")
        if cfg.branch:
            api.create_branch(cfg.repo, branch=cfg.branch, exist_ok=True, repo_type="model")
        info = api.create_commit(cfg.repo, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                            for name, path in files],
                                 commit_message=message, repo_type="model", revision=cfg.branch)
    except Exception as e:  # noqa: BLE001 - network, authentication, permissions: one message
        raise PushError(f"export.push_to_hub {cfg.repo}: the upload failed ({type(e).__name__}: {_first_line(e)})",
                        hint="check the token's write access to the repo and the network; the exports are "
                        f"verified in {exports}: push them again with `hmcl export --model RUN --push-to-hub "
                        f"{cfg.repo}`") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{cfg.repo}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def commit_message(name: str, report: Optional[dict]) -> str:
    """``hmcl <run>: <task> <metric> <value> (base <value>)...`` from the run's eval results."""
    parts = []
    for task, per_model in ((report or {}).get("results") or {}).items():
        main = (report.get("tasks", {}).get(task) or {}).get("main", "main_score")
        tuned, base = per_model.get("fine-tuned", {}).get(main), per_model.get("base", {}).get(main)
        if isinstance(tuned, float):
            parts.append(f"{task} {main} {tuned:.4f}" + (f" (base {base:.4f})" if isinstance(base, float) else ""))
    return f"hmcl {name}" + (": " + "; ".join(parts) if parts else "")
