"""Cross-process helpers: gather embeddings *with* gradients, average gradients."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy of the local slice.

    Every rank computes the same global loss from the gathered tensor, so the gradient for the
    local slice is the all-reduced sum; with gradient *averaging* over ranks afterwards this
    gives exactly the gradient of the single-process loss on the full batch.
    (``accelerator.gather`` detaches, so in-batch negatives from other GPUs would get no gradient.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.size(0)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_sizes(counts: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's value of each count: ``out[k][r]`` is count ``k`` on rank ``r``. One
    all_gather and one read-back for all of them (each read-back waits for the device)."""
    t = torch.tensor(list(counts), dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    per_rank = torch.stack(out).cpu().tolist()
    return [list(col) for col in zip(*per_rank)]


def gather_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, sizes)


def gather_plain(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather without gradients, for labels and hashes (variable first dimension)."""
    if world_size() == 1:
        return x
    width = max(sizes)
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.size(0)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    ws = world_size()
    if ws == 1:
        return
    for p in params:  # every rank must reduce the same tensors in the same order
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ws
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
