"""``onnx`` / ``onnx-int8`` export: input_ids + attention_mask -> pooled, normalised embedding.

Pooling and normalisation are inside the graph, so the ONNX output equals ``encode()``;
batch and sequence axes are dynamic. The export verifies itself on a padded batch of short,
long and non-English texts before it reports success.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from hmcl_cli.console import log
from hmcl_cli.errors import ExportError, import_optional
from hmcl_cli.export.merged import VERIFY_TEXTS, cut_model, cut_reference, parity
from hmcl_cli.io_utils import atomic_path, file_sha256

ONNX_THRESHOLD = 0.9999


def require_onnx() -> None:
    """Raise ExportError unless onnx and onnxruntime can be imported."""
    for module in ("onnx", "onnxruntime"):
        import_optional(module, need="ONNX export needs", install='pip install "hmcl-cli[onnx]"', error=ExportError)


def refuse_prompt_pooling(model: Any, where: Any) -> None:
    """An ExportError for a model whose pooling leaves out a prompt it uses: the ONNX graph pools
    every token of the ids it is given, so its embeddings would not be the model's."""
    s = model.settings
    prompts = [p for p in (s.query_prompt, s.doc_prompt) if p]
    if not s.include_prompt and prompts:
        raise ExportError(
            f"{where}: its pooling leaves the prompt's tokens out (include_prompt false, prompt {prompts[0]!r}); "
            "the ONNX graph pools every token it is given, so it cannot reproduce that",
            hint="export `merged` (a sentence-transformers folder, which leaves the prompt out as hmcl does), "
            "or train with model.include_prompt true")


def onnx_encode(path: Path, model, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = model.pad(model.tokenize(texts, side="doc"))
    return sess.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]


class OnnxEmbedder:
    """An exported ONNX model with the encode() interface of EmbeddingModel (CPU, onnxruntime).

    Tokenisation, prompts and max lengths come from the torch model it was exported from, so the
    two are compared on identical inputs (evaluation of int8 exports, throughput benchmarks).
    """

    def __init__(self, path: Path, like: Any, threads: Optional[int] = None):
        self.session = cpu_session(path, threads)
        self.like, self.dim, self.settings = like, like.dim, like.settings

    def encode(self, texts: Sequence[str], side: str = "doc", batch_size: int = 128, progress: bool = False,
               description: str = "encode", to_numpy: bool = False) -> Any:
        return run_graph(self.session, self.like, texts, side, batch_size, to_numpy)


