"""Unpadded forward passes (``model.unpad``): the backbone computes the real tokens only.

A padded batch ``[B, W]`` spends the model's matmuls on every padding token too. hmcl's batches
are grouped by length but still padded to the longest text of the batch (rounded up to a
multiple of 8): on STS-B pairs, 1.62x the real tokens with one forward call per side, 1.82x with
both sides in one call. Unpadded, the real tokens of every text are laid end to end as one
sequence ``[1, T]`` (positions restarting at each text), every linear layer, norm and MLP runs on
``T`` rows, and attention alone keeps the texts apart:

* on an Ampere or later GPU in bf16/fp16, PyTorch's flash variable-length kernel
  (``torch.nn.attention.varlen``, torch >= 2.10) attends within each text from the cumulative
  lengths — nothing padded at all (no padded attention mask is built either);
* elsewhere (a CPU; fp32; attention dropout while training, which that kernel lacks) the query,
  key and value rows go back to their padded places for SDPA with the padding mask, and the
  result comes back to the packed rows: attention as padded, everything else unpadded.

The token states go back to their padded places, so pooling, segments and the loss are
unchanged. Nothing is read back from the GPU: the number of real tokens comes from the host,
which built the batch.

The backbone runs through transformers' attention interface under the name ``hmcl_sdpa``: for a
padded batch it is SDPA itself (same mask construction, same call); packed calls carry a
:class:`Packing`. Which models: decided once per model by :func:`unpad_refusal` — the
attention kernel must be ``sdpa`` with full attention in every layer, and a probe batch must
give the same token states packed as padded (an architecture with relative position biases, its
own position numbering, or a forward that takes no ``position_ids`` fails the probe and stays
padded, with the reason printed at the start of training).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from hmcl_cli.console import log
from hmcl_cli.modeling import masks
from hmcl_cli.modeling.masks import ATTENTION, _reshard, prepared_mask, state_difference, state_tolerance, token_states

# the probe's allowance beyond its fixed one: packed states may differ from padded ones by this
# multiple of how far the padded batch is from each text run alone (the model's own rounding),
# never by more than the cap
ROUNDING_FACTOR = 2.0
ROUNDING_CAP = 0.25

# models that number positions after the padding index (RoBERTa's create_position_ids_from_input_ids)
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod"}


@dataclass
class Packing:
    """Where the real tokens of a padded batch ``[rows, width]`` sit, for one packed forward call."""

    flat: torch.Tensor  # [T] long: index of each real token in the flattened [rows * width] batch
    positions: torch.Tensor  # [T] long: position of each token in its text (0-based)
    cu_seqlens: torch.Tensor  # [rows + 1] int32: where each text starts and ends in the packed sequence
    rows: int
    width: int  # the padded width: an upper bound of every text's length (the kernel's max length)
    causal: bool
    padding_mask: torch.Tensor  # [rows, width]: the padded batch's 2D mask (1 = real token)
    # [rows, 1, width, width] bool: its 4D attention mask, for attention computed padded; None where
    # the varlen kernel is expected to take every call (at long lengths the mask is large)
    mask: Optional[torch.Tensor]
    # the flash variable-length kernel where it is expected to take this call's attention, and its
    # parameter names (looked up here, outside the layers that train.compile compiles)
    kernel: Optional[Any] = None
    kernel_takes: frozenset = frozenset()


def packing(attention_mask: torch.Tensor, n_real: int, causal: bool, with_mask: bool = True) -> Packing:
    """The :class:`Packing` of a padded batch from its 2D mask (1 = real token) on its device,
    given ``n_real``, the number of real tokens, known to the host (``with_mask``: build the 4D
    mask padded attention needs). Device ops only: nothing is read back."""
    rows, width = attention_mask.shape
    real = attention_mask.reshape(-1) != 0
    flat = torch.nonzero_static(real, size=n_real).squeeze(1)
    positions = (attention_mask.long().cumsum(1) - 1).reshape(-1).index_select(0, flat)
    cu = torch.nn.functional.pad(attention_mask.long().sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return Packing(flat, positions, cu, rows, width, causal, attention_mask,
                   prepared_mask(attention_mask, causal) if with_mask else None)


def _padded(x: torch.Tensor, p: Packing) -> torch.Tensor:
    """Packed heads ``[1, H, T, d]`` -> padded ``[rows, H, width, d]`` (zeros at padding)."""
    rows = x.squeeze(0).transpose(0, 1)  # [T, H, d] (squeeze, not [0]: its backward is a view, select's a copy)
    out = rows.new_zeros((p.rows * p.width, *rows.shape[1:])).index_copy(0, p.flat, rows)
    return out.view(p.rows, p.width, *rows.shape[1:]).transpose(1, 2)


@functools.lru_cache(maxsize=1)  # asked on every packed call
def _varlen_kernel() -> Optional[Any]:
    """torch's flash variable-length attention (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def flash_gpu() -> bool:
    """Whether the GPU runs flash attention kernels (Ampere, compute capability 8.0, and later; a
    T4 or V100 does not). True without a GPU: a plan made here for a GPU elsewhere."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() >= (8, 0)


def _kernel_takes_call(query_dtype: torch.dtype, head_dim: int, dropout: float) -> bool:
    """What the kernel asks of one attention call: bf16/fp16, a head size it takes, and no
    attention dropout (it has none)."""
    return (query_dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
            and head_dim % 8 == 0 and head_dim <= 256)


def varlen_serves(query_dtype: torch.dtype, device_type: str, head_dim: int, dropout: float) -> bool:
    """Whether the flash variable-length kernel computes this attention: CUDA on an Ampere or later
    GPU, and a call it takes (:func:`_kernel_takes_call`)."""
    return (device_type == "cuda" and _kernel_takes_call(query_dtype, head_dim, dropout)
            and _varlen_kernel() is not None and flash_gpu())


def varlen_takes(config: Any, dtype: torch.dtype, training: bool, device_type: str = "cuda") -> bool:
    """Whether the flash variable-length kernel would compute this model's attention on a GPU (or
    ``device_type``) with ``dtype`` compute, in training (where the config's attention dropout
    applies) or not."""
    dropout = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0) or 0.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // (getattr(config, "num_attention_heads", 1) or 1)
    return varlen_serves(dtype, device_type, head_dim, float(dropout) if training else 0.0)


@functools.lru_cache(maxsize=8)
def _parameters(fn: Any) -> frozenset:
    """The parameter names of ``fn`` (asked for every packed call; its layers' attention reads them
    from the :class:`Packing`)."""
    return frozenset(inspect.signature(fn).parameters)


def _varlen(query, key, value, p: Packing, scaling: Optional[float],
            dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Packed attention by the flash variable-length kernel in ``dtype``: ``[1, H, T, d]`` ->
    ``[1, T, H, d]``;
    None where this torch's kernel lacks an option the call needs (its signature has changed
    between releases: torch 2.10 had ``is_causal`` and no ``scale``, later ones ``window_size``,
    ``scale`` and ``enable_gqa``)."""
    kernel, takes = p.kernel, p.kernel_takes
    # [T, H, d] in dtype, laid out so (after rotary embeddings the heads come first in memory): one
    # copy at most for the cast and the layout together
    q, k, v = (x.squeeze(0).transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)
               for x in (query, key, value))
    options: dict = {}
    if scaling is not None:
        if "scale" in takes:
            options["scale"] = scaling
        elif abs(scaling * q.size(-1) ** 0.5 - 1.0) > 1e-6:  # torch 2.10's kernel scales by 1/sqrt(d) only
            return None
    if k.size(1) != q.size(1):  # grouped-query attention: the kernel shares KV heads where it can
        if "enable_gqa" in takes:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    if p.causal:
        if "window_size" in takes:
            options["window_size"] = (-1, 0)
        elif "is_causal" in takes:
            options["is_causal"] = True
        else:
            return None
    out = kernel(q, k, v, p.cu_seqlens, p.cu_seqlens, p.width, p.width, **options)
    return out[None]


