"""``merged`` export: a sentence-transformers folder with LoRA merged, verified against the
trained model, with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hmcl_cli.console import log
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


def export_merged(model_dir: Path, out: Path, extra_texts: Optional[list[str]] = None, card: Optional[dict] = None,
                  threshold: float = 0.99999) -> dict:
    """Copy/merge ``model_dir`` into a sentence-transformers folder ``out`` and verify it."""
    from hmcl_cli.modeling.encoder import EmbeddingModel

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
        reference = EmbeddingModel(PeftModel.from_pretrained(base.backbone, str(adapter)), base.tokenizer, base.settings)
    else:
        reference = EmbeddingModel.load(str(model_dir))
    ref = reference.encode(texts, side="doc").numpy()
    with atomic_path(out, is_dir=True) as tmp:
        for f in model_dir.iterdir():
            if f.name != "adapter":
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        if card is not None:
            (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
        exported = EmbeddingModel.load(str(tmp)).encode(texts, side="doc").numpy()
        report = parity(ref, exported)
        if report["mean_cosine"] < threshold:
            raise ExportError(f"merged export does not match the trained model: mean cosine "
                              f"{report['mean_cosine']:.6f} < {threshold}", hint="please report this as a bug")
        if base_emb is not None:
            report["max_abs_diff_vs_base"] = float(np.abs(base_emb - exported).max())
            if report["max_abs_diff_vs_base"] < 1e-6:
                raise ExportError("merged LoRA export equals the base model (the adapter was not merged)",
                                  hint="please report this as a bug")
        (tmp / "hmcl_export.json").write_text(json.dumps({"format": "merged", **report}, indent=2))
    log(f"export merged -> {out}: mean cosine vs trained {report['mean_cosine']:.6f} (min {report['min_cosine']:.6f})")
    return report


def model_card(info: dict) -> str:
    lines = ["---", "library_name: sentence-transformers", "tags: [sentence-transformers, hmcl, embeddings]",
             f"base_model: {info.get('base_model', '')}", "---", "",
             f"# {info.get('name', 'hmcl model')}", "",
             f"Fine-tuned from `{info.get('base_model', '')}` with hmcl (Hierarchical Multilevel Contrastive Learning).", ""]
    if info.get("data"):
        lines += ["## Training data", "", "```json", json.dumps(info["data"], indent=2), "```", ""]
    if info.get("eval"):
        lines += ["## Evaluation", "", "```json", json.dumps(info["eval"], indent=2), "```", ""]
    if info.get("recipe"):
        lines += ["## Recipe", "", "```yaml", info["recipe"].rstrip(), "```", ""]
    lines += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer('PATH')", "emb = model.encode(['How long does a refund take?'])", "```", "",
              "transformers: load with `AutoModel`, mean/CLS/last-token pool as `1_Pooling/config.json` says, then L2-normalise.",
              "", "mteb: `mteb.get_model('PATH')` or wrap the SentenceTransformer above.", ""]
    if info.get("matryoshka_dims"):
        dims = ", ".join(map(str, info["matryoshka_dims"]))
        lines += ["## Smaller embeddings (matryoshka)", "",
                  f"Trained to be cut to its first {dims} dimensions as well as used whole. Cut with "
                  "`SentenceTransformer('PATH', truncate_dim=N)` and compare with cosine similarity "
                  "(`model.similarity`), or keep the first N values of each embedding and L2-normalise them.", ""]
    return "\n".join(lines)


def _load_backbone(name: str, like: Any) -> Any:
    """The base model's backbone (same class as ``like``), resolved like any model name."""
    from hmcl_cli.modeling.resolve import resolve_model

    try:
        return type(like).from_pretrained(resolve_model(name))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the LoRA base model {name!r} could not be loaded to verify the merge: {e}",
                          hint="make the base model available (path, cache or offline package)") from None