def cpu_session(path: Path, threads: Optional[int] = None) -> Any:
    """An onnxruntime session of the graph at ``path`` on the CPU (``threads``: intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(session: Any, preparer: Any, texts: Sequence[str], side: str, batch_size: int, to_numpy: bool) -> Any:
    """Embeddings of ``texts`` from an ONNX ``session``, the texts prepared by ``preparer``'s
    ``tokenize`` and ``pad`` (an EmbeddingModel's), each distinct text once, longest first; one
    string -> one embedding [D]."""
    if isinstance(texts, str):
        return run_graph(session, preparer, [texts], side, batch_size, to_numpy)[0]
    unique = list(dict.fromkeys(texts))
    ids = preparer.tokenize(unique, side)
    order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))
    out: Optional[np.ndarray] = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = preparer.pad([ids[i] for i in idx])
        got = session.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]
        if out is None:
            out = np.zeros((len(unique), got.shape[1]), dtype=np.float32)
        out[idx] = got
    if out is None:
        out = np.zeros((0, 0), dtype=np.float32)
    pos = {t: i for i, t in enumerate(unique)}
    result = out[[pos[t] for t in texts]]
    return result if to_numpy else torch.from_numpy(result)


class OnnxModel:
    """An ONNX export folder that encodes like the model it was exported from, for ``hmcl eval
    --model <folder>``: the fp32 or int8 graph judged on your own tasks beside the torch model.
    Texts are prepared by the export's tokenizer and settings (prompts, lengths, padding) as its
    README does; the graph runs on the CPU with onnxruntime. Segments are torch-only: a model
    trained with them is encoded here as its graph does, one sequence per text."""

    def __init__(self, folder: str | Path, threads: Optional[int] = None):
        from transformers import AutoTokenizer

        from hmcl_cli.modeling.encoder import EmbeddingModel, EncoderSettings

        require_onnx()
        folder = Path(folder)
        (self.file,) = sorted(folder.glob("*.onnx"))[:1]
        saved = json.loads((folder / "hmcl_config.json").read_text())
        known = EncoderSettings.__dataclass_fields__
        self.settings = EncoderSettings(**{k: v for k, v in saved.items() if k in known})
        self.settings.segment_length = 0
        # tokenize() and pad() of an EmbeddingModel without a backbone: the same preparation
        self._texts = EmbeddingModel(None, AutoTokenizer.from_pretrained(str(folder)), self.settings)
        self.session = cpu_session(self.file, threads)
        self.digest = file_sha256(self.file)[:16]
        self.dim = int(self.encode(["a"], to_numpy=True).shape[1])

    def use_segments(self, seg: Any) -> None:
        if seg is not None:
            from hmcl_cli.console import warn

            warn(f"{self.file.parent}: an ONNX graph encodes one sequence per text; model.segments does not apply")

    def weights_digest(self) -> str:
        return self.digest

    def parameters(self):
        return iter(())

    def cache_identity(self) -> str:
        return json.dumps([self.digest, asdict(self.settings), "onnx"], sort_keys=True, default=str)

    def encode(self, texts: Sequence[str], side: str = "doc", batch_size: int = 128, progress: bool = False,
               description: str = "encode", to_numpy: bool = False) -> Any:
        return run_graph(self.session, self._texts, texts, side, batch_size, to_numpy)


def onnx_readme(model: Any, file: str) -> str:
    """The export folder's README.md: what the graph takes and gives, and a snippet (onnxruntime,
    tokenizers and numpy only) that prepares texts as hmcl does (prompt, lower-casing, truncation,
    padding side) for each side, so a deployment gets the trained model's embeddings."""
    s, tok = model.settings, model.tokenizer
    pad_id = model.pad_token_id
    pad_token = tok.pad_token if tok.pad_token is not None else tok.convert_ids_to_tokens(pad_id)
    text = "(PROMPTS[side] + t).lower()" if s.lowercase else "PROMPTS[side] + t"
    compare = ("cosine similarity: the embeddings are L2-normalised" if s.normalize and s.similarity == "cosine"
               else f"the model compares embeddings by {s.similarity}" if s.similarity != "cosine"
               else "cosine similarity needs the embeddings L2-normalised first")
    lines = [
        f"# ONNX export ({file})", "",
        "Inputs `input_ids` and `attention_mask` (int64, batch x sequence); output `sentence_embedding` "
        f"(float32, batch x {model.dim}), pooled{' and L2-normalised' if s.normalize else ''} inside the graph.",
        "Texts must be prepared as the model was trained: the side's instruction before the text, "
        f"at most the side's token count, padded on the {s.padding_side}"
        + (", with the end-of-text token that tokenizer.json appends" if s.append_eos else "") + ":", "",
        "```python", "import numpy as np", "import onnxruntime as ort", "from tokenizers import Tokenizer", "",
        'FOLDER = "PATH"  # this folder',
        f'session = ort.InferenceSession(f"{{FOLDER}}/{file}")',
        'tokenizer = Tokenizer.from_file(f"{FOLDER}/tokenizer.json")',
        f"tokenizer.enable_padding(direction={s.padding_side!r}, pad_id={pad_id}, pad_token={pad_token!r})",
        f"PROMPTS = {{'query': {s.query_prompt!r}, 'document': {s.doc_prompt!r}}}",
        f"MAX_TOKENS = {{'query': {s.query_max_length}, 'document': {s.doc_max_length}}}", "", "",
        'def embed(texts, side="document"):',
        f"    tokenizer.enable_truncation(MAX_TOKENS[side], direction={getattr(tok, 'truncation_side', 'right')!r})",
        f"    batch = tokenizer.encode_batch([{text} for t in texts])",
        "    ids = np.array([e.ids for e in batch], dtype=np.int64)",
        "    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)",
        '    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]', "", "",
        'queries = embed(["How long does a refund take?"], "query")',
        'documents = embed(["Refunds reach your card within five days."])',
        f"print(queries @ documents.T)  # {compare}", "```", "",
    ]
    lines += ["To score this graph on your own tasks beside the torch model: `hmcl eval --model torch=<model folder> "
              "--model onnx=<this folder> --retrieval dev=<file>` (any task flag)"
              + (" — int8 weights (dynamic quantization of the matrix products) move scores a little." if "int8" in file
                 else "."), ""]
    if s.segment_length:
        lines += [f"The trained model encodes long texts as segments; the graph encodes one sequence, so texts "
                  f"past {s.doc_max_length} tokens are cut.", ""]
    return "\n".join(lines)


