"""Run hmcl's evaluation tasks through mteb, so the numbers are MTEB's own.

* :class:`MtebEncoder` wraps an :class:`~hmcl_cli.modeling.encoder.EmbeddingModel` as an mteb
  encoder: query/document sides follow mteb's ``prompt_type``, every distinct text is encoded
  once per model per call (a cache shared by all tasks; with a cache file, once per model across
  calls: :meth:`MtebEncoder.load` / :meth:`MtebEncoder.save`), and the model meta carries a name
  and a revision derived from the weights, so two models are never confused in mteb's bookkeeping.
* :func:`local_task` turns a local task (read with the same readers as ``prepare``) into an mteb
  task object: ``sts`` -> AbsTaskSTS, ``pair_classification`` -> AbsTaskPairClassification,
  ``retrieval`` -> AbsTaskRetrieval (BEIR folders keep their graded qrels; a graded JSONL is
  pooled into one corpus with gains pos 2 / weak 1), ``reranking`` -> AbsTaskRetrieval with
  ``top_ranked`` (each query's own candidates; positives relevant), mteb's current way.
* :func:`hub_task` finds a task by its MTEB name; it needs network or a cached copy of its
  dataset (without either, an immediate, clear error: :mod:`hmcl_cli.hub_access`). With the Hub
  out of reach, a cached copy is read without asking the Hub (:func:`load_hub_data`).

:func:`run_mteb` evaluates one model on one task and returns the main metrics under hmcl's short
names (``spearman``, ``ndcg@10``, ``map`` ...) together with every metric mteb reports.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hmcl_cli.console import log
from hmcl_cli.errors import DataError

# hmcl metric name -> mteb score key, per task kind
METRIC_NAMES: dict[str, dict[str, str]] = {
    "sts": {"spearman": "cosine_spearman", "pearson": "cosine_pearson"},
    "pair_classification": {"ap": "similarity_ap", "f1": "similarity_f1", "accuracy": "similarity_accuracy"},
    "retrieval": {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@100": "recall_at_100",
                  "map@100": "map_at_100"},
    "reranking": {"map": "map_at_1000", "mrr@10": "mrr_at_10", "ndcg@10": "ndcg_at_10"},
}
_MTEB_TYPE = {"sts": "STS", "pair_classification": "PairClassification", "retrieval": "Retrieval",
              "reranking": "Reranking"}
_MAIN = {"sts": "cosine_spearman", "pair_classification": "similarity_ap", "retrieval": "ndcg_at_10",
         "reranking": "map_at_1000"}


def _metadata(name: str, kind: str, split: str = "test") -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, description=f"hmcl local {kind} task {name}", type=_MTEB_TYPE[kind],
        dataset={"path": f"hmcl-local/{name}", "revision": "local"}, category="t2t",
        eval_splits=[split], eval_langs=["eng-Latn"], main_score=_MAIN[kind], modalities=["text"],
        reference=None, date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="",
    )


def local_task(data: Any) -> Any:
    """An mteb task object holding a loaded :class:`~hmcl_cli.evaluation.runner.TaskData`."""
    from datasets import Dataset, DatasetDict

    kind, name = data.kind, data.task.name
    meta = _metadata(name, kind)
    if kind in ("sts", "pair_classification"):
        a, b, gold = data.pairs
        if kind == "sts":
            from mteb.abstasks.sts import AbsTaskSTS as Base

            cols = {"sentence1": a, "sentence2": b, "score": [float(x) for x in gold]}
        else:
            from mteb.abstasks.pair_classification import AbsTaskPairClassification as Base

            cols = {"sentence1": a, "sentence2": b, "labels": [int(x) for x in gold]}
        dataset = DatasetDict({"test": Dataset.from_dict(cols)})
        attrs: dict[str, Any] = {"metadata": meta}
        if kind == "sts":
            attrs["min_score"], attrs["max_score"] = float(np.min(gold)), float(np.max(gold))
    else:
        from mteb.abstasks.retrieval import AbsTaskRetrieval as Base
        from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

        split = _retrieval_split(data, Dataset)
        dataset = {"default": {"test": RetrievalSplitData(**split)}}
        attrs = {"metadata": meta}

    def load_data(self, num_proc: Optional[int] = None, **kwargs: Any) -> None:
        self.dataset = dataset
        self.data_loaded = True

    attrs["load_data"] = load_data
    cls = type(f"Hmcl{_MTEB_TYPE[kind]}Task", (Base,), attrs)
    return cls()


# what mteb's retrieval search holds (mteb 2.26, measured with hmcl eval on a CPU: peaks of 1.4,
# 2.9 and 6.2 GB at 2,000 / 10,000 / 20,000 queries over twice as many documents, 10.1 GB at 20,000
# over 200,000): each query's best MTEB_TOP_K documents on heaps (~80 B each), and the cosines of
# every query with a chunk of MTEB_CHUNK documents (float32, and as much again for topk and copies)
MTEB_TOP_K, MTEB_CHUNK, HEAP_ENTRY_BYTES = 1000, 50_000, 80


def search_memory(queries: int, docs: int) -> int:
    """Bytes of host memory mteb's retrieval search of ``queries`` over ``docs`` documents takes
    (an estimate, besides the model and its embeddings)."""
    return queries * min(docs, MTEB_TOP_K) * HEAP_ENTRY_BYTES + queries * min(docs, MTEB_CHUNK) * 4 * 2


def _check_search_memory(task: Any, queries: int, docs: int) -> None:
    """A DataError, before any model loads, where mteb's search would take more host memory than
    is available (the system's out-of-memory killer ended `hmcl eval` without a word: 100,000
    queries over 200,000 documents)."""
    from hmcl_cli.environment import available_memory

    need, free = search_memory(queries, docs), available_memory()
    if free is None or need <= free:
        return
    fit = max(1, int(queries * free / need * 0.7))
    raise DataError(
        f"task {task.name!r}: mteb's retrieval search of {queries:,} queries over {docs:,} documents needs about "
        f"{need / 2**30:.0f} GiB of host memory ({MTEB_TOP_K} best documents kept per query, every query scored "
        f"against {MTEB_CHUNK:,} documents at a time); {free / 2**30:.0f} GiB are available",
        hint=f"evaluate a sample of the queries: `max_queries: {fit}` on the task in eval.tasks (`--max-queries "
        f"{fit}` with the task flags of `hmcl eval`)" + ("; for the prepared dev split, `data.dev_max_queries` "
                                                          "keeps it smaller" if task.path == "dev" else ""))


def _retrieval_split(data: Any, Dataset: Any) -> dict:
    """A local retrieval or reranking task as mteb's split data (queries, corpus, qrels, and for
    reranking each query's own candidates), checked by :func:`retrieval_parts`."""
    docs, queries, qrels, top = retrieval_parts(data)
    if len(queries) < len(data.examples):  # as MTEB scores them; said, since the metrics are over the others
        relevant = "a positive" if data.kind == "reranking" else "a positive or weak-positive"
        log(f"task {data.task.name}: {len(data.examples) - len(queries)} of {len(data.examples)} queries have no "
            f"relevant candidate ({relevant}) and are left out of its metrics")
    corpus = Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in docs.items()])
    return {"queries": Dataset.from_list(queries), "corpus": corpus, "relevant_docs": qrels,
            "top_ranked": top or None}


