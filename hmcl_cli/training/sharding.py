"""Sharded training (``train.fsdp``): PyTorch FSDP2 inside hmcl's own loop.

With several processes and ``train.fsdp: true`` every transformer layer of the backbone (the
classes a transformers model lists in ``_no_split_modules``) and then the backbone itself are
wrapped with :func:`torch.distributed.fsdp.fully_shard`: each process keeps 1/N of the weights,
gradients and AdamW state of full fine-tuning (like DeepSpeed ZeRO-3); a layer's weights are
gathered for its forward and backward only. With LoRA the frozen base is sharded and the small
adapters stay replicated (they are FSDP's ``ignored_params``; hmcl averages their gradients as in
data-parallel training), so checkpoints of LoRA runs are the same as without sharding.

Everything else is unchanged: embeddings are still gathered across processes with gradients,
so the loss and gradients equal the single-process loss on the whole batch (tested with 2 CPU
processes). Sharded weights are DTensors: checkpoints store full tensors (gathered, written by
the main process) and are re-sharded on ``--resume``; the final model is rebuilt unsharded on the
main process and saved like any other.

Python use::

    n_units = shard_backbone(model.backbone, torch.device("cuda", 0), world=8)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from hmcl_cli.modeling.layers import layer_classes


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    return isinstance(t, _dtensor())


def shard_backbone(backbone: nn.Module, device: torch.device, world: int, compute_dtype: torch.dtype = torch.float32) -> int:
    """Wrap each layer, then the backbone, with FSDP2 over ``world`` processes; returns the number
    of layer units. Trainable LoRA parameters stay replicated (plain tensors). With a bf16/fp16
    ``compute_dtype`` layers are gathered in it and gradients reduced in float32 (FSDP's
    mixed-precision policy, which replaces autocast's per-forward weight copies)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
              if compute_dtype != torch.float32 else MixedPrecisionPolicy())
    lora = {p for n, p in backbone.named_parameters() if p.requires_grad and "lora_" in n}
    classes = layer_classes(backbone)
    if not classes:
        raise ValueError(f"{type(backbone).__name__} lists no layer classes (_no_split_modules) to shard")
    units = [m for m in backbone.modules() if type(m).__name__ in classes]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params={p for p in unit.parameters() if p in lora} or None)
    fully_shard(backbone, mesh=mesh, mp_policy=policy, ignored_params=lora or None)
    return len(units)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a sharded one: every process must call it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) placed like ``param``: sharded the same way when it is sharded."""
    value = value.detach().to(device=param.device, dtype=param.dtype)
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements)


def full_state(module: nn.Module, only: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of ``module.state_dict()`` on the CPU (collective with sharding)."""
    keep = set(only) if only is not None else None
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():  # the same order on every process
        if keep is None or name in keep:
            out[name] = full(t).detach().cpu()
    return out


def optimizer_state_full(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded state tensors made whole (collective)."""
    sd = optimizer.state_dict()  # its per-parameter dicts are the live state: build new ones
    sd["state"] = {idx: {k: full(v).cpu() if is_sharded(v) else v for k, v in state.items()}
                   for idx, state in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a state dict of whole tensors, re-sharding each state like its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    states = {}
    for idx, state in sd["state"].items():
        p = params[int(idx)]
        states[idx] = {k: like(v, p) if is_sharded(p) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
                       and v.dim() > 0 else v for k, v in state.items()}
    optimizer.load_state_dict({**sd, "state": states})


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the total norm of every gradient, sharded (DTensor) and plain alike."""
    sharded = [p for p in params if p.grad is not None and is_sharded(p.grad)]
    plain = [p for p in params if p.grad is not None and not is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = []
    for group in (sharded, plain):
        if group:
            n = full(torch.nn.utils.get_total_norm([p.grad for p in group]))
            squares.append(n.float().to(sharded[0].grad.device) ** 2)
    total = torch.stack(squares).sum().sqrt()
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
