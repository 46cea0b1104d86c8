"""The embedding model: a transformers backbone + pooling + L2 normalisation + prompts.

Works for encoders (BERT, RoBERTa, XLM-R, MiniLM: mean or CLS pooling) and decoders (Qwen2/3,
Llama, Mistral: last-token pooling, left or right padding, EOS appended where the tokenizer
does not add it). Saves and loads sentence-transformers folders, so
``SentenceTransformer(path)`` loads what hmcl trains.

Python use::

    from hmcl_cli.modeling.encoder import EmbeddingModel
    model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
    emb = model.encode(["a query"], side="query")      # torch.FloatTensor [1, 384], unit norm
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import shutil
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from hmcl_cli.console import ProgressBar, warn
from hmcl_cli.errors import ModelNotFoundError, RecipeError
from hmcl_cli.modeling import encode_graphs, unpad
from hmcl_cli.modeling.fused_norms import FusionReport, fuse_rms_norms, unfuse_rms_norms
from hmcl_cli.modeling.fused_projections import ProjectionReport, fuse_projections, unfuse_projections
from hmcl_cli.modeling.fused_rotary import RotaryReport, fuse_rotary, unfuse_rotary
from hmcl_cli.modeling.graph_shapes import graph_width
from hmcl_cli.modeling.masks import prepared_mask, prepared_mask_refusal, token_states
from hmcl_cli.modeling.resolve import resolve_model, transformer_folder
from hmcl_cli.modeling.tokenizing import TokenLists, token_ids

DECODER_TYPES = {"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "gemma",
                 "gemma2", "gemma3", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "falcon",
                 "olmo", "olmo2", "stablelm", "starcoder2", "internlm2", "deepseek_v2", "glm"}
HMCL_CONFIG = "hmcl_config.json"


@dataclass
class EncoderSettings:
    """How texts become embeddings; saved as hmcl_config.json beside the weights."""

    pooling: str = "mean"
    normalize: bool = True
    query_max_length: int = 128
    doc_max_length: int = 128
    query_prompt: str = ""
    doc_prompt: str = ""
    padding_side: str = "right"
    append_eos: bool = False
    is_decoder: bool = False
    base_model: str = ""
    segment_length: int = 0  # > 0: long texts are encoded as segments (modeling/segments.py)
    segment_overlap: int = 0
    segment_pooling: str = "weighted"
    matryoshka_dims: list = field(default_factory=list)  # sizes it was trained to be cut to (loss.matryoshka_dims)
    lowercase: bool = False  # texts lower-cased before tokenising (sentence-transformers' do_lower_case)
    similarity: str = "cosine"  # how embeddings compare (sentence-transformers' similarity_fn_name): cosine, dot, ...
    include_prompt: bool = True  # False: the pooling leaves the prompt's tokens out (sentence-transformers' Pooling)


def saved_config(folder: str | Path) -> dict:
    """The hmcl_config.json of an hmcl model folder (or a run directory's model), read without
    loading the model; {} for anything else."""
    folder = Path(folder)
    for candidate in (folder / HMCL_CONFIG, folder / "model" / HMCL_CONFIG):
        if candidate.is_file():
            saved = _read_json(candidate)
            return saved if isinstance(saved, dict) else {}
    return {}


def saved_matryoshka_dims(folder: str | Path) -> list[int]:
    """The matryoshka sizes an hmcl model folder (or run directory) was trained for (its
    hmcl_config.json); [] for anything else."""
    return [int(d) for d in saved_config(folder).get("matryoshka_dims", [])]


def position_limit(model: nn.Module) -> Optional[int]:
    """The longest sequence a model's learned absolute position table can encode (BERT, RoBERTa,
    XLM-R: 512), or None for relative or rotary positions (T5, Qwen, Llama, ModernBERT), which
    take any length (quality aside)."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            # RoBERTa-style tables count positions from padding_idx + 1
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None


_WARNED: set = set()


