"""Attention masks prepared by hmcl, so that the model's forward never waits for the GPU.

Given a 2D padding mask, transformers' SDPA path first asks whether the mask can be dropped
(``padding_mask.all()``: no padding, so the flash kernel or ``is_causal`` may run). That
question reads a value back from the GPU: the host stops queueing kernels until everything
before it has run, once per forward call of an encoder and twice of a decoder — the last host
synchronisations of a training step (see ``training/host_sync.py``).

Where the model accepts it, hmcl hands the backbone the 4D boolean mask that transformers would
build from the 2D one — ``[batch, 1, query, key]``, True where a query attends to a key: every
real token for an encoder, the real tokens at or before the query for a decoder — and
transformers uses a 4D mask as given, asking nothing. The result is the same (bitwise on the
tiny and real models of the tests). It costs the mask-free kernels on a batch without any
padding, which hmcl's batches rarely are (padded to a multiple of 8).

Only where that is safe, decided once per model (:func:`prepared_mask_refusal`):

* the attention kernel is ``sdpa`` (eager attention adds the mask as float biases, flash
  attention 2 takes the 2D mask);
* full attention in every layer (no sliding window, chunked or hybrid layers, which the 4D mask
  would not express);
* and a probe: a padded two-text batch through the backbone with the 2D mask and with the
  prepared one gives the same hidden states at every real token (a transformers version or an
  architecture that builds its mask otherwise, or refuses a 4D mask, fails the probe and keeps
  the 2D mask).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from hmcl_cli.console import log

# the name hmcl registers with transformers' attention interface: SDPA for padded calls, and
# packed calls (modeling/unpad.py); defined here, which unpad imports, so both modules can name it
ATTENTION = "hmcl_sdpa"


def prepared_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The 4D boolean mask ``[B, 1, T, T]`` for a 2D padding mask ``[B, T]`` (1 = real token).

    Built from device tensors only: nothing is read back to the host."""
    keys = attention_mask.bool()[:, None, None, :]
    width = attention_mask.size(1)
    if causal:
        order = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril_()
        return order[None, None] & keys
    return keys.expand(-1, 1, width, width).contiguous()  # laid out as transformers lays out its own


def _full_attention(config: Any) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not getattr(config, "attention_chunk_size", None)


def static_reason(backbone: Any, what: str = "the prepared mask") -> str:
    """Why ``what`` (the prepared mask, or unpadding) is not even tried for this backbone ('' when
    it may be): both need SDPA with full attention in every layer of a decoder or encoder."""
    config = getattr(backbone, "config", None)
    if config is None:
        return "no model config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", ATTENTION):
        return f"attention kernel {impl!r} (only sdpa takes {what})"
    if not _full_attention(config):
        return "sliding-window or chunked attention layers"
    return ""


@torch.no_grad()
def prepared_mask_refusal(model: Any) -> str:
    """Why ``model`` (an EmbeddingModel) may not hand its backbone :func:`prepared_mask`; ''
    when it may.

    Static checks, then the probe described in the module docstring, run in eval mode (no
    dropout) on the model's device and dtype, under the autocast and SDPA backends encoding uses
    (bf16 on a GPU, so the probe takes the kernels that training and encoding take)."""
    from hmcl_cli.modeling.encoder import autocast_for

    backbone = model.backbone
    reason = static_reason(backbone)
    if reason:
        return reason
    batch = model.pad(model.tokenize(["hmcl checks its attention mask with two texts", "two"], "doc"))
    if bool(batch["attention_mask"].all()):  # no padding (host tensor), nothing to compare
        return "the probe's batch has no padding (nothing to compare)"
    dev = model.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    was_training = backbone.training
    backbone.eval()
    try:
        with autocast_for(dev), model.attention_backends():
            lowered = torch.is_autocast_enabled(dev.type)  # bf16/fp16 matmuls, float32 states or not
            plain = token_states(backbone, input_ids=ids, attention_mask=mask)
            prepared = token_states(backbone, input_ids=ids, attention_mask=prepared_mask(mask, model.settings.is_decoder))
    except Exception as e:  # noqa: BLE001 - any refusal of a 4D mask means: keep the 2D one
        reason = f"{type(backbone).__name__} refused a prepared 4D mask ({type(e).__name__})"
        log(f"attention mask: {reason}; the model checks its 2D mask each forward call")
        return reason
    finally:
        backbone.train(was_training)
        _reshard(backbone)
    # the same mask takes the same kernels, so equal bitwise in practice; the tolerance only
    # allows a kernel's rounding (bf16 under autocast), far below what a wrong mask changes
    if same_states(plain, prepared, mask, half_tolerance=2e-2, lowered=lowered):
        return ""
    reason = f"a prepared 4D mask changes {type(backbone).__name__}'s output"
    log(f"attention mask: {reason}; the model checks its 2D mask each forward call")
    return reason


def state_difference(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest difference of two runs' token states ``[B, T, D]`` at a real token (``mask``),
    as a share of the largest reference state; infinite where the shapes differ or ``other`` is
    not finite."""
    real = mask.bool()
    a, b = reference[real].float(), other[real].float()
    if a.shape != b.shape or not bool(torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max()) / (float(a.abs().max()) or 1.0)


def state_tolerance(reference: torch.Tensor, half_tolerance: float, lowered: bool = False) -> float:
    """``half_tolerance`` (a kernel's rounding) for bf16/fp16 states, or for any computed under a
    bf16/fp16 autocast (``lowered``: its matmuls round so, though a float32 model's states come
    out float32); else 1e-4."""
    return half_tolerance if lowered or reference.dtype != torch.float32 else 1e-4


def same_states(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, half_tolerance: float,
                lowered: bool = False) -> bool:
    """Whether two runs' token states agree at every real token to :func:`state_tolerance` of
    the largest state, all finite. Used by probes."""
    return state_difference(reference, other, mask) <= state_tolerance(reference, half_tolerance, lowered)


def _reshard(backbone: Any) -> None:
    """Put FSDP2-sharded parameters back into their shards: the root unit keeps its parameters
    unsharded after a forward call, and an optimizer built after the probe must see the shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in backbone.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def last_hidden(out: Any) -> torch.Tensor:
    """The token states of a backbone's output (a ModelOutput or a tuple)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_states(backbone: Any, **inputs: Any) -> torch.Tensor:
    """The backbone's token states for ``inputs``, every forward call of hmcl's through here:
    without filling a key/value cache (:func:`no_cache`)."""
    return last_hidden(backbone(**inputs, **no_cache(backbone)))


def no_cache(backbone: Any) -> dict:
    """The keyword that keeps a backbone from filling a key/value cache: ``use_cache=False`` where
    its forward (or, under peft, its base model's) names the parameter, else nothing. A decoder's
    ``config.use_cache`` is true, so each forward call would otherwise copy every layer's keys and
    values into a cache that an embedding model never reads (two extra copies per layer)."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return {"use_cache": False} if _names_use_cache(type(base)) else {}


@functools.lru_cache(maxsize=32)
def _names_use_cache(cls: type) -> bool:
    return "use_cache" in inspect.signature(cls.forward).parameters
