"""Sibling projections of one input as one matrix product (``model.fused_projections``).

Each transformer layer projects one input through several linear layers side by side: BERT's
queries, keys and values (``query``, ``key``, ``value``), a decoder's ``q_proj``, ``k_proj``,
``v_proj`` and its MLP's ``gate_proj`` and ``up_proj``. transformers computes them one by one:
three matrix products forward, and backward three for the input's gradient (then two additions to
sum them), three for the weights' and three bias sums. Short-text training steps on a GPU are
bound by kernel launches, not arithmetic (the H200 rows of 2026-12-04: a Qwen3-0.6B step took
194 ms at 32 anchors and 197 ms at 256), so every operation saved is time saved.

Computed as one: the group's weights are concatenated (one operation; under autocast one cast
instead of one per weight), one matrix product gives every output, and it is split into views.
Backward: one concatenation of the outputs' gradients, one product for the input's gradient, one
for the weights' (whose slices are each weight's gradient, no copy) and one bias sum.
Counted on the CPU (``benchmarks/projection_ops.py``, one training forward call and its backward):
9 operations fewer per query/key/value group in float32, 21 under bf16 autocast (one cast of the
joined weights, the joined biases and the input instead of one per module, and one cast back of
each gradient); a MiniLM-shaped forward and backward 0.90x the operations in float32 and 0.85x
under autocast, a Qwen3-shaped one (28 layers, two groups a layer) 0.87x and 0.80x.

How: the group's first call with an input computes every member's output and keeps the others'
for their own calls, which must come with the same tensor, unchanged (checked each time: the
same object and version); a member called with another input gets its own product. A group whose
kept outputs go unused twice in a row (a model whose siblings do not share their input) stops
fusing. Each module's class becomes a subclass of ``nn.Linear`` (``FusedLinear``,
:mod:`hmcl_cli.modeling.class_swap`): parameters, ``state_dict``, saving and ``isinstance`` are
unchanged; :func:`unfuse_projections` gives each its class back.

When: only while gradients are computed for trainable weights (full fine-tuning), and under the
recipe's ``auto`` (the default) only for inputs on a GPU. A CPU is bound by arithmetic, not
launches (the quickstart's step ran at the same speed either way), and there the join costs
memory: the joined weights autograd keeps. Without gradients (encoding) the saving is one product
of three against a concatenation, and frozen weights (LoRA's base) would be copied on each call;
both take each module's own product. Not inside
``torch.compile`` (``train.compile``: its compiled layers see plain products). The values are the
same products in another order of summation: equal to float32 rounding, not bit for bit
(tests/test_fused_projections.py).

Which modules: sibling ``nn.Linear`` children (the class itself: a quantised or LoRA layer is left
alone) named as one of :data:`GROUPS`, with one input width, dtype, device and bias or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .class_swap import made_by, own_class, restore, subclass

GROUPS = (
    ("query", "key", "value"),  # BERT, RoBERTa, XLM-R, MiniLM, E5, BGE, ...
    ("q_proj", "k_proj", "v_proj"),  # Qwen, Llama, Mistral, Gemma, ...
    ("gate_proj", "up_proj"),  # their gated MLPs
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
    ("q", "k", "v"),  # MPNet, T5
    ("wi_0", "wi_1"),  # T5's gated MLP
)
GROUP = "_hmcl_projection_group"  # on a fused module: its ProjectionGroup
INDEX = "_hmcl_projection_index"  # on a fused module: its place in the group
_FUSED_CLASSES: dict[type, type] = {}


@dataclass
class ProjectionReport:
    """What :func:`fuse_projections` did: groups fused by their member names, and on which devices."""

    fused: dict[str, int] = field(default_factory=dict)  # "query+key+value" -> groups
    setting: bool | str = "auto"  # model.fused_projections: see :func:`joins_on`

    @property
    def groups(self) -> int:
        return sum(self.fused.values())

    def active_on(self, device_type: str) -> bool:
        """Whether training on ``device_type`` computes the groups as one product each."""
        return self.groups > 0 and joins_on(self.setting, device_type)

    def summary(self) -> str:
        if not self.fused:
            return "no sibling projections fused"
        each = ", ".join(f"{n} x {names}" for names, n in sorted(self.fused.items()))
        return f"{self.groups} groups of sibling projections computed as one product each ({each})"


class _Kept:
    """The outputs of one fused call that wait for their modules' own calls."""

    __slots__ = ("input", "version", "outputs", "left")

    def __init__(self, input: torch.Tensor, outputs: list) -> None:
        self.input, self.version, self.outputs, self.left = input, input._version, outputs, len(outputs)


class ProjectionGroup:
    """Sibling ``nn.Linear`` modules computed as one product (see the module's docstring)."""

    def __init__(self, modules: list[nn.Linear], setting: bool | str = "auto") -> None:
        self.modules = modules
        self.setting = setting  # model.fused_projections: on which devices (see joins_on)
        self.sizes = [m.out_features for m in modules]
        self.kept: Optional[_Kept] = None
        self.active = True
        self.fused_calls = 0  # products computed for the whole group
        self.unused = 0  # kept outputs dropped unused, in a row

    def __getstate__(self) -> dict:  # pickle / deepcopy: no tensors of a call in flight
        return {**self.__dict__, "kept": None}

    def forward(self, module: nn.Module, index: int, input: torch.Tensor) -> torch.Tensor:
        kept = self.kept
        if kept is not None:
            out = kept.outputs[index]
            if out is not None and kept.input is input and kept.version == input._version:
                kept.outputs[index] = None
                kept.left -= 1
                if kept.left == 0:
                    self.kept = None
                    self.unused = 0
                return out
            self.kept = None  # not this input: its outputs will not be asked for
            self.unused += 1
            if self.unused >= 2:
                self.active = False
                return F.linear(input, module.weight, module.bias)
        members = self.modules
        weight = torch.cat([m.weight for m in members])
        bias = torch.cat([m.bias for m in members]) if members[0].bias is not None else None
        outputs = list(F.linear(input, weight, bias).split(self.sizes, dim=-1))
        self.fused_calls += 1
        out = outputs[index]
        outputs[index] = None
        kept = _Kept(input, outputs)
        kept.left -= 1
        self.kept = kept
        return out


