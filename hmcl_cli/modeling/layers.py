"""The repeated transformer blocks of a backbone, and compiling them (``train.compile``)."""

from __future__ import annotations

from torch import nn


def layer_classes(backbone: nn.Module) -> set[str]:
    """Class names of the backbone's repeated blocks: transformers' ``_no_split_modules`` of the
    model (found inside peft's wrappers too)."""
    return {name for m in backbone.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def compile_layers(backbone: nn.Module) -> int:
    """``torch.compile`` every repeated block in place (parameter names and saving unchanged;
    identical blocks share the compiled code); returns how many. Per layer rather than the whole
    model: shorter compiles, and it composes with FSDP2's per-layer units and checkpointing."""
    names = layer_classes(backbone)
    # by any class in the MRO: FSDP2 turns a sharded BertLayer into a subclass named FSDPBertLayer
    layers = [m for m in backbone.modules() if any(c.__name__ in names for c in type(m).__mro__)] or [backbone]
    for m in layers:
        m.compile(dynamic=True)
    return len(layers)
