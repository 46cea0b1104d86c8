"""``merged`` export: a sentence-transformers folder with LoRA merged, verified against the
trained model, with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hmcl_cli.console import log, warn
from hmcl_cli.errors import ExportError
from hmcl_cli.io_utils import atomic_path

VERIFY_TEXTS = [
    "How long does a refund take?",
    "ok",
    "Wie lange dauert die Lieferung nach Deutschland?",
    "退款需要多长时间才能到账？",
    "A much longer text about shipping, returns and the many ways an order can go wrong between the "
    "warehouse and your door, repeated to exceed the usual length. " * 6,
]


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def cut_reference(emb: np.ndarray, dim: Optional[int], normalize: bool) -> np.ndarray:
    """Embeddings as the model cut to ``dim`` gives them: the first ``dim`` values, re-normalised."""
    if not dim:
        return emb
    emb = emb[:, :dim]
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12) if normalize else emb


def cut_model(model: Any, dim: Optional[int], source: Path) -> None:
    """Make ``model`` output its embeddings cut to their first ``dim`` values (``export.dim``): a
    Dense layer that keeps them is appended to its head, before the normalisation, so every
    sentence-transformers loader and the ONNX graph cut alike. Warns when the model was not
    trained for that size (``loss.matryoshka_dims``)."""
    from hmcl_cli.modeling.st_modules import cut_layer

    if not dim:
        return
    full = model.dim
    if dim >= full:
        raise ExportError(f"export.dim {dim}: the embeddings of {source} have {full} dimensions; a cut must be smaller",
                          hint=f"pick a size below {full}, or leave export.dim unset for the whole embedding")
    trained = list(model.settings.matryoshka_dims)
    if dim not in trained:
        warn(f"export.dim {dim}: {source} was not trained to be cut to {dim} dimensions "
             f"({'it was trained for ' + ', '.join(map(str, trained)) if trained else 'no loss.matryoshka_dims'}); "
             f"`hmcl eval --dim {dim}` shows what the cut costs")
    model.head.append(cut_layer(dim, full).to(model.device))
    model.settings.matryoshka_dims = [d for d in trained if d < dim]


def export_merged(model_dir: Path, out: Path, extra_texts: Optional[list[str]] = None, card: Optional[dict] = None,
                  threshold: float = 0.99999, dim: Optional[int] = None) -> dict:
    """Copy/merge ``model_dir`` into a sentence-transformers folder ``out`` and verify it; with
    ``dim`` the folder outputs the embeddings cut to their first ``dim`` values (see cut_model)."""
    from dataclasses import asdict, replace

    from hmcl_cli.modeling.encoder import EmbeddingModel, write_st_config

    texts = VERIFY_TEXTS + list(extra_texts or [])
    adapter = model_dir / "adapter"
    base_emb = None
    if adapter.is_dir():
        # model_dir holds merged weights; the model as trained is the *base* + the adapter
        from peft import PeftModel

        base = EmbeddingModel.load(str(model_dir))  # tokenizer and settings; backbone replaced below
        saved_path = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        base_name = saved_path if Path(saved_path).is_dir() else base.settings.base_model
        base.backbone = _load_backbone(base_name, base.backbone)
        base_emb = base.encode(texts, side="doc").numpy()
        reference = EmbeddingModel(PeftModel.from_pretrained(base.backbone, str(adapter)), base.tokenizer, base.settings, base.head)
    else:
        reference = EmbeddingModel.load(str(model_dir))
    ref = cut_reference(reference.encode(texts, side="doc").numpy(), dim, reference.settings.normalize)
    if base_emb is not None:
        base_emb = cut_reference(base_emb, dim, reference.settings.normalize)
    with atomic_path(out, is_dir=True) as tmp:
        if base_emb is None and not (model_dir / "modules.json").is_file():
            # a transformers folder (not saved by hmcl or sentence-transformers): saved with the
            # pooling, prompts and EOS hmcl encodes it with, so sentence-transformers encodes it alike
            reference.save(tmp)
        else:
            for f in model_dir.iterdir():
                if f.name != "adapter":
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        if dim:
            cut = EmbeddingModel.load(str(tmp))
            cut_model(cut, dim, model_dir)
            write_st_config(tmp, replace(cut.settings, append_eos=False), int(cut.backbone.config.hidden_size), cut.head)
        loaded = EmbeddingModel.load(str(tmp))
        if card is not None:
            info = {**card, "dim": dim, "pipeline": loaded.describe(), "head": len(loaded.head) > 0,
                    "settings": asdict(loaded.settings)}
            (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
        exported = loaded.encode(texts, side="doc").numpy()
        report = parity(ref, exported)
        if report["mean_cosine"] < threshold:
            raise ExportError(f"merged export does not match the trained model: mean cosine "
                              f"{report['mean_cosine']:.6f} < {threshold}", hint="please report this as a bug")
        if base_emb is not None:
            report["max_abs_diff_vs_base"] = float(np.abs(base_emb - exported).max())
            if report["max_abs_diff_vs_base"] < 1e-6:
                raise ExportError("merged LoRA export equals the base model (the adapter was not merged)",
                                  hint="please report this as a bug")
        if dim:
            report["dim"] = dim
        (tmp / "hmcl_export.json").write_text(json.dumps({"format": "merged", **report}, indent=2))
    log(f"export merged -> {out}{f' (cut to {dim} dimensions)' if dim else ''}: mean cosine vs trained"
        f"{' cut alike' if dim else ''} {report['mean_cosine']:.6f} (min {report['min_cosine']:.6f})")
    return report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _eval_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The model card's evaluation table: a row per task and hmcl metric (the task's main metric
    first), a column per model; every mteb score stays in the run's eval/results.json."""
    results, tasks = report.get("results", {}), report.get("tasks", {})
    models = list(dict.fromkeys(m for per in results.values() for m in per))
    rows = []
    for task, per in results.items():
        main = tasks.get(task, {}).get("main")
        names = list(dict.fromkeys(k for r in per.values() for k, v in r.items() if isinstance(v, (int, float))))
        names = [n for n in names if n != "main_score" and not n.startswith("delta")] or ["main_score"]
        names.sort(key=lambda n: n != main)
        for n in names:
            rows.append([task, n, *(f"{per[m][n]:.4f}" if isinstance(per.get(m, {}).get(n), (int, float))
                                    else ("error" if "error" in per.get(m, {}) else "") for m in models)])
    return ["task", "metric", *models], rows


