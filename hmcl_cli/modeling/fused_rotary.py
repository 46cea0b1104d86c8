"""Rotary embeddings in fewer operations (``model.fused_rotary``): queries and keys rotated together.

Decoder LLMs (Qwen, Llama, Mistral, ...) rotate each layer's queries and keys by their positions
(RoPE). transformers writes it per tensor as ``x * cos + rotate_half(x) * sin``, where
``rotate_half`` slices the last dimension in two, negates one half and concatenates them: counted on
the CPU, 25 operations a layer forward and backward (29 with float32 cos/sin and bf16 queries:
autocast's case): 1,400 of the 6,241 of a Qwen3-shaped two-call step once its norms are fused
(:mod:`hmcl_cli.modeling.fused_norms`). Short-text steps on a GPU are bound by kernel launches, not
arithmetic, so each operation saved is time saved.

The same numbers in fewer operations:

- ``rotate_half(x) * sin`` is ``roll(x, half) * sin'`` with ``sin'`` the sine whose first half is
  negated (``-x2 * s1`` and ``x2 * -s1`` are the same float: negation is exact). ``roll`` is one
  operation, its backward another; the slices' backward are two each.
- Queries and keys are concatenated along the heads and rotated as one tensor, then split (split's
  backward is one concatenation).
- ``sin'`` is computed once per forward call, not once per layer (kept on the sine tensor, which
  every layer shares).

11 operations a layer instead of 25 (13 instead of 29 under autocast), and each element meets the
same float operations in the same order: outputs and gradients are bit-identical, in float32 and
bf16 (tests/test_fused_rotary.py). A Qwen3-shaped step: 5,461 operations instead of 6,241 (two
calls), 2,635 instead of 3,025 (one), benchmarks/RESULTS.md.

Where: recent transformers (5.25 here, with the ``kernels`` package it depends on) gives each
attention module its own handle on the model family's ``apply_rotary_pos_emb``
(``module._kernel_funcs["rotary_pos_emb"]``, a small module whose forward calls the function),
which the module-level function routes every call to. hmcl swaps that handle's class for a
subclass whose forward is :func:`fused_forward` — per model, not process-wide; the family's
function itself is untouched — after a probe, once per family: random queries, keys, cosines and
sines, transposed as attention hands them over, in float32 and bf16 and mixed; the original and the
fused forward must give the same outputs and gradients, bit for bit, and the same dtypes. A family
that computes something else (interleaved rotary, another signature) keeps its own. A call the
fused forward does not cover (cosines narrower than the heads: partial rotary; queries and keys
of different dtypes or lengths) goes to the original function. Where attention calls the function
directly (older transformers; Phi-3 and GLM in 5.25) nothing changes, and ``hmcl train`` says so.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .class_swap import made_by, own_class, restore, subclass

KEY = "rotary_pos_emb"  # the name transformers' kernel mapping gives apply_rotary_pos_emb
ORIGINAL = "_hmcl_original"  # on a fused subclass: the model family's apply_rotary_pos_emb
SIGNED = "_hmcl_signed_sin"  # on a sine tensor: (its version, the sine with its first half negated)
_FUSED_CLASSES: dict[type, type] = {}
_VERDICTS: dict[tuple, str] = {}  # (handle class: one per model family, head dim) -> probe_refusal's answer


@dataclass
class RotaryReport:
    """What :func:`fuse_rotary` did: attention layers fused, and why the others kept their own."""

    fused: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # attention class name -> why

    def summary(self) -> str:
        parts = []
        if self.fused:
            parts.append(f"{self.fused} attention layers rotate queries and keys together "
                         "(rotary embeddings in about half the operations)")
        parts += [f"{name} kept its own rotary embedding ({why})" for name, why in sorted(self.refused.items())]
        return "; ".join(parts) or "no rotary embeddings"


def _original(handle: nn.Module) -> Optional[Callable]:
    """The function a handle calls: the model family's ``apply_rotary_pos_emb`` (a closure variable
    of the handle class's forward, as the ``kernels`` package builds it), or None."""
    cls = own_class(handle)
    if ORIGINAL in cls.__dict__:
        return cls.__dict__[ORIGINAL]
    try:
        func = inspect.getclosurevars(cls.forward).nonlocals.get("func")
    except (TypeError, ValueError):
        return None
    return func if callable(func) else None


