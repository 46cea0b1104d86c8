"""The sentence-transformers pipeline of a model folder, read so that hmcl encodes a model exactly
as ``SentenceTransformer(folder).encode`` does, or refuses it and says why.

A sentence-transformers folder lists its modules in ``modules.json``: the transformer, a pooling
module, and optionally layers applied to the pooled embedding before the final normalisation.
Many published models have such layers: ``Dense`` projections (LaBSE, the distiluse models,
sentence-t5 and gtr-t5), ``LayerNorm``, ``Dropout``. hmcl loads them as the *head* of the
:class:`~hmcl_cli.modeling.encoder.EmbeddingModel` (trained with the backbone, saved back in the
same format) and supports every single pooling mode sentence-transformers has. Anything it
cannot reproduce (a module it does not know, pooling modes concatenated, a module between the
transformer and the pooling) is a :class:`ModelNotFoundError` naming the folder and the module:
encoding the model without it would give other embeddings than the ones its authors measured.

Python use::

    pipeline = read_pipeline(Path("LaBSE"))      # StPipeline(pooling='cls', head=[DenseLayer], ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hmcl_cli.errors import ModelNotFoundError

# sentence-transformers' pooling config keys -> hmcl's pooling names
POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
    "pooling_mode_lasttoken": "last_token",
}
# sentence-transformers 6's ``pooling_mode`` names -> hmcl's
POOLING_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                 "weightedmean": "weighted_mean", "lasttoken": "last_token"}
# the transformer module's class: Transformer, or one of the per-architecture classes of
# sentence-transformers before 0.3 (their folders hold a transformers model as well)
TRANSFORMER_KINDS = {"Transformer", "BERT", "RoBERTa", "DistilBERT", "XLMRoBERTa", "CamemBERT", "ALBERT",
                     "XLNet", "T5"}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class StPipeline:
    """What ``modules.json`` and the files beside it say about encoding."""

    pooling: Optional[str] = None  # None: the folder has no pooling module (not a sentence-transformers folder)
    include_prompt: bool = True  # False: the pooling leaves the prompt's tokens out
    normalize: bool = False
    head: list = field(default_factory=list)  # layers on the pooled embedding, in order
    max_seq_length: Optional[int] = None
    lowercase: bool = False  # sentence_bert_config.json do_lower_case: texts are lower-cased first
    query_prompt: str = ""
    doc_prompt: str = ""
    similarity: str = "cosine"  # config_sentence_transformers.json similarity_fn_name


SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _refuse(folder: Path, what: str, hint: str = "") -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{folder / 'modules.json'}: {what}; hmcl cannot encode this model as sentence-transformers does",
        hint=hint or "hmcl reads a transformer, one pooling mode, then Dense / LayerNorm / Dropout layers "
        "and Normalize; use a model without this module, or report it")


def read_pipeline(folder: Path) -> StPipeline:
    """The pipeline of a sentence-transformers folder; an empty one (``pooling`` None) for a
    plain transformers folder. Raises ModelNotFoundError for a pipeline hmcl cannot reproduce."""
    out = StPipeline()
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        return out
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[0] not in TRANSFORMER_KINDS:
        raise _refuse(folder, f"the first module is {kinds[0] or 'unnamed'}, not a Transformer")
    # older saves keep the transformer (and its sentence_bert_config.json) in a subfolder: 0_Transformer, 0_BERT
    sbert = _read_json(folder / str(modules[0].get("path") or "") / "sentence_bert_config.json") or \
        _read_json(folder / "sentence_bert_config.json")
    if "max_seq_length" in sbert and sbert["max_seq_length"]:
        out.max_seq_length = int(sbert["max_seq_length"])
    out.lowercase = bool(sbert.get("do_lower_case", False))
    pooled = False
    for m, kind in zip(modules[1:], kinds[1:]):
        path = folder / str(m.get("path", ""))
        if out.normalize:
            raise _refuse(folder, f"module {kind} ({m.get('path')}) comes after Normalize")
        if kind == "Pooling":
            if pooled:
                raise _refuse(folder, "two Pooling modules")
            out.pooling, out.include_prompt = _pooling(folder, path)
            pooled = True
        elif not pooled:
            raise _refuse(folder, f"module {kind} ({m.get('path')}) works on token embeddings, before the pooling")
        elif kind == "Normalize":
            out.normalize = True
        elif kind == "Dense":
            out.head.append(DenseLayer.load(path, folder))
        elif kind == "LayerNorm":
            out.head.append(NormLayer.load(path, folder))
        elif kind == "Dropout":
            out.head.append(DropoutLayer.load(path))
        else:
            raise _refuse(folder, f"module {m.get('type')} ({m.get('path')}) is not supported")
    if not pooled:
        raise _refuse(folder, "no Pooling module")
    st_config = _read_json(folder / "config_sentence_transformers.json")
    prompts = st_config.get("prompts") or {}
    similarity = st_config.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITIES:
        raise _refuse(folder, f"config_sentence_transformers.json: similarity_fn_name {similarity!r} is not one of "
                      f"{', '.join(SIMILARITIES)}")
    out.similarity = similarity
    out.query_prompt = prompts.get("query") or ""
    out.doc_prompt = next((prompts[k] for k in ("document", "passage", "doc") if prompts.get(k)), "")
    return out


def _pooling(folder: Path, path: Path) -> tuple[str, bool]:
    """(pooling, include_prompt) from a Pooling config: sentence-transformers 6's ``pooling_mode``
    (a name or a list of names) or the older ``pooling_mode_*`` flags (none set means mean)."""
    cfg = _read_json(path / "config.json")
    if "pooling_mode" in cfg:
        given = cfg["pooling_mode"]
        names = [given] if isinstance(given, str) else list(given or [])
        unknown = [n for n in names if n not in POOLING_NAMES]
        if unknown:
            raise _refuse(folder, f"{path / 'config.json'}: unknown pooling mode {unknown[0]!r}")
        modes = [POOLING_NAMES[n] for n in names]
    else:
        modes = [name for key, name in POOLING_MODES.items() if cfg.get(key)] or ["mean"]
    if len(modes) != 1:
        raise _refuse(folder, f"{path / 'config.json'} concatenates {len(modes)} pooling modes ({', '.join(modes) or 'none'}); "
                      "hmcl pools with exactly one")
    return modes[0], bool(cfg.get("include_prompt", True))


def _load_weights(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS:
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path / name))
            return torch.load(path / name, map_location="cpu", weights_only=True)
    raise ModelNotFoundError(f"{path}: no weights ({' or '.join(WEIGHTS)}) for this module of {folder}",
                             hint="is the model folder complete?")


def _activation(name: str, folder: Path) -> nn.Module:
    """A torch.nn activation from the dotted class name sentence-transformers saves; only classes
    of torch.nn are built (no code named by a downloaded file is imported)."""
    leaf = name.rsplit(".", 1)[-1]
    cls = getattr(nn, leaf, None) if name.startswith("torch.") else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise _refuse(folder, f"Dense activation {name!r} is not a torch.nn module")
    return cls()


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


class DenseLayer(nn.Module):
    """sentence-transformers' ``Dense``: ``activation(linear(x))`` (+ x, or a projection of x, with
    ``use_residual``). Saved as sentence-transformers saves it, so either library loads it."""

    kind = "Dense"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[nn.Module] = None, use_residual: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.use_residual = in_features, out_features, use_residual
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation if activation is not None else nn.Identity()
        if use_residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.in_features == self.out_features else self.residual(x))
        return out

    @classmethod
    def load(cls, path: Path, folder: Path) -> "DenseLayer":
        cfg = _read_json(path / "config.json")
        if not cfg.get("in_features") or not cfg.get("out_features"):
            raise ModelNotFoundError(f"{path / 'config.json'}: a Dense module without in_features/out_features",
                                     hint="is the model folder complete?")
        for key in ("module_input_name", "module_output_name"):
            if cfg.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
                raise _refuse(folder, f"its Dense module {path.name} maps {key} {cfg[key]!r}, not the sentence embedding")
        layer = cls(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)),
                    _activation(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"), folder),
                    bool(cfg.get("use_residual", False)))
        _fill(layer, _load_weights(path, folder), path)
        return layer

    def save(self, path: Path) -> None:
        cfg = {"in_features": self.in_features, "out_features": self.out_features,
               "bias": self.linear.bias is not None, "activation_function": _qualified(self.activation)}
        if self.use_residual:
            cfg["use_residual"] = True
        _save(self, path, cfg)


class NormLayer(nn.Module):
    """sentence-transformers' ``LayerNorm`` on the pooled embedding."""

    kind = "LayerNorm"

    def __init__(self, dimension: int):
        super().__init__()
        self.dimension = dimension
        self.norm = nn.LayerNorm(dimension)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    @classmethod
    def load(cls, path: Path, folder: Path) -> "NormLayer":
        dim = _read_json(path / "config.json").get("dimension")
        if not dim:
            raise ModelNotFoundError(f"{path / 'config.json'}: a LayerNorm module without its dimension",
                                     hint="is the model folder complete?")
        layer = cls(int(dim))
        _fill(layer, _load_weights(path, folder), path)
        return layer

    def save(self, path: Path) -> None:
        _save(self, path, {"dimension": self.dimension})


class DropoutLayer(nn.Dropout):
    """sentence-transformers' ``Dropout`` on the pooled embedding (active in training only)."""

    kind = "Dropout"

    @classmethod
    def load(cls, path: Path) -> "DropoutLayer":
        return cls(float(_read_json(path / "config.json").get("dropout", 0.2)))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"dropout": self.p}, indent=2))


def _fill(layer: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        layer.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        raise ModelNotFoundError(f"{path}: the weights do not fit the module's config: {e}",
                                 hint="is the model folder complete?") from None


def _save(layer: nn.Module, path: Path, cfg: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}, str(path / "model.safetensors"))


def head_dim(head: Any, hidden: int) -> int:
    """The size of the embedding after the head's layers (``hidden`` without a projection)."""
    for layer in head:
        if isinstance(layer, DenseLayer):
            hidden = layer.out_features
    return hidden


def cut_layer(dim: int, full: int) -> DenseLayer:
    """A Dense layer that keeps the first ``dim`` of ``full`` values (identity rows, no bias, no
    activation): a matryoshka model cut to ``dim`` as a module any sentence-transformers loads."""
    layer = DenseLayer(full, dim, bias=False)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(full)[:dim])
    return layer
