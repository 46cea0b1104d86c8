"""Teacher models that grade (query, text) pairs for ``hmcl mine``.

A *cross-encoder* (a sequence-classification model with one relevance logit, or two classes
where class 1 is "relevant") reads query and text together and is the usual choice: its score
is a sigmoid (or softmax) probability. An *embedder* teacher is a stronger embedding model:
its score is the product of the two embeddings as the model makes them, with its own prompts:
the cosine for a model that normalizes its embeddings (most do), the dot product for one that
does not (a dot-product model, scored as it was trained to score).

Python use::

    from hmcl_cli.teacher import load_teacher
    teacher = load_teacher(recipe.mine.teacher, recipe.base_dir)
    scores = teacher.score(["what is hmcl?"], ["a training tool"])  # numpy [N]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from hmcl_cli.console import ProgressBar, log
from hmcl_cli.errors import ModelNotFoundError, RecipeError
from hmcl_cli.modeling.encoder import EmbeddingModel, autocast_for, best_device, position_limit
from hmcl_cli.modeling.resolve import resolve_model
from hmcl_cli.recipe import cross_encoder_prompts_problem


def teacher_kind(folder: Path) -> str:
    """`cross-encoder` when the saved config is a *ForSequenceClassification model, else `embedder`."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "embedder"
    archs = config.get("architectures") or []
    return "cross-encoder" if any(a.endswith("ForSequenceClassification") for a in archs) else "embedder"


def _fitting(max_length: int, limit: Optional[int], folder: Path) -> int:
    """``mine.teacher.max_length``, or the teacher's position limit where that is shorter (the
    teacher truncates either way; past its limit it would fail on the first long pair)."""
    if limit is not None and max_length > limit:
        log(f"mine.teacher: {folder} encodes at most {limit} tokens per sequence; truncating to {limit} "
            f"(mine.teacher.max_length {max_length})")
        return limit
    return max_length


class CrossEncoderTeacher:
    """Scores pairs jointly; returns relevance probabilities in [0, 1]."""

    def __init__(self, folder: Path, max_length: int, batch_size: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).to(best_device()).eval()
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelNotFoundError(
                f"mine.teacher: {folder} is a classifier with {labels} labels, not a relevance cross-encoder",
                hint="use a cross-encoder with one relevance output (or two: not relevant / relevant), "
                "or set mine.teacher.kind: embedder for an embedding model",
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length, self.batch_size = _fitting(max_length, position_limit(self.model), folder), batch_size

    @torch.inference_mode()
    def score(self, queries: Sequence[str], texts: Sequence[str], progress: bool = False) -> np.ndarray:
        enc = self.tokenizer(list(queries), list(texts), truncation=True, max_length=self.max_length)
        ids = enc["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros(len(ids), dtype=np.float32)
        dev = self.model.device
        bar = ProgressBar("teacher", len(ids), "pairs", enabled=progress)
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
                batch = {k: v.to(dev) for k, v in batch.items()}
                with autocast_for(dev):
                    logits = self.model(**batch).logits.float()
                p = torch.sigmoid(logits[:, 0]) if logits.size(1) == 1 else torch.softmax(logits, -1)[:, 1]
                out[idx] = p.cpu().numpy()
                bar.update(len(idx))
        finally:
            bar.close()
        return out


class EmbedderTeacher:
    """Scores pairs by a (stronger) embedding model's similarity: the product of its embeddings
    (the cosine where it normalizes them, see the module doc)."""

    def __init__(self, folder: Path, cfg: Any):
        self.model = EmbeddingModel.load(str(folder), max_length=cfg.max_length, check_lengths=False,
                                         query_prompt=cfg.query_prompt or None, doc_prompt=cfg.doc_prompt or None)
        s = self.model.settings
        s.query_max_length = s.doc_max_length = _fitting(cfg.max_length, self.model.position_limit(), folder)
        self.model.to(best_device())
        self.batch_size = cfg.batch_size

    def score(self, queries: Sequence[str], texts: Sequence[str], progress: bool = False) -> np.ndarray:
        q = self.model.encode(queries, side="query", batch_size=self.batch_size, progress=progress,
                              description="teacher queries")
        d = self.model.encode(texts, side="doc", batch_size=self.batch_size, progress=progress,
                              description="teacher texts")
        return (q * d).sum(-1).cpu().numpy()


def load_teacher(cfg: Any, base_dir: Optional[Path] = None) -> Any:
    folder = resolve_model(cfg.model, base_dir=base_dir)
    kind = teacher_kind(folder) if cfg.kind == "auto" else cfg.kind
    if kind == "cross-encoder":
        if cfg.prompts():  # (`kind: auto`: known only now)
            raise RecipeError(f"mine.teacher: {cfg.model} is a cross-encoder (a sequence-classification model): "
                              + cross_encoder_prompts_problem(cfg.prompts()))
        return CrossEncoderTeacher(folder, cfg.max_length, cfg.batch_size)
    return EmbedderTeacher(folder, cfg)