def warn_once(key: Any, message: str) -> None:
    """``warn(message)`` the first time ``key`` is seen in this process (stages load a model again)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warn(message)


def check_max_lengths(limit: Optional[int], query_len: int, doc_len: int, segment_length: int, name: str,
                      keys: tuple[str, str] = ("model.query_max_length", "model.doc_max_length")) -> None:
    """A RecipeError when a sequence of the lengths asked (each segment's, with segments) is longer
    than the model's position table (``limit``, see :func:`position_limit`): the forward pass
    would fail on the first long text (on a GPU as a device-side assert). ``keys``: the recipe keys
    the query and document lengths came from (``model.max_length`` where a side has none of its own)."""
    if limit is None:
        return
    if segment_length:
        asked = {"model.segments.length": segment_length}
    elif query_len == doc_len:
        asked = {"model.max_length": query_len}
    else:
        asked = {keys[0]: query_len, keys[1]: doc_len}
    over = {k: v for k, v in asked.items() if v > limit}
    if over:
        key, value = next(iter(over.items()))
        raise RecipeError(
            f"{key} {value}: {name} encodes at most {limit} tokens per sequence (its position embeddings)",
            hint=f"set {key} to {limit} or less" + ("" if segment_length else
                                                     f", or encode longer texts as segments: model.segments: {{length: {limit}}}"))


def is_decoder_config(config: Any) -> bool:
    if getattr(config, "model_type", "") in DECODER_TYPES:
        return True
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_texts(texts: Sequence[str], side: str) -> None:
    """A clear error for input the tokenizer would reject with its own words, or read wrongly
    (one string read as a list of characters)."""
    if side not in ("query", "doc"):
        raise ValueError(f"side must be 'query' or 'doc', not {side!r}")
    if isinstance(texts, str):
        raise TypeError("texts: give a list of strings (one string would be read as its characters)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not a string: {text!r:.60}")


class EmbeddingModel(nn.Module):
    """Backbone + pooling + head + normalisation. ``forward(input_ids, attention_mask) -> [B, D]``.

    ``head``: the layers a sentence-transformers folder applies to the pooled embedding (Dense,
    LayerNorm, Dropout; see modeling/st_modules.py), trained with the backbone and saved back."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: EncoderSettings,
                 head: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.ModuleList(head or [])
        self._prompt_skips: dict[str, int] = {}  # prompt -> its length as the pooling skips it (prompt_skip)
        self.tokenizer = tokenizer
        self.settings = settings
        tokenizer.padding_side = settings.padding_side
        self._prepared_masks: tuple[int, str] = (0, "")  # (id of the backbone probed, why not: '' = it may)
        self.cudnn_attention = False  # model.cudnn_attention: SDPA's cuDNN kernels allowed (a run-time choice)
        self.unpad: bool | str = "auto"  # model.unpad: forward passes on the real tokens only (modeling/unpad.py)
        self._unpadded: tuple[int, str] = (0, "")  # (id of the backbone probed, why not: '' = it may)
        self.encode_graphs: bool | str = "auto"  # model.encode_graphs: encode replaying CUDA graphs (modeling/encode_graphs.py)
        self._graphs_broken = ""  # why graphs were turned off after a capture or its check failed ('' = not)
        self.norm_fusion = FusionReport()  # model.fused_norms: what fuse_rms_norms did (modeling/fused_norms.py)
        self.rotary_fusion = RotaryReport()  # model.fused_rotary: what fuse_rotary did (modeling/fused_rotary.py)
        self.projection_fusion = ProjectionReport()  # model.fused_projections (modeling/fused_projections.py)

    @property
    def segments(self) -> Any:
        """SegmentSettings when long texts are encoded as segments, else None."""
        if not self.settings.segment_length:
            return None
        from hmcl_cli.modeling.segments import SegmentSettings

        s = self.settings
        return SegmentSettings(s.segment_length, s.segment_overlap, s.segment_pooling)

    def use_segments(self, seg: Any) -> None:
        """Encode long texts as segments as ``seg`` (model.segments of a recipe) says; None: keep."""
        if seg is not None:
            self.settings.segment_length, self.settings.segment_overlap = seg.length, seg.overlap
            self.settings.segment_pooling = seg.pooling

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: Optional[str] = None,
        base_dir: Optional[Path] = None,
        pooling: str = "auto",
        normalize: Optional[bool] = None,
        max_length: Optional[int] = None,
        query_max_length: Optional[int] = None,
        doc_max_length: Optional[int] = None,
        query_prompt: Optional[str] = None,
        doc_prompt: Optional[str] = None,
        padding_side: str = "auto",
        append_eos: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: Optional[str] = "sdpa",
        dtype: Optional[torch.dtype] = None,
        check_lengths: bool = True,
        include_prompt: Optional[bool] = None,
        fused_norms: bool = True,
        fused_rotary: bool = True,
        fused_projections: bool | str = "auto",
    ) -> "EmbeddingModel":
        """Load from a local folder, hub id or offline package (see ``resolve_model``).
        ``check_lengths``: refuse max lengths beyond the position table (see :meth:`check_lengths`).
        ``fused_norms``: RMSNorm layers through F.rms_norm (modeling/fused_norms.py).
        ``fused_rotary``: queries and keys rotated together (modeling/fused_rotary.py).
        ``fused_projections``: sibling projections as one product while training full weights,
        ``auto`` on a GPU, ``True`` on every device (modeling/fused_projections.py)."""
        from transformers import AutoConfig, AutoTokenizer

        from hmcl_cli.modeling.st_modules import read_pipeline

        root = resolve_model(name_or_path, revision, base_dir)
        saved = _read_json(root / HMCL_CONFIG)
        st = read_pipeline(root)
        folder = transformer_folder(root)  # the transformers files (a subfolder in older sentence-transformers saves)
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            raise ModelNotFoundError(
                f"{folder} could not be loaded as a transformers model: {type(e).__name__}: {e}",
                hint="the folder needs config.json, tokenizer files and weights; models with custom "
                "code need model.trust_remote_code: true",
            ) from None
        decoder = bool(saved.get("is_decoder", is_decoder_config(config)))
        model_class = backbone_class(config, folder)
        heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
        if heads and st.pooling is None and not saved:
            warn_once((folder, "classifier"),
                      f"{name_or_path} is a {heads[0]} (a cross-encoder or classifier): its classification head is "
                      "left out and its token states were not trained as embeddings; an embedding model is the usual "
                      "start (a cross-encoder fits mine.teacher)")
        kwargs: dict = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        backbone, last_error = None, None
        for attn in dict.fromkeys([attn_implementation, None]):  # preferred kernel, then the default
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    extra = {"attn_implementation": attn} if attn else {}
                    backbone = model_class.from_pretrained(folder, config=config, **kwargs, **extra)
                break
            except (ValueError, ImportError) as e:  # kernel not supported by this architecture
                last_error = e
            except Exception as e:  # noqa: BLE001
                raise ModelNotFoundError(
                    f"{folder}: weights could not be loaded: {type(e).__name__}: {e}",
                    hint="is the folder a complete model (safetensors/bin weights present)?",
                ) from None
        if backbone is None:
            raise ModelNotFoundError(f"{folder}: could not build the model: {last_error}")
        if attn_implementation and last_error is not None:  # the kernel asked for could not be had
            used = getattr(backbone.config, "_attn_implementation", None) or "its default"
            said = str(last_error).splitlines()[0] if str(last_error) else type(last_error).__name__
            warn_once((folder, attn_implementation),
                      f"model.attn_implementation {attn_implementation}: not available for {name_or_path} here "
                      f"({said[:200]}); it runs with {used} attention")

        default_pool = "last_token" if decoder else "mean"
        own = saved.get("pooling", st.pooling)  # the pooling the model was trained with, if its folder says
        pool = pooling if pooling != "auto" else own or default_pool
        if own and pool != own:
            warn_once((folder, pool),
                      f"model.pooling {pool}: {name_or_path} was trained with {own} pooling (its "
                      f"{'hmcl_config.json' if 'pooling' in saved else '1_Pooling/config.json'}); its embeddings "
                      "change (the base model's scores too) until training adapts it; `auto` keeps its own")
        base_len = max_length or st.max_seq_length or 128
        settings = EncoderSettings(
            pooling=pool,
            normalize=normalize if normalize is not None else saved.get("normalize", st.normalize if st.pooling else True),
            query_max_length=query_max_length or (saved.get("query_max_length") if max_length is None else None) or base_len,
            doc_max_length=doc_max_length or (saved.get("doc_max_length") if max_length is None else None) or base_len,
            query_prompt=query_prompt if query_prompt else saved.get("query_prompt", st.query_prompt),
            doc_prompt=doc_prompt if doc_prompt else saved.get("doc_prompt", st.doc_prompt),
            # left only for decoders: an encoder's absolute positions would move with the padding
            padding_side=padding_side if padding_side != "auto" else ("left" if pool == "last_token" and decoder else "right"),
            is_decoder=decoder,
            base_model=saved.get("base_model") or name_or_path,
            segment_length=int(saved.get("segment_length", 0)),
            segment_overlap=int(saved.get("segment_overlap", 0)),
            segment_pooling=saved.get("segment_pooling", "weighted"),
            matryoshka_dims=[int(d) for d in saved.get("matryoshka_dims", [])],
            lowercase=st.lowercase,
            similarity=saved.get("similarity", st.similarity),
            include_prompt=include_prompt if include_prompt is not None else bool(saved.get("include_prompt", st.include_prompt)),
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        settings.append_eos = resolve_append_eos(append_eos, pool, tokenizer)
        model = cls(backbone, tokenizer, settings, st.head)  # the head stays float32 (it trains; it is small)
        model.set_fused_norms(fused_norms)
        model.set_fused_rotary(fused_rotary)
        model.set_fused_projections(fused_projections)
        if check_lengths:
            model.check_lengths(str(name_or_path))
        return model

    @classmethod
    def from_recipe(cls, model_cfg: Any, base_dir: Optional[Path] = None, name_or_path: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> "EmbeddingModel":
        if model_cfg.trust_remote_code:
            warn("model.trust_remote_code is on: code from the model repository will run")
        model = cls.load(
            name_or_path or model_cfg.name_or_path, revision=model_cfg.revision, base_dir=base_dir,
            pooling=model_cfg.pooling, normalize=model_cfg.normalize, max_length=model_cfg.max_length,
            query_max_length=model_cfg.query_max_length, doc_max_length=model_cfg.doc_max_length,
            query_prompt=model_cfg.query_prompt or None, doc_prompt=model_cfg.doc_prompt or None,
            padding_side=model_cfg.padding_side, append_eos=model_cfg.append_eos,
            trust_remote_code=model_cfg.trust_remote_code, attn_implementation=model_cfg.attn_implementation,
            dtype=dtype, check_lengths=False,  # checked with the recipe's segments, which load() does not know
            include_prompt=None if model_cfg.include_prompt == "auto" else model_cfg.include_prompt,
        )
        model.apply_run_settings(model_cfg)
        return model

    def apply_run_settings(self, model_cfg: Any) -> None:
        """The recipe's run-time choices that live outside the weights: segments, cuDNN
        attention, unpadding (``from_recipe`` applies them; a model built elsewhere gets them here)."""
        self.use_segments(model_cfg.segments)
        self.check_lengths(model_cfg.name_or_path)
        self.cudnn_attention = model_cfg.cudnn_attention
        self.unpad = model_cfg.unpad
        self.encode_graphs = model_cfg.encode_graphs
        self.set_fused_norms(model_cfg.fused_norms)
        self.set_fused_rotary(model_cfg.fused_rotary)
        self.set_fused_projections(model_cfg.fused_projections)

    def set_fused_norms(self, on: bool) -> None:
        """RMSNorm layers through F.rms_norm (``model.fused_norms``; modeling/fused_norms.py), or
        their classes' own forward again; what was done is kept in ``norm_fusion``."""
        if on:
            self.norm_fusion = fuse_rms_norms(self.backbone)
        else:
            unfuse_rms_norms(self.backbone)
            self.norm_fusion = FusionReport()

    def set_fused_rotary(self, on: bool) -> None:
        """Queries and keys rotated together (``model.fused_rotary``; modeling/fused_rotary.py), or
        the model family's own rotary function again; what was done is kept in ``rotary_fusion``."""
        if on:
            self.rotary_fusion = fuse_rotary(self.backbone)
        else:
            unfuse_rotary(self.backbone)
            self.rotary_fusion = RotaryReport()

    def set_fused_projections(self, on: bool | str) -> None:
        """Sibling projections of one input as one product while training full weights
        (``model.fused_projections``; modeling/fused_projections.py): ``auto`` for inputs on a GPU,
        ``True`` on every device; ``False``: one product per module again. What was done is kept
        in ``projection_fusion``."""
        if on:
            self.projection_fusion = fuse_projections(self.backbone, setting=on)
        else:
            unfuse_projections(self.backbone)
            self.projection_fusion = ProjectionReport()

    def position_limit(self) -> Optional[int]:
        """The longest sequence the backbone can encode: see :func:`position_limit`."""
        return position_limit(self.backbone)

    def check_lengths(self, name: str) -> None:
        """A RecipeError when a sequence the settings allow is longer than the position table: see
        :func:`check_max_lengths`."""
        s = self.settings
        check_max_lengths(self.position_limit(), s.query_max_length, s.doc_max_length, s.segment_length, name)

    # ---------------------------------------------------------------- tokenising
    def tokenize(self, texts: Sequence[str], side: str = "doc") -> list[list[int]]:
        """Token ids (prompt included, truncated, EOS appended if configured); no padding."""
        _check_texts(texts, side)
        return self._token_ids(texts, side)

    def _token_ids(self, texts: Sequence[str], side: str) -> list[list[int]]:
        """:meth:`tokenize` of texts already checked (encode checks its input once)."""
        s = self.settings
        prompt = s.query_prompt if side == "query" else s.doc_prompt
        max_len = s.query_max_length if side == "query" else s.doc_max_length
        if prompt:
            texts = [prompt + t for t in texts]
        if s.lowercase:
            texts = [t.lower() for t in texts]
        eos = self.tokenizer.eos_token_id
        limit = max_len - 1 if s.append_eos else max_len
        ids = token_ids(self.tokenizer, texts, limit)
        if s.append_eos and eos is not None:
            ids = [x if (x and x[-1] == eos) else x + [eos] for x in ids]
        return ids

    def prompt_skip(self, side: str = "doc", prompt: Optional[str] = None) -> int:
        """Leading tokens the pooling leaves out of a text encoded on ``side`` (with ``prompt``
        instead of the side's own, if given): with ``include_prompt`` false, the prompt's tokens as
        sentence-transformers counts them (the prompt tokenised alone, less a special token at its
        end: [CLS] and the prompt for BERT); else 0."""
        s = self.settings
        prompt = prompt if prompt is not None else (s.query_prompt if side == "query" else s.doc_prompt)
        if s.include_prompt or not prompt:
            return 0
        if prompt not in self._prompt_skips:
            ids = self.tokenizer(prompt.lower() if s.lowercase else prompt)["input_ids"]
            self._prompt_skips[prompt] = len(ids) - (1 if ids and ids[-1] in set(self.tokenizer.all_special_ids) else 0)
        return self._prompt_skips[prompt]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def widen(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded batch padded further to ``width`` tokens, on the padding side (on the device)."""
        gap = width - input_ids.size(1)
        if gap <= 0:
            return input_ids, attention_mask
        where = (gap, 0) if self.settings.padding_side == "left" else (0, gap)
        return (torch.nn.functional.pad(input_ids, where, value=self.pad_token_id),
                torch.nn.functional.pad(attention_mask, where, value=0))

    def pad(self, batch: Sequence[Sequence[int]], multiple_of: int = 8, pool_skip: Any = 0) -> dict[str, torch.Tensor]:
        """Pad a list of token-id lists to the longest (rounded up to ``multiple_of``). ``pool_skip``
        (a count, or one per row): leading tokens the pooling leaves out, as ``pool_skip`` in the
        batch when any is not 0."""
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        longest = int(lengths.max())
        width = -(-longest // multiple_of) * multiple_of if multiple_of else longest
        pad_id = self.pad_token_id
        positions = np.arange(width)[None, :]
        if self.settings.padding_side == "left":
            filled = positions >= (width - lengths)[:, None]
        else:
            filled = positions < lengths[:, None]
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        if batch and all(isinstance(row, np.ndarray) for row in batch):  # views of a TokenLists
            ids[filled] = np.concatenate(batch)
        else:
            ids[filled] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(filled.astype(np.int64))}
        skips = np.broadcast_to(np.asarray(pool_skip, dtype=np.int64), (len(batch),))
        if skips.any():
            out["pool_skip"] = torch.from_numpy(skips.copy())
        return out

    # ---------------------------------------------------------------- forward
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_real: Optional[int] = None,
               pool_skip: Optional[torch.Tensor] = None, padded: bool = False) -> torch.Tensor:
        """Pooled token states through the head's layers, before normalisation (segments are
        averaged at this stage).
        ``n_real``: the batch's real tokens where the caller knows them without asking the device;
        with it the backbone may run unpadded (``model.unpad``; on a CPU hmcl counts them itself).
        ``pool_skip``: per row, leading real tokens the pooling leaves out (the prompt's, with
        ``include_prompt`` false; :meth:`prompt_skip`). ``padded``: run the batch as it is
        (a CUDA graph's fixed shapes), whatever ``model.unpad`` says."""
        packed = None if padded else self.packed_tokens(attention_mask, n_real)
        with self.attention_backends():
            if packed is not None:
                hidden = unpad.unpadded_states(self.backbone, input_ids, attention_mask, packed, self.settings.is_decoder)
            else:
                hidden = token_states(self.backbone, input_ids=input_ids, attention_mask=self.backbone_mask(attention_mask))
        emb = pool(hidden, attention_mask, self.settings.pooling, pooled_mask(attention_mask, pool_skip))
        if len(self.head):
            emb = emb.float()  # the head's weights are float32 (under autocast its matmuls run in bf16)
            for layer in self.head:
                emb = layer(emb)
        return emb

    def packed_tokens(self, attention_mask: torch.Tensor, n_real: Optional[int]) -> Optional[int]:
        """The real-token count to run this batch unpadded with, or None to run it padded: never
        with ``unpad: false``, nor without padding, nor where :meth:`unpad_refusal` says why not;
        under ``auto`` on a GPU only where the flash variable-length kernel takes the attention."""
        if self.unpad is False:
            return None
        if n_real is None:
            if attention_mask.device.type != "cpu":
                return None  # counting on the device would make the host wait for it
            n_real = int(attention_mask.numpy().sum())  # a host tensor: numpy counts it without a tensor op
        if n_real >= attention_mask.numel():
            return None
        device_type = attention_mask.device.type
        if self.unpad == "auto" and device_type != "cpu" and not self._varlen_attention(device_type=device_type):
            return None
        return None if self.unpad_refusal() else n_real

    def _varlen_attention(self, device_type: str, training: Optional[bool] = None) -> bool:
        """Whether packed attention on ``device_type`` would take the flash variable-length kernel
        now (in ``training`` mode if given) rather than padded SDPA: :func:`unpad.expects_varlen`."""
        return unpad.expects_varlen(self.backbone, device_type, training)

    def unpad_summary(self, device_type: str, precision: str = "auto") -> str:
        """How training runs its forward calls, padded or not and why (the start of ``hmcl train``)."""
        if self.unpad is False:
            return "forward calls padded (model.unpad false)"
        refusal = self.unpad_refusal()
        if refusal:
            return f"forward calls padded ({refusal})"
        if device_type == "cpu":
            return "forward calls unpadded: real tokens only, attention computed padded per text (model.unpad)"
        if self.trains_with_varlen(device_type, precision):
            return "forward calls unpadded: real tokens only, flash variable-length attention (model.unpad)"
        if self.unpad == "auto":
            return ("forward calls padded (model.unpad auto: the flash variable-length kernel cannot take this "
                    "attention: it needs an Ampere or later GPU, bf16/fp16, torch >= 2.10 and no attention "
                    "dropout; `true` unpads the rest)")
        return "forward calls unpadded: real tokens only, attention computed padded per text (model.unpad true)"

    def trains_with_varlen(self, device_type: str, precision: str = "auto") -> bool:
        """Whether training steps run unpadded with the flash variable-length kernel: no padding is
        computed at all, so joining both sides in one forward call costs nothing."""
        if device_type == "cpu" or self.unpad is False or self.unpad_refusal():
            return False
        with autocast_for(torch.device(device_type), precision):
            return self._varlen_attention(device_type=device_type, training=True)

    def unpad_refusal(self) -> str:
        """Why the backbone runs padded batches as they are ('' when it may run them unpadded):
        decided once per backbone (modeling/unpad.py), after the attention-mask probe."""
        self.mask_refusal()  # its probe first: the unpadded one runs padded calls with that mask
        return self._once_per_backbone("_unpadded", unpad.unpad_refusal)

    def _once_per_backbone(self, slot: str, probe: Any) -> str:
        """``probe(self)`` (a refusal: '' = no objection), asked once per backbone (a replaced
        backbone, e.g. wrapped by LoRA or FSDP, is probed again) and kept in ``slot``."""
        probed, reason = getattr(self, slot)
        if probed != id(self.backbone):
            reason = probe(self)
            setattr(self, slot, (id(self.backbone), reason))
        return reason

    def attention_backends(self) -> Any:
        """A context in which SDPA takes no cuDNN attention kernel unless ``model.cudnn_attention``
        allows it (cuDNN plans each new shape on the host; hmcl's shapes change every batch). The
        trainer holds it over the backward pass too, where checkpointed layers run again."""
        return contextlib.nullcontext() if self.cudnn_attention else without_cudnn_attention()

    def check_masks(self) -> bool:
        """Whether the backbone gets a prepared 4D mask (modeling/masks.py): decided once per
        backbone, on first use or here (the trainer asks before compiling the layers)."""
        return not self.mask_refusal()

    def mask_refusal(self) -> str:
        """Why the backbone keeps the 2D padding mask ('' when it gets the prepared 4D mask)."""
        return self._once_per_backbone("_prepared_masks", prepared_mask_refusal)

    def backbone_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask the backbone gets: the 4D mask transformers would build, where it accepts it
        (no host synchronisation in its forward), else the 2D padding mask itself."""
        if not self.check_masks():
            return attention_mask
        return prepared_mask(attention_mask, self.settings.is_decoder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_real: Optional[int] = None,
                pool_skip: Optional[torch.Tensor] = None, padded: bool = False) -> torch.Tensor:
        emb = self.pooled(input_ids, attention_mask, n_real, pool_skip, padded)
        if self.settings.normalize:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb

    def describe(self) -> str:
        """How a text becomes its embedding, in a line: pooling, the head's layers, size, normalisation."""
        skip = "" if self.settings.include_prompt else " (prompt tokens left out)"
        steps = [f"{self.settings.pooling} pooling{skip} of {int(self.backbone.config.hidden_size)} dimensions"]
        for layer in self.head:
            if getattr(layer, "kind", "") == "Dense":
                act = type(layer.activation).__name__
                steps.append(f"Dense {layer.in_features}->{layer.out_features}"
                             f"{'' if act == 'Identity' else f' ({act})'}{' + residual' if layer.use_residual else ''}")
            else:
                steps.append(getattr(layer, "kind", type(layer).__name__))
        if self.settings.normalize:
            steps.append("L2-normalised")
        return " -> ".join(steps) + (f" ({self.dim} dimensions)" if len(self.head) else "")

    @torch.no_grad()
    def weights_digest(self) -> str:
        """A short content hash of the weights, the head's layers included: a strided sample of
        every tensor, and each floating tensor's sum and norm over all its values, so that a change
        the sample skips still changes it (unless below float32's rounding of the whole). mteb's
        revision of the model, and part of the mining and eval caches' key."""
        h = hashlib.sha256()
        for name, p in self.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
            if flat.is_floating_point() and flat.numel():  # reductions on the device, no copy of the tensor
                whole = torch.stack([flat.sum(dtype=torch.float32), torch.linalg.vector_norm(flat, dtype=torch.float32)])
                h.update(whole.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def cache_identity(self) -> str:
        """What a cache of this model's embeddings is keyed by (mining's corpus, eval's texts):
        its weights (:meth:`weights_digest`), every encoding setting (prompts, lengths, pooling,
        segments...) and the device type (a GPU encodes under bf16 autocast, a CPU in float32)."""
        return json.dumps([self.weights_digest(), asdict(self.settings), self.device.type], sort_keys=True, default=str)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dim(self) -> int:
        """The embedding's size: the backbone's hidden size, or the head's last projection."""
        from hmcl_cli.modeling.st_modules import head_dim

        return head_dim(self.head, int(self.backbone.config.hidden_size))

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        side: str = "doc",
        batch_size: int = 128,
        progress: bool = False,
        description: str = "encode",
        to_numpy: bool = False,
    ) -> Any:
        """Embed texts; each distinct text once, longest first, bf16 autocast on GPU. With
        ``self.segments`` set, long texts are encoded as segments (see modeling/segments.py).

        ``texts``: a list of strings -> [len(texts), D]; one string -> [D] (as
        sentence-transformers). ``side``: "query" or "doc" (which prompt and max length apply).
        L2-normalised float32 on the host: a torch tensor, or numpy with ``to_numpy``."""
        if isinstance(texts, str):
            one = self.encode([texts], side, batch_size, progress, description, to_numpy)
            return one[0]
        _check_texts(texts, side)
        was_training = self.training
        self.eval()
        unique = list(dict.fromkeys(texts))
        try:
            if self.segments is not None and unique:
                from hmcl_cli.modeling.segments import encode_segmented

                out = encode_segmented(self, unique, side, self.segments, batch_size)
            else:
                out = self._encode_plain(unique, side, batch_size, progress, description)
        finally:
            self.train(was_training)
        # unique == texts when nothing repeats: no second copy of the corpus's embeddings
        if len(unique) == len(texts):
            result = out
        else:
            position = {t: i for i, t in enumerate(unique)}
            result = out[torch.tensor([position[t] for t in texts], dtype=torch.long)]
        return result.numpy() if to_numpy else result

    def _encode_plain(self, unique: list[str], side: str, batch_size: int, progress: bool, description: str) -> torch.Tensor:
        """Embeddings [len(unique), D] (float32, on the host), computed longest texts first."""
        with record_function("hmcl.tokenize"):
            # packed a chunk at a time: a corpus's token ids as Python lists take ~36 bytes a token
            ids = TokenLists.tokenized(lambda part: self._token_ids(part, side), unique)
        lengths = ids.lengths()
        order = np.argsort(-lengths, kind="stable").tolist()  # longest first, ties in their order
        dev = self.device
        out = HostRows(len(unique), self.dim)
        skip = self.prompt_skip(side)
        batches = encode_batches(lengths[order].tolist(), batch_size, batch_growth(dev))
        # CUDA graphs for the widths many batches share (model.encode_graphs; modeling/encode_graphs.py)
        graphs = None if encode_graphs.graph_refusal(self) else encode_graphs.GraphedBatches(self, ids, order, batches, skip)
        with ProgressBar(description, len(unique), "texts", enabled=progress) as bar:
            try:
                for start, stop in batches:
                    idx = order[start:stop]
                    emb = None
                    if graphs is not None:
                        with record_function("hmcl.encode_graph"):
                            emb = graphs.encode(idx)
                    if emb is None:
                        # host tensors moved without waiting (torch.tensor(..., device=cuda) would wait for
                        # the GPU to finish the previous batch: no running ahead, a launch-bound loop half idle)
                        with record_function("hmcl.pad"):
                            host = self.pad([ids[i] for i in idx], pool_skip=skip)
                            batch = to_device(host, dev)
                        with record_function("hmcl.encode_batch"), autocast_for(dev):
                            emb = self(**batch, n_real=int(host["attention_mask"].numpy().sum()))
                    out.add(idx, emb)
                    bar.update(len(idx))
            finally:
                if graphs is not None:
                    graphs.close()
        return out.collect()

    # ---------------------------------------------------------------- saving
    def save(self, folder: str | Path, adapter_only: bool = False) -> None:
        """Write a sentence-transformers folder (modules.json, pooling, tokenizer, weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        (tokenizer_with_eos(self.tokenizer) if self.settings.append_eos else self.tokenizer).save_pretrained(folder)
        # the tokenizer appends EOS now
        write_st_config(folder, replace(self.settings, append_eos=False), int(self.backbone.config.hidden_size), self.head)


GROW = 16  # encode_batches: a batch of short texts holds at most this many times batch_size texts


def batch_growth(device: torch.device) -> int:
    """How many times ``batch_size`` a batch of short texts may hold on ``device``: :data:`GROW` on a
    GPU (fewer launches); 1 on a CPU, where compute bounds a batch and larger ones were slower
    (all-MiniLM-L6-v2, 20,000 texts, 2 cores: 0.80x-0.87x)."""
    return GROW if device.type == "cuda" else 1


def encode_batches(lengths: Sequence[int], batch_size: int, grow: int = GROW) -> list[tuple[int, int]]:
    """Batches (start, stop) over texts of ``lengths`` tokens, longest first, sized by tokens: the
    first holds ``batch_size`` texts, and each later one as many as fit the first's tokens
    (``batch_size`` x the longest length) at its own padded width (:func:`graph_shapes.graph_width`
    of its longest text, which no padding of it exceeds), between ``batch_size`` and ``grow`` x
    ``batch_size`` (1: every batch ``batch_size`` texts). No batch holds more tokens than the first,
    so none needs more memory than the call's longest texts already do; short texts go in fewer,
    larger batches (on a GPU each batch is a few hundred kernel launches: on the H200 of
    2026-12-04, 2048 short texts a batch encoded 2.04x as fast as 256)."""
    if not lengths:
        return []
    budget = batch_size * lengths[0]
    out, start = [], 0
    while start < len(lengths):
        rows = min(grow * batch_size, max(batch_size, budget // graph_width(lengths[start])))
        out.append((start, min(start + rows, len(lengths))))
        start += rows
    return out


class HostRows:
    """Rows computed a batch at a time on the device, collected in a host tensor ``[n, dim]``.

    Finished rows stay on the device until about ``BLOCK_BYTES`` of them are waiting, then go to
    the host together (one wait for the GPU per block), so the device holds the model and one
    block, not the whole corpus (1M texts x 4096 dimensions are 16 GiB)."""

    BLOCK_BYTES = 256 << 20

    def __init__(self, n: int, dim: int):
        self.rows = torch.empty((n, dim), dtype=torch.float32)
        self.block_rows = max(1, self.BLOCK_BYTES // (4 * dim))
        self._index: list[int] = []
        self._parts: list[torch.Tensor] = []

    def add(self, index: Sequence[int], values: torch.Tensor) -> None:
        """Rows ``index`` (positions in the output) get ``values`` [len(index), dim]."""
        self._index.extend(index)
        self._parts.append(values.float())
        if len(self._index) >= self.block_rows:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self.rows[torch.tensor(self._index, dtype=torch.long)] = torch.cat(self._parts).cpu()
            self._index, self._parts = [], []

    def collect(self) -> torch.Tensor:
        """The host tensor, every row added so far in place."""
        self._flush()
        return self.rows


def write_st_config(folder: Path, s: EncoderSettings, hidden: int, head: Sequence[nn.Module] = ()) -> None:
    """The sentence-transformers files of a saved model: modules (transformer, pooling, the head's
    layers, Normalize), pooling config, max length, prompts; and hmcl_config.json."""
    from hmcl_cli.modeling.st_modules import POOLING_MODES

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    for layer in head:  # written fresh: a folder saved over keeps no layer of an earlier head
        i = len(modules)
        path = f"{i}_{layer.kind}"
        shutil.rmtree(folder / path, ignore_errors=True)
        layer.save(folder / path)
        modules.append({"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{layer.kind}"})
    if s.normalize:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / f"{i}_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        **{key: s.pooling == mode for key, mode in POOLING_MODES.items()},
        "include_prompt": s.include_prompt,
    }, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max(s.query_max_length, s.doc_max_length), "do_lower_case": s.lowercase}, indent=2))
    prompts = {k: v for k, v in (("query", s.query_prompt), ("document", s.doc_prompt)) if v}
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": s.similarity,
        "model_type": "SentenceTransformer",
    }, indent=2))
    (folder / HMCL_CONFIG).write_text(json.dumps(asdict(s), indent=2))


def pooled_mask(mask: torch.Tensor, skip: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tokens pooled: the attention mask less each row's first ``skip`` real tokens (None when
    nothing is skipped)."""
    if skip is None:
        return None
    return mask * (mask.cumsum(1) > skip.to(mask.device).unsqueeze(1)).to(mask.dtype)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pool token states [B, T, D] with the attention mask [B, T] into [B, D] (sentence-transformers'
    modes; ``weighted_mean`` weights the k-th real token by k, whichever side the padding is on).
    ``keep``: the tokens pooled when some real ones are left out (a prompt's: :func:`pooled_mask`);
    they keep their place in ``weighted_mean``'s count and the first kept one is ``cls``'s, as in
    sentence-transformers."""
    keep = mask if keep is None else keep
    if mode in ("mean", "mean_sqrt_len", "weighted_mean"):
        m = keep.unsqueeze(-1).to(hidden.dtype)
        if mode == "weighted_mean":
            m = m * mask.cumsum(1).unsqueeze(-1).to(hidden.dtype)
        total = (hidden * m).sum(1)
        count = m.sum(1).clamp(min=1e-9)
        return total / (count.sqrt() if mode == "mean_sqrt_len" else count)
    if mode == "max":
        return hidden.masked_fill(keep.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "cls":
        first = keep.float().argmax(dim=1)  # first real token (works with left padding too)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]
    if mode == "last_token":
        width = mask.size(1)
        last = width - 1 - keep.flip(1).float().argmax(dim=1)  # last real token, any padding side
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}")


ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def backbone_class(config: Any, folder: Path) -> Any:
    """The transformers class that encodes with ``config``: AutoModel, or for an encoder-decoder
    (T5 family: sentence-t5, gtr-t5) its encoder alone, as sentence-transformers loads it."""
    import transformers

    name = ENCODER_ONLY.get(getattr(config, "model_type", ""))  # (a saved T5 encoder's config may not say encoder-decoder)
    if name is None and not getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModel
    if name is None:
        raise ModelNotFoundError(
            f"{folder}: {getattr(config, 'model_type', '?')} is an encoder-decoder model; hmcl encodes with "
            f"encoder-only or decoder-only backbones (and the encoder of {', '.join(sorted(ENCODER_ONLY))})",
            hint="pick an encoder (BERT-class) or decoder (Qwen/Llama-class) embedding model")
    return getattr(transformers, name)


def tokenizer_with_eos(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` whose post-processor appends EOS, so every loader of a saved
    last-token model (sentence-transformers, transformers, ONNX users) tokenizes like hmcl."""
    import copy

    from tokenizers import processors

    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        warn("the tokenizer cannot append EOS by itself; loaders other than hmcl must append it")
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    eos = tok.eos_token
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                           special_tokens=[(eos, tok.eos_token_id)])
    backend = tok.backend_tokenizer
    backend.post_processor = append if backend.post_processor is None else processors.Sequence([backend.post_processor, append])
    return tok


def resolve_append_eos(append_eos: str, pooling: str, tokenizer: Any) -> bool:
    """``model.append_eos``: ``auto`` appends EOS for last-token pooling when the tokenizer does not."""
    if append_eos == "auto":
        return pooling == "last_token" and _needs_eos(tokenizer)
    return append_eos == "yes"


def _needs_eos(tokenizer: Any) -> bool:
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return not ids or ids[-1] != eos


_CUDNN_FLAG = threading.Lock()
_cudnn_off = {"holders": 0, "restore": False}  # blocks inside without_cudnn_attention; turn it back on after


@contextlib.contextmanager
def without_cudnn_attention() -> Any:
    """SDPA's cuDNN backend off for the block (other backends as they were; no change when it is
    off already, so an outer choice, e.g. a benchmark's ``sdpa_kernel``, is kept).

    The flag is PyTorch's, one per process. Blocks may overlap (threads encoding at once): the
    first to enter turns it off and the last to leave restores it, so no block sees it turned
    back on under it. Code outside hmcl running meanwhile sees it off too."""
    cuda = torch.backends.cuda
    with _CUDNN_FLAG:
        if _cudnn_off["holders"] == 0:
            _cudnn_off["restore"] = bool(getattr(cuda, "cudnn_sdp_enabled", lambda: False)())
            if _cudnn_off["restore"]:
                cuda.enable_cudnn_sdp(False)
        _cudnn_off["holders"] += 1
    try:
        yield
    finally:
        with _CUDNN_FLAG:
            _cudnn_off["holders"] -= 1
            if _cudnn_off["holders"] == 0 and _cudnn_off["restore"]:
                cuda.enable_cudnn_sdp(True)


PIN_HOST_BATCHES = True  # benchmarks/encode_throughput.py --pageable turns it off to compare


def to_device(host: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch built on the host, moved to ``device`` without making the host wait for it.

    To a GPU through page-locked memory: a copy from ordinary (pageable) host memory must be
    staged, and CUDA may wait for the stream's earlier work to do that (its "API synchronization
    behavior"), which would stop the host from queueing the next batch while the GPU computes this
    one. PyTorch keeps the page-locked blocks in a cache and reuses one only after its copy is done."""
    if device.type == "cuda" and PIN_HOST_BATCHES:
        host = {k: v.pin_memory() for k, v in host.items()}
    return {k: v.to(device, non_blocking=True) for k, v in host.items()}


@functools.lru_cache(maxsize=None)  # asked for every batch encoded; the answer does not change
def native_bf16() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and later). Older GPUs (T4, V100) emulate it
    slowly, so there ``auto`` means fp16. True without a GPU (a plan made for a GPU elsewhere)."""
    if not torch.cuda.is_available():
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4: the only answer was the native one
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device_type: str) -> str:
    """``train.precision`` as it runs: ``auto`` is bf16 on a GPU with native bf16, fp16 (with loss
    scaling) on older GPUs, fp32 on a CPU; a CPU runs fp32 whatever is asked (autocast there is
    ~100x slower)."""
    if device_type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if native_bf16() else "fp16"
    return precision


def autocast_for(device: torch.device, precision: str = "auto", cache: bool = True):
    """Autocast for ``precision`` (see :func:`resolve_precision`) on CUDA; nothing on a CPU.
    ``cache=False``: no cache of the weights' half-precision copies (a CUDA graph's capture)."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device.type))
    return torch.autocast("cuda", dtype=half, cache_enabled=cache) if half is not None else contextlib.nullcontext()


def training_dtype(model_cfg: Any, device_type: str) -> torch.dtype:
    """The dtype weights are loaded in for training (see ``model.dtype``)."""
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    if model_cfg.lora.enabled and device_type == "cuda":  # frozen base; the adapters are float32 (peft keeps them so)
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32  # trained weights: float32 master copy; on GPU bf16 autocast computes


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