def retrieval_parts(data: Any) -> tuple[dict, list, dict, dict]:
    """(documents by id, queries, qrels, reranking's candidates per query) of a local task; a
    DataError where no query has a relevant candidate, or where a retrieval search of this size
    would not fit in host memory."""
    docs: dict[str, str] = {}
    doc_id: dict[str, str] = {}

    def did(text: str) -> str:
        if text not in doc_id:
            doc_id[text] = f"d{len(doc_id)}"
            docs[doc_id[text]] = text
        return doc_id[text]

    queries, qrels, top = [], {}, {}
    for i, ex in enumerate(data.examples):
        qid = f"q{i}"
        if data.kind == "reranking":
            judged = {did(t): int(c.level == 2) for t, c in ex.candidates.items()}
            if not any(judged.values()):
                continue  # no positive: AP is undefined (classic MTEB reranking drops these)
            top[qid] = list(judged)
        elif data.fmt == "qrels":
            judged = {did(t): int(round(c.score)) for t, c in ex.candidates.items() if c.score and c.score > 0}
        else:
            for t in ex.candidates:
                did(t)  # the negatives too: every candidate of the file is a document of the corpus
            judged = {did(t): int(c.level) for t, c in ex.candidates.items() if c.level > 0}
        if not judged:
            continue
        queries.append({"id": qid, "text": ex.query})
        qrels[qid] = judged
    for text in data.corpus:
        did(text)
    if not queries:
        raise DataError(f"task {data.task.name!r}: no query has a relevant candidate")
    if data.kind == "retrieval":
        _check_search_memory(data.task, len(queries), len(docs))
    return docs, queries, qrels, top