def signature_refusal(func: Callable) -> str:
    """Why ``func`` is not ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` ('' = it is)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return "its signature cannot be read"
    names = [p.name for p in params]
    if names != ["q", "k", "cos", "sin", "unsqueeze_dim"] or params[4].default != 1:
        return f"its signature is ({', '.join(names)}), not (q, k, cos, sin, unsqueeze_dim=1)"
    return ""


def signed_sine(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated: ``rotate_half(x) * sin ==
    roll(x, half) * signed_sine(sin)``. Kept on ``sin`` (every layer of a forward call gets the
    same sine tensor), recomputed if ``sin`` changed in place or inference mode changed; not kept
    under torch.compile, where ``sin`` itself takes gradients, or for an inference tensor (made in
    ``torch.inference_mode``: it has no version counter)."""
    keep = not (torch.compiler.is_compiling() or sin.requires_grad or sin.is_inference())  # (no version counter)
    if keep:
        key = (sin._version, torch.is_inference_mode_enabled())  # an inference tensor may not join a graph
        kept = sin.__dict__.get(SIGNED)
        if kept is not None and kept[0] == key:
            return kept[1]
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    if keep:
        sin.__dict__[SIGNED] = (key, signed)
    return signed


def fused_forward(self: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  unsqueeze_dim: int = 1, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``: queries and keys concatenated along
    the heads (dimension ``unsqueeze_dim``), rotated as one tensor, split again. Calls it does not
    cover go to the original function."""
    width = q.shape[-1] if q.dim() == 4 else 0
    dim = unsqueeze_dim % 4
    if (args or kwargs or not width or width % 2 or k.dim() != 4 or q.dtype != k.dtype
            or cos.shape[-1] != width or sin.shape[-1] != width
            or q.shape[:dim] + q.shape[dim + 1:] != k.shape[:dim] + k.shape[dim + 1:]):
        return _original(self)(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
    both = torch.cat((q, k), dim=dim)
    signed = signed_sine(sin).unsqueeze(unsqueeze_dim)
    rotated = both * cos.unsqueeze(unsqueeze_dim) + both.roll(width // 2, -1) * signed
    q_out, k_out = rotated.split([q.shape[dim], k.shape[dim]], dim=dim)
    return q_out, k_out


def fused_class(cls: type, original: Callable) -> type:
    """The subclass of handle class ``cls`` whose forward is :func:`fused_forward` (one per class,
    :mod:`hmcl_cli.modeling.class_swap`)."""
    return subclass(_FUSED_CLASSES, cls, f"FusedRotary{cls.__name__}", {
        "forward": fused_forward, ORIGINAL: staticmethod(original), "__module__": __name__,
        "__reduce_ex__": _reduce_fused,
        "__doc__": "apply_rotary_pos_emb, queries and keys together (hmcl_cli/modeling/fused_rotary.py)."})


def _reduce_fused(self: nn.Module, protocol: int):
    """Pickle a fused handle as its own class does (the ``kernels`` package rebuilds it from its
    model family's module), fused again when loaded: the fused subclass is made at run time, so
    pickle could not find it by name. (Copies go through the handle class's own ``__deepcopy__``,
    which makes an instance of the fused subclass itself.)"""
    reduced = own_class(self).__reduce_ex__(self, protocol)
    if isinstance(reduced, str):  # a global, pickled by name
        return reduced
    return (_rebuild_fused, (reduced[0], reduced[1]), *reduced[2:])


def _rebuild_fused(rebuild: Callable, args: tuple) -> nn.Module:
    """The handle its own class's pickle rebuilds, fused (see :func:`_reduce_fused`)."""
    handle = rebuild(*args)
    original = _original(handle)
    if original is not None:
        handle.__class__ = fused_class(type(handle), original)
    return handle


PROBE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]  # (q and k, cos and sin)


def probe_refusal(original: Callable, head_dim: int) -> str:
    """Why ``original`` may not be replaced by :func:`fused_forward` ('' = it may): for each dtype
    pair of :data:`PROBE_DTYPES`, random queries (4 heads) and keys (2: grouped-query attention),
    transposed views as attention hands them over, and random cosines and sines; the outputs and
    the gradients of both must be equal, bit for bit, in the same dtypes."""
    reason = signature_refusal(original)
    if reason:
        return reason
    if head_dim % 2:
        return f"odd head dimension {head_dim}"
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (2, 5, 4, head_dim), "k": (2, 5, 2, head_dim)}
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    cos, sin = (torch.randn(2, 5, head_dim, generator=gen) for _ in range(2))
    weights = {name: torch.randn(shape, generator=gen).transpose(1, 2) for name, shape in shapes.items()}
    handle = type("ProbeHandle", (), {ORIGINAL: staticmethod(original)})()  # fused_forward's fallback
    for qk_dtype, cs_dtype in PROBE_DTYPES:
        results = []
        for fn in (original, lambda *a: fused_forward(handle, *a)):
            q, k = (base[n].to(qk_dtype).transpose(1, 2).requires_grad_() for n in ("q", "k"))
            try:
                out = fn(q, k, cos.to(cs_dtype), sin.to(cs_dtype))
                if not (isinstance(out, tuple) and len(out) == 2):
                    return "it does not return (queries, keys)"
                sum((o.float() * weights[n]).sum() for o, n in zip(out, ("q", "k"))).backward()
            except Exception as e:  # noqa: BLE001 - a function that fails on the probe is left alone
                return f"it failed on a {qk_dtype} probe: {type(e).__name__}"
            results.append([t.detach() for t in (*out, q.grad, k.grad)])
        own, fused = results
        for a, b, what in zip(own, fused, ("queries", "keys", "query gradients", "key gradients")):
            if a.dtype != b.dtype or a.shape != b.shape:
                return (f"{what} in {a.dtype} {tuple(a.shape)}, fused {b.dtype} {tuple(b.shape)} "
                        f"({qk_dtype} q/k, {cs_dtype} cos/sin)")
            if not torch.equal(a, b):
                return f"its {what} differ from the fused ones ({qk_dtype} q/k, {cs_dtype} cos/sin)"
    return ""