def _padded_attention(query, key, value, p: Packing, dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """Packed attention computed padded: rows to their padded places, SDPA with the batch's mask
    (and the module's dropout), back to the packed rows: ``[1, H, T, d]`` -> ``[1, T, H, d]``."""
    q, k, v = (_padded(x, p) for x in (query, key, value))
    extra = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    mask = p.mask if p.mask is not None else prepared_mask(p.padding_mask, p.causal)  # (the kernel declined)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, **extra)
    out = out.transpose(1, 2).reshape(p.rows * p.width, out.size(1), out.size(3))
    return out.index_select(0, p.flat)[None]


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: under autocast its dtype, as SDPA would be cast to. A
    decoder whose weights are float32 hands attention float32 queries and keys even under bf16
    autocast (its RMS norms and rotary embeddings compute in float32 after the bf16 projections),
    which alone would keep the half-precision-only varlen kernel from them."""
    device = query.device.type
    if query.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              hmcl_packing: Optional[Packing] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface under the name ``hmcl_sdpa``: SDPA for a padded batch,
    per text for a packed one (``hmcl_packing``)."""
    if hmcl_packing is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if hmcl_packing.kernel is not None:
        dtype = _compute_dtype(query)
        takes = _kernel_takes_call(dtype, query.size(-1), dropout)
        out = _varlen(query, key, value, hmcl_packing, scaling, dtype) if takes else None
        if out is not None:
            return out, None
        _declined(f"{dtype}, head size {query.size(-1)}, dropout {dropout}" if not takes else
                  "this torch's kernel lacks an option the call needs (causal window, scale)")
    return _padded_attention(query, key, value, hmcl_packing, dropout, scaling), None


_DECLINED: set = set()


def _declined(why: str) -> None:
    """Say once per reason that attention expected to run in the varlen kernel ran padded (the
    start of training said the kernel): slower, and the memory plan assumed the kernel."""
    if why not in _DECLINED:
        _DECLINED.add(why)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # the main process says it for all
        from hmcl_cli.console import warn

        warn(f"unpadded attention ran padded, not in the flash variable-length kernel ({why})")


def register() -> str:
    """Register ``hmcl_sdpa`` with transformers (its masks built as SDPA's); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def position_offset(config: Any) -> int:
    """What a model adds to a token's 0-based position (RoBERTa-style models start after the
    padding index)."""
    if getattr(config, "model_type", "") in PADDING_OFFSET_POSITIONS:
        return int(getattr(config, "pad_token_id", 1) or 0) + 1
    return 0


def unpadded_states(backbone: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_real: int,
                    causal: bool) -> torch.Tensor:
    """The backbone's token states of a padded batch ``[B, W]``, computed packed: ``[B, W, D]``
    with zeros at the padding (``n_real``: the batch's real tokens, from the host)."""
    varlen = expects_varlen(backbone, attention_mask.device.type)
    p = packing(attention_mask, n_real, causal, with_mask=not varlen)
    if varlen:
        p.kernel = _varlen_kernel()
        p.kernel_takes = _parameters(p.kernel)
    ids = input_ids.reshape(-1).index_select(0, p.flat)[None]
    positions = (p.positions + position_offset(backbone.config))[None]
    # a 4D mask is returned as given by transformers' mask builders: they build nothing here (left
    # to themselves, they would build one [T, T] for the packed sequence); attention ignores it
    given = p.mask if p.mask is not None else attention_mask.new_ones((1, 1, 1, 1), dtype=torch.bool)
    out = token_states(backbone, input_ids=ids, position_ids=positions, attention_mask=given, hmcl_packing=p).squeeze(0)
    return out.new_zeros((p.rows * p.width, out.size(-1))).index_copy(0, p.flat, out).view(p.rows, p.width, -1)


def expects_varlen(backbone: Any, device_type: str, training: Optional[bool] = None) -> bool:
    """Whether the varlen kernel should take every attention call of a packed forward of
    ``backbone`` on ``device_type`` now (in ``training`` mode if given, else the backbone's): the
    compute dtype is autocast's, else that of the embeddings' output (hidden states)."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        try:
            dtype = backbone.get_input_embeddings().weight.dtype
        except (AttributeError, NotImplementedError):  # a model without the accessor: build the mask
            return False
    return varlen_takes(backbone.config, dtype, backbone.training if training is None else training, device_type)


def static_reason(backbone: Any) -> str:
    """Why unpadding is not even tried for this backbone ('' when it may be)."""
    reason = masks.static_reason(backbone, "unpadded calls")
    if not reason and "position_ids" not in inspect.signature(backbone.forward).parameters and not _takes_kwargs(backbone.forward):
        reason = f"{type(backbone).__name__} takes no position_ids"
    return reason


def _takes_kwargs(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def set_attention(backbone: Any, name: str) -> None:
    backbone.config._attn_implementation = name


def probe_batch(model: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The probe's padded batch on the model's device, three texts of different lengths: token
    ids, mask, and its real-token count (from the host)."""
    texts = ["hmcl checks unpadded attention with three texts of different lengths", "two", "a third text"]
    batch = model.pad(model.tokenize(texts, "doc"))
    dev = model.device
    return batch["input_ids"].to(dev), batch["attention_mask"].to(dev), int(batch["attention_mask"].sum())


@torch.no_grad()
def unpad_refusal(model: Any) -> str:
    """Why ``model`` (an EmbeddingModel) keeps padded forward passes; '' when it runs unpadded
    (its backbone is switched to ``hmcl_sdpa`` then).

    Static checks, then a probe: three texts of different lengths through the backbone padded
    and packed, in eval mode on the model's device under the autocast encoding uses (so a GPU
    probes the flash variable-length kernel), must give the same token states: to 1e-4 of the
    largest state in float32, 3% in bf16/fp16 or under autocast, or, for a model whose padded
    batch is itself that far from each text run alone (deep models in bf16), to twice that
    distance, up to 25%."""
    from hmcl_cli.modeling.encoder import autocast_for

    backbone = model.backbone
    reason = static_reason(backbone)
    if reason:
        return reason
    dev = model.device
    ids, mask, n_real = probe_batch(model)
    was_training = backbone.training
    backbone.eval()
    set_attention(backbone, register())
    try:
        with autocast_for(dev), model.attention_backends():
            # under autocast the matmuls round to bf16/fp16 even where the states come out float32
            # (a float32 model's norms run in float32): the probe allows that rounding
            lowered = torch.is_autocast_enabled(dev.type)
            padded = token_states(backbone, input_ids=ids, attention_mask=model.backbone_mask(mask))
            packed = unpadded_states(backbone, ids, mask, n_real, model.settings.is_decoder)
    except Exception as e:  # noqa: BLE001 - any refusal of the packed call means: stay padded
        set_attention(backbone, "sdpa")
        return f"{type(backbone).__name__} refused a packed forward call ({type(e).__name__}: {str(e)[:80]})"
    finally:
        backbone.train(was_training)
        _reshard(backbone)
    # the linear layers see other row counts packed, so their kernels may round differently (and a
    # decoder's rotary positions start at 0 instead of after left padding); a wrong attention
    # pattern changes the states by far more
    diff, allowed = state_difference(padded, packed, mask), state_tolerance(padded, 3e-2, lowered)
    if diff <= allowed:
        return ""
    # a deep model in bf16 rounds more than the fixed allowance even padded: the padded batch is
    # then as far from each text run alone (random Qwen3-4B shape, CPU bf16: packed 4.96% from
    # padded, padded 4.50% from alone; a wrong pattern 130-165%). Packed is held to twice that
    # rounding, up to ROUNDING_CAP, past which the model's own rounding could hide a wrong pattern
    noise = _padded_vs_alone(model, padded, ids, mask)
    if noise is not None and diff <= min(ROUNDING_FACTOR * noise, ROUNDING_CAP):
        log(f"unpadded calls: packed token states of {type(backbone).__name__} are {diff:.2%} from padded ones, "
            f"as the padded batch is {noise:.2%} from each text run alone (the model's own rounding)")
        return ""
    set_attention(backbone, "sdpa")
    # the sizes, for a user (and a GPU benchmark) to tell rounding just over the line from a wrong
    # pattern: how far the padded batch itself is from each text run alone (no padding at all)
    by = "not finite or of another shape" if diff == float("inf") else f"by {diff:.2%} of the largest state"
    alone = f"; the padded batch is {noise:.2%} from each text run alone" if noise is not None else ""
    computed = "under autocast" if lowered else f"in {str(padded.dtype).replace('torch.', '')}"
    return (f"packed and padded token states of {type(backbone).__name__} differ ({by}{alone}; "
            f"{allowed:.2%} allowed {computed}, or {ROUNDING_FACTOR:g}x the padded batch's own difference "
            f"up to {ROUNDING_CAP:.0%})")


def _padded_vs_alone(model: Any, padded: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Optional[float]:
    """How far the probe's padded token states are from each text's run alone, in one-row calls
    without padding, as the probe ran (the rounding a padded batch already carries); None where
    that cannot run."""
    from hmcl_cli.modeling.encoder import autocast_for

    backbone = model.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode(), autocast_for(model.device), model.attention_backends():
            alone = torch.zeros_like(padded)
            for i in range(ids.size(0)):
                real = mask[i].bool()
                alone[i, real] = token_states(backbone, input_ids=ids[i, real][None])[0].to(alone.dtype)
    except Exception:  # noqa: BLE001 - no such size: the probe's fixed allowance alone decides
        return None
    finally:
        backbone.train(was_training)
        _reshard(backbone)
    return state_difference(alone, padded, mask)