def export_onnx(model_dir: Path, out: Path, quantize: bool = False, extra_texts: Optional[list[str]] = None,
                opset: int = 17, dev_examples: Optional[list] = None, dim: Optional[int] = None) -> dict:
    """Export ``model_dir`` as an ONNX graph (int8 with ``quantize``) in the folder ``out`` and verify
    it against the torch model; with ``dim`` the graph outputs the embeddings cut to their first
    ``dim`` values, checked against the torch embeddings cut alike."""
    from hmcl_cli.modeling.encoder import EmbeddingModel, tokenizer_with_eos

    require_onnx()
    # traced on the CPU: RMSNorm and rotary embeddings as the model's own code writes them (the
    # graph as before; operation counts are no concern there)
    model = EmbeddingModel.load(str(model_dir), attn_implementation="eager", fused_norms=False, fused_rotary=False,
                                fused_projections=False)
    model.eval()
    refuse_prompt_pooling(model, model_dir)
    if model.segments is not None:
        from hmcl_cli.console import warn

        warn(f"{model_dir} encodes long texts as segments; segmentation is torch-only: the ONNX graph "
             f"encodes one sequence (texts are truncated to {model.settings.doc_max_length} tokens)")
        model.settings.segment_length = 0  # verify the graph against the plain encoding it implements
    texts = VERIFY_TEXTS + list(extra_texts or [])
    reference = cut_reference(model.encode(texts, side="doc").numpy(), dim, model.settings.normalize)
    cut_model(model, dim, model_dir)
    sample = model.pad(model.tokenize(texts[:2], side="doc"))
    with atomic_path(out, is_dir=True) as tmp:
        path = tmp / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (sample["input_ids"], sample["attention_mask"]), str(path),
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              "sentence_embedding": {0: "batch"}},
                opset_version=opset, dynamo=False)
        final = path
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            final = tmp / "model_int8.onnx"
            with _without_preprocessing_advice():
                quantize_dynamic(str(path), str(final), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul"])
            path.unlink()
        (tokenizer_with_eos(model.tokenizer) if model.settings.append_eos else model.tokenizer).save_pretrained(tmp)
        settings = {**asdict(model.settings), "append_eos": False}  # the saved tokenizer appends EOS itself
        (tmp / "hmcl_config.json").write_text(json.dumps(settings, indent=2))
        if (tmp / "tokenizer.json").is_file():
            (tmp / "README.md").write_text(onnx_readme(model, final.name), encoding="utf-8")
        got = onnx_encode(final, model, texts)
        report = parity(reference, got)
        report["file"] = final.name
        if dim:
            report["dim"] = dim
        if not quantize and report["mean_cosine"] < ONNX_THRESHOLD:
            raise ExportError(f"ONNX export does not match the trained model: mean cosine {report['mean_cosine']:.6f} "
                              f"< {ONNX_THRESHOLD}", hint="try --set export.opset=18, and please report it")
        if quantize and dev_examples:
            report["dev"] = _dev_delta(model, OnnxEmbedder(final, model), dev_examples)
        (tmp / "hmcl_export.json").write_text(json.dumps({"format": "onnx-int8" if quantize else "onnx", **report}, indent=2))
    log(f"export {'onnx-int8' if quantize else 'onnx'} -> {out}{f' (cut to {dim} dimensions)' if dim else ''}: "
        f"mean cosine vs torch {report['mean_cosine']:.6f} "
        f"(min {report['min_cosine']:.6f})")
    if "dev" in report:
        d = report["dev"]
        log(f"export onnx-int8 on {d['examples']} dev examples: " + ", ".join(
            f"{k} {d['torch'][k]:.4f} -> {d['int8'][k]:.4f} ({d['delta'][k]:+.4f})" for k in d["delta"]))
    return report


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_advice():
    """onnxruntime's quantizer logs (root logger) advice to run its pre-processing first. On
    all-MiniLM-L6-v2 trained by the quickstart that pre-processing (``quant_pre_process``,
    ``auto_merge``) moved the int8 model's mean cosine to torch from 0.99460 to 0.99471 on 500
    texts: not worth another pass, and the advice is noise in the export's output."""
    root, advice = logging.getLogger(), _PreprocessingAdvice()
    root.addFilter(advice)  # it logs on the root logger itself, whose filters see its records first
    try:
        yield
    finally:
        root.removeFilter(advice)


def _dev_delta(model: Any, quantized: OnnxEmbedder, examples: list, limit: int = 1000) -> dict:
    """The in-loop dev metrics of the torch model and of the int8 ONNX model, and their difference
    (on at most ``limit`` dev examples, drawn at random over all of them)."""
    from hmcl_cli.data.example import spread_sample
    from hmcl_cli.evaluation.graded import evaluate_graded

    examples = spread_sample(examples, limit)
    ref = evaluate_graded(model, examples)
    got = evaluate_graded(quantized, examples)
    keys = [k for k in ("ndcg@10", "map", "spearman") if k in ref and not np.isnan(ref[k])]
    return {"examples": len(examples), "torch": {k: ref[k] for k in keys}, "int8": {k: got[k] for k in keys},
            "delta": {k: got[k] - ref[k] for k in keys}}