def _head_dim(attention: nn.Module) -> int:
    """The attention module's head dimension (8 where it does not say: the probe's is then generic)."""
    value = attention.__dict__.get("head_dim")
    return value if isinstance(value, int) and value > 0 else 8


def fuse_rotary(backbone: nn.Module) -> RotaryReport:
    """Give every attention module of ``backbone`` whose rotary handle passes :func:`probe_refusal`
    the fused forward (in place: the handle's class becomes :func:`fused_class`); returns what was
    done. Idempotent. Models with rotary embeddings but no handles (transformers < 5; in 5.25 Phi-3
    and GLM, for two) are reported and left as they are."""
    report = RotaryReport()
    rotary = ""
    for module in backbone.modules():
        rotary = rotary or (type(module).__name__ if type(module).__name__.endswith("RotaryEmbedding") else "")
        handle = module.__dict__.get("_kernel_funcs", {}).get(KEY)
        if not isinstance(handle, nn.Module):
            continue
        cls = own_class(handle)
        original = _original(handle)
        if original is None:
            report.refused[type(module).__name__] = "its rotary handle's function cannot be found"
            continue
        key = (cls, _head_dim(module))
        if key not in _VERDICTS:
            _VERDICTS[key] = probe_refusal(original, key[1])
        if _VERDICTS[key]:
            report.refused[type(module).__name__] = _VERDICTS[key]
            continue
        handle.__class__ = fused_class(cls, original)
        report.fused += 1
    if rotary and not report.fused and not report.refused:
        report.refused[rotary] = ("its attention calls apply_rotary_pos_emb directly, without a per-layer handle "
                                  "(transformers < 5, or this model family)")
    return report


def unfuse_rotary(backbone: nn.Module) -> int:
    """Give every handle :func:`fuse_rotary` fused its own class back; returns how many."""
    return restore(made_by(_FUSED_CLASSES, _handles(backbone)))


def fused_rotary_count(backbone: nn.Module) -> int:
    """How many attention modules of ``backbone`` rotate through :func:`fused_forward`."""
    return len(made_by(_FUSED_CLASSES, _handles(backbone)))


def _handles(backbone: nn.Module) -> list:
    return [h for m in backbone.modules() if isinstance(h := m.__dict__.get("_kernel_funcs", {}).get(KEY), nn.Module)]