def joins_on(setting: bool | str, device_type: str) -> bool:
    """Whether ``model.fused_projections: setting`` joins the projections of inputs on
    ``device_type`` (``auto``: anywhere but a CPU; ``True``: everywhere)."""
    return setting is True or (setting == "auto" and device_type != "cpu")


def fused_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward``, through the module's :class:`ProjectionGroup` while gradients are
    computed for its trainable weight (outside ``torch.compile``)."""
    group = None if torch.compiler.is_compiling() else self.__dict__.get(GROUP)  # compiled: traced as plain
    if (group is None or not group.active or not torch.is_grad_enabled() or not self.weight.requires_grad
            or not joins_on(group.setting, input.device.type)):
        return F.linear(input, self.weight, self.bias)
    return group.forward(self, self.__dict__[INDEX], input)


def fused_class(cls: type) -> type:
    """The subclass of ``cls`` (``nn.Linear``) whose forward is :func:`fused_forward`."""
    return subclass(_FUSED_CLASSES, cls, f"Fused{cls.__name__}", {
        "forward": fused_forward, "__module__": __name__, "__reduce_ex__": _reduce_fused,
        "__doc__": f"{cls.__name__} computed with its siblings (hmcl_cli/modeling/fused_projections.py)."})


def _reduce_fused(self: nn.Module, protocol: int) -> tuple:
    """Pickle (and deepcopy) a fused module by its own class (the subclass is made at run time,
    so pickle could not find it by name), fused again when loaded, its group with it."""
    return _new_fused, (own_class(self),), self.__getstate__()


def _new_fused(cls: type) -> nn.Module:
    return object.__new__(fused_class(cls))


def _group_refusal(members: list[nn.Module]) -> str:
    """Why ``members`` cannot be one product ('' = they can)."""
    if any(own_class(m) is not nn.Linear for m in members):
        return "not plain nn.Linear"
    first = members[0]
    w = first.weight
    for m in members[1:]:
        if (m.in_features != first.in_features or m.weight.dtype != w.dtype or m.weight.device != w.device
                or (m.bias is None) != (first.bias is None)):
            return "different input widths, dtypes, devices or biases"
    if any(type(m.weight) is not nn.Parameter for m in members):
        return "weights not plain parameters (sharded or quantised)"
    return ""


def find_groups(backbone: nn.Module) -> list[tuple[tuple[str, ...], list[nn.Linear]]]:
    """Every set of sibling projections of ``backbone`` that can be one product: (names, modules)."""
    found = []
    for parent in backbone.modules():
        children = parent._modules
        for names in GROUPS:
            members = [children.get(n) for n in names]
            if all(m is not None for m in members) and not _group_refusal(members):
                found.append((names, members))
    return found


def fused_weight_numel(backbone: nn.Module) -> int:
    """Elements of the trainable weights :func:`fuse_projections` joins in each forward call: the
    memory planner's count of the joined copies autograd keeps (the product's backward needs the
    weight; the joined bias it does not keep)."""
    return sum(m.weight.numel() for _, members in find_groups(backbone) for m in members if m.weight.requires_grad)


def fuse_projections(backbone: nn.Module, setting: bool | str = "auto") -> ProjectionReport:
    """Group every set of sibling projections of ``backbone`` named as one of :data:`GROUPS` (in
    place: each module's class becomes :func:`fused_class`); returns what was done. ``setting``:
    on which devices the groups join (:func:`joins_on`). Idempotent; a second call sets
    ``setting`` anew."""
    report = ProjectionReport(setting=setting)
    for names, members in find_groups(backbone):
        group = members[0].__dict__.get(GROUP)
        if group is not None and all(m.__dict__.get(GROUP) is group for m in members):
            group.setting = setting
        else:
            group = ProjectionGroup(members, setting)
            for i, m in enumerate(members):
                m.__class__ = fused_class(own_class(m))
                m.__dict__[GROUP] = group
                m.__dict__[INDEX] = i
        key = "+".join(names)
        report.fused[key] = report.fused.get(key, 0) + 1
    return report


def unfuse_projections(backbone: nn.Module) -> int:
    """Give every module :func:`fuse_projections` fused its own class back; returns how many."""
    modules = made_by(_FUSED_CLASSES, backbone.modules())
    for m in modules:
        m.__dict__.pop(GROUP, None)
        m.__dict__.pop(INDEX, None)
    return restore(modules)


def fused_groups(backbone: nn.Module) -> list[ProjectionGroup]:
    """The groups of ``backbone``'s fused projections, each once."""
    seen: dict[int, ProjectionGroup] = {}
    for m in made_by(_FUSED_CLASSES, backbone.modules()):
        group = m.__dict__.get(GROUP)
        if group is not None:
            seen.setdefault(id(group), group)
    return list(seen.values())
