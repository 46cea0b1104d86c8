"""Find the operations that make the host wait for the GPU, on any device (CPU included).

On a GPU every ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean-mask index copies a
value back to the host and so waits for every queued kernel: the CPU stops running ahead, and a
training step that launches hundreds of small kernels becomes latency-bound. CUDA's
``torch.cuda.set_sync_debug_mode`` reports them only on a GPU; this dispatch mode recognises the
same operations by name and arguments, so a CPU test can hold the training step to zero of them::

    with HostSyncCounter() as syncs:
        trainer._forward_backward(batch, 1.0)
    assert not syncs.events, syncs.report()

It sees operations dispatched to ATen. Not visible here: ``.tolist()`` / ``.cpu()`` of a CUDA
tensor on a CPU-only machine (a no-op there) — the trainer keeps such calls to its logging
interval.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operations whose output size or value depends on the data: the host must read it back
_ALWAYS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "aten.nonzero", "aten.masked_select", "aten.argwhere",
    "aten.unique_consecutive", "aten._unique2", "aten._unique", "aten.unique_dim",
    "aten.equal", "aten.is_nonzero", "aten.bincount", "aten.histc",
}
_BOOL_INDEX = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_", "aten._unsafe_index"}


def _op_name(func) -> str:
    return f"{func.namespace}.{func.__name__.split('.')[0]}"


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


@dataclass
class SyncEvent:
    op: str
    where: str  # the innermost frame outside torch's own files


@dataclass
class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode recording each host-synchronising operation and where it was called.

    ``device``: on a GPU run pass ``"cuda"`` so reads of CPU tensors (the optimizer's step
    counters, host-side bookkeeping) are not counted; on a CPU-only machine every candidate
    operation is counted, as it would synchronise had its tensors been on the GPU."""

    events: list[SyncEvent] = field(default_factory=list)
    device: Optional[str] = None

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        syncs = name in _ALWAYS or (name in _BOOL_INDEX and _has_bool_index(args)) or (
            name == "aten.repeat_interleave" and kwargs.get("output_size") is None
            and isinstance(args[0] if args else None, torch.Tensor) and len(args) == 1)
        if syncs and self.device not in (None, "cpu"):
            syncs = any(isinstance(a, torch.Tensor) and a.device.type == self.device
                        for a in (*args, *(args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())))
        if syncs:
            self.events.append(SyncEvent(name, _caller()))
        return func(*args, **kwargs)

    def report(self) -> str:
        counts = Counter((e.op, e.where) for e in self.events)
        return "\n".join(f"{n:4d}  {op}  {where}" for (op, where), n in counts.most_common()) or "no host syncs"


_THIS = __file__.replace("\\", "/")


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and path != _THIS:
            return f"{path.split('/site-packages/')[-1]}:{frame.lineno} ({frame.name})"
    return "?"
