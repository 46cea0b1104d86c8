"""Fused RMSNorm layers (``model.fused_norms``): two operations per norm (forward, backward) instead of ~20.

Decoder LLMs (Qwen, Llama, Mistral, ...) normalise with RMSNorm, which transformers writes as
separate operations — upcast, square, mean, add epsilon, rsqrt, multiply, downcast, multiply by the
weight: 6-8 operations forward, ~14 backward (counted on the CPU, float32). Qwen3 has four norms a
layer (before attention, before the MLP, on the queries and on the keys): about two fifths of a
Qwen3-shaped training step's operations (4,068 of 10,309, counted on the CPU). Short-text training steps on a GPU are bound by kernel launches, not arithmetic (the
H200 rows of 2026-12-04: a Qwen3-0.6B step took 194 ms at 32 anchors and 197 ms at 256, eight
times the tokens), so every operation saved is time saved.

PyTorch's ``F.rms_norm`` computes the same norm as one operation: on a GPU its fused kernel
(``aten::_fused_rms_norm``, one kernel forward and one backward, where the input and the weight
share a dtype); on a CPU the same operations as transformers' code, in the same order (float32
outputs and gradients are bit-identical: tests/test_fused_norms.py).

Which modules: every module whose class name ends in ``RMSNorm`` (PyTorch's own ``nn.RMSNorm``
already uses ``F.rms_norm``), whose forward takes one tensor, with a 1-D weight and an epsilon
attribute — and whose class passes a probe, once per class: a copy of one instance with random
weights must give the fused forward's output from its own forward, to rounding, with the same
output dtype, for float32 and bf16 inputs and weights in every combination. A class that computes
something else (Gemma's ``1 + weight``, a gated norm, a norm that subtracts the mean) fails the
probe and keeps its own forward.

A fused module's class becomes a subclass of its own (``Fused<name>``, made once per class,
:mod:`hmcl_cli.modeling.class_swap`) whose forward is :func:`fused_forward`: ``isinstance`` checks,
parameter names, ``state_dict`` and saving are unchanged, and :func:`unfuse_rms_norms` gives the
module its own class back. (Where a hub kernel does take a norm — a user with internet and a GPU — it is fused too,
and it wins.) ONNX export loads its model without fusion (its graph is traced on the CPU, where
fusion saves nothing).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .class_swap import made_by, own_class, restore, subclass

EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
_FUSED_CLASSES: dict[type, type] = {}  # class -> its fused subclass
_VERDICTS: dict[type, str] = {}  # class -> probe_refusal's answer (it depends on the class alone)


@dataclass
class FusionReport:
    """What :func:`fuse_rms_norms` did: modules fused, and each class left alone with its reason."""

    fused: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # class name -> why its forward was kept

    def summary(self) -> str:
        parts = []
        if self.fused:
            parts.append(f"{self.fused} RMSNorm layers fused (F.rms_norm: one kernel each on a GPU)")
        parts += [f"{name} kept its own forward ({why})" for name, why in sorted(self.refused.items())]
        return "; ".join(parts) or "no RMSNorm layers"


def _eps(module: nn.Module) -> Optional[float]:
    """The module's epsilon, read from its own attributes (a plain dict lookup: this runs in every
    fused forward, and nn.Module's attribute lookup raises for each name it misses)."""
    attrs = module.__dict__
    for name in EPS_NAMES:
        value = attrs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def candidate_refusal(module: nn.Module) -> str:
    """Why ``module`` is no candidate for fusion ('' = it is one, pending its class's probe)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "no 1-D weight"
    if _eps(module) is None:
        return "no epsilon attribute (" + ", ".join(EPS_NAMES) + ")"
    params = [p for p in inspect.signature(own_class(module).forward).parameters.values()][1:]
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return "its forward takes more than one tensor"
    return ""


def fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm as transformers' decoders compute it — ``weight * (x / rms(x))``, the norm computed
    in float32 and rounded to the input's dtype before the weight multiplies it — through
    ``F.rms_norm``: one fused operation on a GPU (the kernel computes in float32 and rounds once;
    transformers' code rounds the norm, then the product). PyTorch's kernel wants input and weight
    in one dtype: where they differ, the one of lower precision is cast to the output's dtype
    first (one more operation). The output's dtype is the original's.

    GPU autocast computes ``rms_norm`` in float32: bf16 input and weight (a LoRA run's frozen bf16
    base) would be cast up, normed and cast back, four kernels. The fused kernel computes in
    float32 itself, so for them autocast is held off around it: one kernel, one rounding."""
    weight = self.weight
    shape = (weight.shape[0],)
    eps = _eps(self)
    if weight.dtype != hidden_states.dtype:  # e.g. bf16 queries (a projection's output under autocast), Qwen3's fp32 q_norm
        out_dtype = _promoted(hidden_states.dtype, weight.dtype)  # float32 (autocast keeps it: rms_norm is fp32 there)
        return F.rms_norm(hidden_states.to(out_dtype), shape, weight.to(out_dtype), eps)
    device = hidden_states.device.type
    if hidden_states.dtype != torch.float32 and device != "cpu" and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return F.rms_norm(hidden_states, shape, weight, eps)
    return F.rms_norm(hidden_states, shape, weight, eps)


