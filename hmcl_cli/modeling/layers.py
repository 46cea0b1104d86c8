"""The repeated transformer blocks of a backbone: compiling them (``train.compile``) and
checkpointing their activations (``model.gradient_checkpointing``)."""

from __future__ import annotations

from typing import Optional

from torch import nn


def layer_classes(backbone: nn.Module) -> set[str]:
    """Class names of the backbone's repeated blocks: transformers' ``_no_split_modules`` of the
    model (found inside peft's wrappers too)."""
    return {name for m in backbone.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def compile_layers(backbone: nn.Module, mode: Optional[str] = None) -> int:
    """``torch.compile`` every repeated block in place (parameter names and saving unchanged;
    identical blocks share the compiled code); returns how many. Per layer rather than the whole
    model: shorter compiles, and it composes with FSDP2's per-layer units and checkpointing.
    ``mode``: torch.compile's (the benchmarks try ``reduce-overhead``, CUDA graphs)."""
    names = layer_classes(backbone)
    # by any class in the MRO: FSDP2 turns a sharded BertLayer into a subclass named FSDPBertLayer
    layers = [m for m in backbone.modules() if any(c.__name__ in names for c in type(m).__mro__)] or [backbone]
    for m in layers:
        m.compile(dynamic=True, mode=mode)
    return len(layers)


def enable_checkpointing(backbone: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpoints).
    transformers >= 5.2x names it ``activation_checkpointing_enable`` and deprecates
    ``gradient_checkpointing_enable`` (removed in v6); older versions have only the latter."""
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