def hub_task_cached(task: Any) -> bool:
    """Whether an MTEB task's dataset is in the ``datasets`` cache (prepared before, with network):
    the copy that ``datasets`` reads when the Hub cannot be asked."""
    import glob

    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    parts = task.metadata.dataset["path"].split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])  # (the datasets client's own folder naming)
    root = os.path.join(os.path.expanduser(str(config.HF_DATASETS_CACHE)), "___".join(parts))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")))


def hub_task(name: str, split: Optional[str] = None) -> Any:
    """An MTEB task by name (only ``split`` when given); its data is downloaded on first use
    (:func:`load_hub_data`). A DataError when it is neither cached nor downloadable."""
    import mteb

    try:
        task = mteb.get_task(name, eval_splits=[split] if split else None)
    except (KeyError, ValueError) as e:
        raise DataError(f"unknown MTEB task {name!r}: {e}", hint="see `mteb.get_tasks()` for names") from None
    from hmcl_cli.hub_access import hub_unreachable

    why = hub_unreachable(datasets=True)
    if why and not hub_task_cached(task):
        raise DataError(f"MTEB task {name!r} needs the dataset {task.metadata.dataset['path']!r}, which is not in "
                        f"the local cache and cannot be downloaded: {why}",
                        hint="run once with network to cache it, or evaluate a local file (--sts/--retrieval/...)")
    return task


def hub_kind(task: Any) -> Optional[str]:
    """The hmcl task kind of a hub task's MTEB type (``STS`` -> ``sts``, ...), or None."""
    return {v: k for k, v in _MTEB_TYPE.items()}.get(task.metadata.type)


def hub_main_metric(task: Any) -> str:
    """hmcl's short name of a hub task's main score (STSBenchmark: ``spearman``), else
    ``main_score`` (mteb's own name for it)."""
    short = {key: name for name, key in METRIC_NAMES.get(hub_kind(task) or "", {}).items()}
    return short.get(task.metadata.main_score, "main_score")


def load_hub_data(task: Any) -> bool:
    """Load a hub task's data unless it is loaded; True when this call loaded it. With the Hub out
    of reach the cached copy is read in offline mode: the datasets client would otherwise retry
    the Hub with back-off (1+2+4+8+8 s, seen in its log) before it falls back to the same cache."""
    if task.data_loaded:
        return False
    from hmcl_cli.hub_access import hub_unreachable, offline_mode

    why = hub_unreachable(datasets=True)
    if not why:
        task.load_data()
        return True
    import datasets

    from hmcl_cli.console import log

    log(f"{task.metadata.name}: reading the cached copy of {task.metadata.dataset['path']} ({why})")
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # (its "using the latest cached version" lines, said above)
    try:
        with offline_mode():
            task.load_data()
    finally:
        datasets.logging.set_verbosity(level)
    return True