_PROMOTED: dict = {}


def _promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types, asked once per pair (it is an ATen operation: a dispatch per call). A
    dict, not functools.lru_cache, which torch.compile warns about inside compiled layers."""
    if (a, b) not in _PROMOTED:
        _PROMOTED[(a, b)] = torch.promote_types(a, b)
    return _PROMOTED[(a, b)]


PROBE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]  # (input, weight)


def probe_refusal(module: nn.Module) -> str:
    """Why ``module``'s class may not take :func:`fused_forward` ('' = it may; asked once per class
    and process by :func:`fuse_rms_norms`): a CPU copy with random weights, its own forward against the fused one, for each (input, weight) dtype pair of
    :data:`PROBE_DTYPES`: same output dtype, and values equal to rounding (float32 input and
    weight: 1e-5 of the largest output; with a bf16 one: 2^-6, a bf16 rounding or two)."""
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(module).to("cpu")
    except Exception as e:  # noqa: BLE001 - a module that cannot be copied is left alone
        return f"could not be copied for the probe: {type(e).__name__}"
    probe.__class__ = own_class(probe)
    dim = probe.weight.shape[0]
    x = torch.randn(3, 5, dim, generator=gen) * 3 + 0.5
    w = torch.randn(dim, generator=gen) + 1.0
    for x_dtype, w_dtype in PROBE_DTYPES:
        with torch.no_grad():
            probe.weight.data = w.to(w_dtype)
            try:
                own = type(probe).forward(probe, x.to(x_dtype))
            except Exception as e:  # noqa: BLE001
                return f"its forward failed on a {x_dtype} probe: {type(e).__name__}"
            fused = fused_forward(probe, x.to(x_dtype))
        if not isinstance(own, torch.Tensor) or own.shape != fused.shape:
            return "its forward returns something other than one tensor of the input's shape"
        if own.dtype != fused.dtype:
            return f"output dtype {own.dtype} for {x_dtype} input and {w_dtype} weight, the fused one {fused.dtype}"
        exact = x_dtype == w_dtype == torch.float32  # else a bf16 rounding sits in one of the two
        tol = (1e-5 if exact else 2.0 ** -6) * float(own.float().abs().max())
        if float((own.float() - fused.float()).abs().max()) > tol:
            return f"its output differs from RMSNorm's ({x_dtype} input, {w_dtype} weight)"
    return ""


def fused_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward is :func:`fused_forward` (one per class)."""
    return subclass(_FUSED_CLASSES, cls, f"Fused{cls.__name__}", {
        "forward": fused_forward, "__module__": __name__, "__reduce_ex__": _reduce_fused,
        "__doc__": f"{cls.__name__} computed by F.rms_norm (hmcl_cli/modeling/fused_norms.py)."})


def _reduce_fused(self: nn.Module, protocol: int) -> tuple:
    """Pickle (and deepcopy) a fused module by its own class, fused again when loaded: the fused
    subclass is made at run time, so pickle could not find it by name (a DataLoader worker
    started by spawn, as on macOS, receives the model pickled)."""
    return _new_fused, (own_class(self),), self.__getstate__()


def _new_fused(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s fused subclass, for pickle to fill (see :func:`_reduce_fused`)."""
    return object.__new__(fused_class(cls))


def fuse_rms_norms(backbone: nn.Module) -> FusionReport:
    """Give every RMSNorm module of ``backbone`` whose class passes :func:`probe_refusal` the fused
    forward (in place: its class becomes :func:`fused_class`); returns what was done. Idempotent."""
    report = FusionReport()
    for module in backbone.modules():
        cls = own_class(module)
        if not cls.__name__.lower().endswith("rmsnorm") or isinstance(module, nn.RMSNorm):
            continue
        reason = candidate_refusal(module)
        if not reason:
            if cls not in _VERDICTS:
                _VERDICTS[cls] = probe_refusal(module)
            reason = _VERDICTS[cls]
        if reason:
            report.refused[cls.__name__] = reason
            continue
        module.__class__ = fused_class(cls)
        report.fused += 1
    return report


def unfuse_rms_norms(backbone: nn.Module) -> int:
    """Give every module :func:`fuse_rms_norms` fused its own class back; returns how many."""
    return restore(made_by(_FUSED_CLASSES, backbone.modules()))


def fused_count(backbone: nn.Module) -> int:
    """How many modules of ``backbone`` run the fused forward."""
    return len(made_by(_FUSED_CLASSES, backbone.modules()))
