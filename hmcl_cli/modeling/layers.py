"""The repeated transformer blocks of a backbone, and compiling them (``train.compile``)."""

from __future__ import annotations

from torch import nn


def layer_classes(backbone: nn.Module) -> set[str]:
    """Class names of the backbone's repeated blocks: transformers' ``_no_split_modules`` of the
    model (found inside peft's wrappers too)."""
    return {name for m in backbone.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def model_class(module: nn.Module) -> type:
    """The module's own class: FSDP2 (``fully_shard``) swaps in a subclass named ``FSDP<Class>``,
    which must not be rebuilt or written into a saved config's ``architectures``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def compile_layers(backbone: nn.Module) -> int:
    """``torch.compile`` every repeated block in place (parameter names and saving unchanged;
    identical blocks share the compiled code); returns how many. Per layer rather than the whole
    model: shorter compiles, and it composes with FSDP2's per-layer units and checkpointing."""
    names = layer_classes(backbone)
    layers = [m for m in backbone.modules() if model_class(m).__name__ in names] or [backbone]  # else the whole model
    for m in layers:
        m.compile(dynamic=True)
    return len(layers)