# the largest eval embedding cache written to a run directory (texts x (16 + 4 x dimensions) bytes)
CACHE_MAX_BYTES = 4 << 30


def text_key(side: str, text: str) -> bytes:
    """A text's key in an encoder's cache: 16 bytes of a hash of its side and itself."""
    return hashlib.blake2b(f"{side}\0{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


def cache_file(model: Any, folder: Path) -> Path:
    """The file in ``folder`` that holds ``model``'s eval embeddings across calls, named after
    what they depend on (:meth:`EmbeddingModel.cache_identity`)."""
    return Path(folder) / f"evalemb-{hashlib.sha256(model.cache_identity().encode()).hexdigest()[:16]}.npz"


class MtebEncoder:
    """An hmcl EmbeddingModel seen by mteb (EncoderProtocol), with a text cache: per call, and
    across calls where it is loaded from and saved to a cache file."""

    def __init__(self, model: Any, label: str, batch_size: int = 128, progress: bool = False):
        self.model, self.label, self.batch_size, self.progress = model, label, batch_size, progress
        self.cache: dict[bytes, np.ndarray] = {}  # text_key -> embedding
        self.encoded = 0  # texts actually run through the model (the rest came from the cache)
        self.loaded = 0  # embeddings read from a cache file
        self.used: set[bytes] = set()  # the keys of this call's texts: what save() keeps
        self.dim: Optional[int] = None  # embeddings cut to their first `dim` dimensions (matryoshka)
        self._meta = None

    def cut(self, dim: int, label: str) -> "MtebEncoder":
        """The same model with its embeddings cut to the first ``dim`` dimensions and re-normalised;
        it shares this encoder's text cache, so no text is encoded twice."""
        view = MtebEncoder(self.model, label, self.batch_size, self.progress)
        view.cache, view.used, view.dim = self.cache, self.used, dim
        return view

    @property
    def mteb_model_meta(self) -> Any:
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta

            self._meta = ModelMeta.create_empty({
                "name": f"hmcl/{self.label}", "revision": self.model.weights_digest(),
                "embed_dim": self.dim or self.model.dim, "similarity_fn_name": self.similarity_name,
                "framework": ["PyTorch"],
                "n_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_tokens": self.model.settings.doc_max_length, "open_weights": True,
                "use_instructions": bool(self.model.settings.query_prompt),
            })
        return self._meta

    def encode(self, inputs: Any, *, task_metadata: Any = None, hf_split: str = "", hf_subset: str = "",
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            texts.extend(batch["text"])
        side = "query" if getattr(prompt_type, "value", prompt_type) == "query" else "doc"
        keys = [text_key(side, t) for t in texts]
        self.used.update(keys)
        missing = list(dict.fromkeys((k, t) for k, t in zip(keys, texts) if k not in self.cache))
        if missing:
            emb = self.model.encode([t for _, t in missing], side=side, batch_size=self.batch_size,
                                    progress=self.progress, description=f"encode {self.label}").numpy()
            self.encoded += len(missing)
            for (k, _), e in zip(missing, emb):
                self.cache[k] = e
        if not texts:
            return np.zeros((0, self.dim or self.model.dim), dtype=np.float32)
        out = np.stack([self.cache[k] for k in keys])
        if self.dim is not None:
            out = out[:, :self.dim]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def load(self, path: Path) -> int:
        """Add the embeddings of a cache file (:meth:`save`) to the text cache; how many (0 where
        the file is missing, unreadable or of another size of embedding)."""
        try:
            with np.load(path) as z:
                keys, emb = z["keys"], z["emb"]
        except (OSError, ValueError, KeyError):  # none yet, or cut short: encoded again
            return 0
        if emb.ndim != 2 or emb.shape[1] != self.model.dim or keys.shape != (emb.shape[0], 16):
            return 0
        self.cache.update(zip((k.tobytes() for k in keys), emb))
        self.loaded += len(emb)
        return len(emb)

    def save(self, path: Path) -> Optional[str]:
        """Write the embeddings of this call's texts to ``path`` (a temporary file renamed: never
        half written; texts of earlier calls that this one did not ask for are left out, so the
        file does not grow with every change of the tasks), unless nothing was encoded since it
        was loaded from there, or they take more than
        :data:`CACHE_MAX_BYTES` (a hub retrieval task's corpus can be millions of texts: a run
        directory must not fill a disk unasked). None where the file holds this cache now, else why
        not ('' for an empty cache)."""
        path = Path(path)
        kept = [k for k in self.cache if k in self.used]
        if not kept:
            return ""
        if self.encoded == 0 and path.is_file():
            return None
        size = len(kept) * (16 + 4 * self.model.dim)
        if size > CACHE_MAX_BYTES:
            return f"{size / 2 ** 30:.1f} GiB, over the {CACHE_MAX_BYTES / 2 ** 30:g} GiB cap"
        keys = np.frombuffer(b"".join(kept), dtype=np.uint8).reshape(-1, 16)
        emb = np.stack([self.cache[k] for k in kept]).astype(np.float32, copy=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, emb=emb)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return None

    @property
    def similarity_name(self) -> str:
        """The model's similarity function (its sentence-transformers ``similarity_fn_name``); a cut
        view compares re-normalised embeddings, by cosine."""
        return "cosine" if self.dim is not None else self.model.settings.similarity

    def similarity(self, a: Any, b: Any) -> Any:
        """Scores of every row of ``a`` with every row of ``b``, higher = more similar."""
        return pair_scores(a, b, self.similarity_name, every=True)

    def similarity_pairwise(self, a: Any, b: Any) -> Any:
        return pair_scores(a, b, self.similarity_name, every=False)


def pair_scores(a: Any, b: Any, kind: str, every: bool) -> Any:
    """Similarity of the rows of ``a`` and ``b`` as sentence-transformers computes ``kind`` (cosine,
    dot, negative euclidean or manhattan distance): all pairs (``every``) or row by row."""
    import torch

    a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
    if every:  # a single embedding is one row, as sentence-transformers takes it (mteb 2.10-2.20 pass one query so)
        a, b = torch.atleast_2d(a), torch.atleast_2d(b)
    if kind == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    if kind in ("cosine", "dot"):
        return a @ b.T if every else (a * b).sum(-1)
    p = 2 if kind == "euclidean" else 1
    return -torch.cdist(a, b, p=p) if every else -(a - b).norm(p=p, dim=-1)


def run_mteb(encoder: MtebEncoder, task: Any, kind: str) -> dict[str, float]:
    """Evaluate through ``mteb.evaluate``; hmcl short names first, then every mteb metric."""
    import logging

    import datasets
    import mteb

    logging.getLogger("mteb").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    loaded = kind == "mteb" and load_hub_data(task)
    try:
        result = mteb.evaluate(encoder, task, cache=None, overwrite_strategy="always", show_progress_bar=False,
                               encode_kwargs={"batch_size": encoder.batch_size, "show_progress_bar": False})
    finally:
        if loaded:
            task.unload_data()  # as mteb does with what it loads: one task's data in memory at a time
    (task_result,) = result.task_results
    split = next(iter(task_result.scores))
    scores = task_result.scores[split][0]
    raw = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if kind == "mteb":  # a hub task: hmcl's short names of its type (STS: spearman, ...) as well
        kind = hub_kind(task) or kind
    out = {short: raw[key] for short, key in METRIC_NAMES.get(kind, {}).items() if key in raw}
    out["main_score"] = raw.get("main_score", float("nan"))
    out["mteb"] = raw
    return out