def model_card(info: dict) -> str:
    """The merged folder's README.md: how to use the model (its prompts included), what it was
    trained on, how it scored, and the recipe that reproduces it. ``info``: name, base_model,
    repo (where it is pushed), settings (EncoderSettings as a dict), pipeline, head, data (stats
    splits), eval (the eval report), recipe (YAML), dim, matryoshka_dims, checkpoint (step,
    total_steps, path: a checkpoint's model)."""
    where = info.get("repo") or "PATH"
    settings = info.get("settings") or {}
    query_prompt, doc_prompt = settings.get("query_prompt") or "", settings.get("doc_prompt") or ""
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, hmcl, embeddings]", f"base_model: {info.get('base_model', '')}", "---", "",
             f"# {info.get('name', 'hmcl model')}", "",
             f"Fine-tuned from `{info.get('base_model', '')}` with hmcl (Hierarchical Multilevel Contrastive Learning).", ""]
    if info.get("checkpoint"):
        at = info["checkpoint"]
        lines += [f"This is the model at training step {at.get('step')} of {at.get('total_steps')} (checkpoint "
                  f"`{Path(str(at.get('path'))).name}`), not the model the training chose at its end.", ""]
    lines += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
              f"model = SentenceTransformer({where!r})",
              "queries = model.encode_query([\"How long does a refund take?\"])",
              "documents = model.encode_document([\"Refunds reach your card within five days.\"])",
              "print(model.similarity(queries, documents))", "```", "",
              "(`encode_query` and `encode_document` are sentence-transformers 5 or later; with an older one, "
              "`model.encode(texts, prompt_name=\"query\")` for queries where the model has a query prompt.)", ""]
    for side, prompt in (("query", query_prompt), ("document", doc_prompt)):
        if prompt:
            lines += [f"`encode_{side}` puts the {side} instruction the model was trained with before each text "
                      f"(`prompts` in config_sentence_transformers.json): `{prompt!r}`. Plain `model.encode` does not; "
                      f"with it, pass `prompt_name={side!r}`.", ""]
    if info.get("pipeline"):
        lines += [f"Embedding: {info['pipeline']}.", ""]
    if info.get("head"):
        lines += ["transformers alone does not apply the layers after the pooling (`modules.json`): use "
                  "sentence-transformers, or the ONNX export, which has them in its graph.", ""]
    else:
        lines += ["transformers: load with `AutoModel`, " + ("put the instruction above before each text, " if
                  query_prompt or doc_prompt else "") + "pool as `1_Pooling/config.json` says, then L2-normalise.", ""]
    lines += [f"mteb: `mteb.get_model({where!r})` or wrap the SentenceTransformer above. hmcl's ONNX export of the "
              "model has a README of its own with the same steps for onnxruntime.", ""]
    if settings.get("segment_length"):
        lines += [f"Long texts: hmcl encodes a text past {settings['segment_length']} tokens as segments "
                  f"(overlap {settings.get('segment_overlap', 0)}) and averages them, as the model was trained "
                  "(`hmcl_cli.modeling.encoder.EmbeddingModel.load` on this folder, settings in hmcl_config.json); "
                  f"sentence-transformers, transformers and the ONNX export cut such a text to "
                  f"{settings.get('doc_max_length')} tokens instead.", ""]
    if info.get("dim"):
        lines += ["## Embedding size", "",
                  f"Exported cut to its first {info['dim']} dimensions (a Dense layer keeps them, before the "
                  "normalisation): `model.encode` returns them directly.", ""]
    elif info.get("matryoshka_dims"):
        dims = ", ".join(map(str, info["matryoshka_dims"]))
        lines += ["## Smaller embeddings (matryoshka)", "",
                  f"Trained to be cut to its first {dims} dimensions as well as used whole. Cut with "
                  f"`SentenceTransformer({where!r}, truncate_dim=N)` and compare with cosine similarity "
                  "(`model.similarity`), or keep the first N values of each embedding and L2-normalise them.", ""]
    if info.get("eval", {}).get("results"):
        header, rows = _eval_rows(info["eval"])
        this = "this model"
        if info.get("dim"):
            cut = f"fine-tuned@{info['dim']}"
            this = f"the model before the cut to {info['dim']} dimensions" + (
                f"; this model is `{cut}`" if cut in header else "; it was not evaluated cut")
        lines += ["## Evaluation", "", "Scored with mteb by hmcl (`base`: the base model encoded as the recipe "
                  f"trains it; `fine-tuned`: {this}).", "", *_table(header, rows)]
    if info.get("data"):
        splits = {k: v for k, v in info["data"].items() if isinstance(v, dict) and v.get("examples")}
        mined = " The training split includes the hard negatives and weak-positives `hmcl mine` added." \
            if info.get("mined") else ""
        lines += ["## Training data", "", "Graded examples: a query with positive, weak-positive and negative "
                  f"candidates.{mined}", "", *_table(["split", "examples", "positives", "weak-positives", "negatives"],
                                              [[k, *(str(v.get(c, 0)) for c in ("examples", "pos", "weak", "neg"))]
                                               for k, v in splits.items()])]
    if info.get("recipe"):
        lines += ["## Recipe", "", "What it was trained with (`hmcl run recipe.yaml`, the data at these paths):", "", "```yaml", info["recipe"].rstrip(), "```", ""]
    return "\n".join(lines)


def _load_backbone(name: str, like: Any) -> Any:
    """The base model's backbone (same class as ``like``), resolved like any model name."""
    from hmcl_cli.modeling.resolve import resolve_transformer

    try:
        return type(like).from_pretrained(resolve_transformer(name))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the LoRA base model {name!r} could not be loaded to verify the merge: {e}",
                          hint="make the base model available (path, cache or offline package)") from None
