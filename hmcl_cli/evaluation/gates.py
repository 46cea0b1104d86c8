"""Quality gates (``eval.gate``, ``--gate``): parsed, and checked against what an evaluation will
have before it runs, so a typo in a gate is a recipe error at the start, not a failed gate after
hours of training.

A gate is ``TASK:METRIC OP (NUMBER | MODEL[+-NUMBER])``: ``stsb:spearman>=base+0.005``,
``sample:ndcg@10>=0.7``, ``trecqa@64:map>=base`` (the models cut to 64 dimensions). METRIC is
hmcl's short name of the task's kind (``spearman``, ``ndcg@10``, ``map``...), ``main_score``, or
any score name mteb reports (``cosine_spearman``, ``ndcg_at_10``...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

_GATE = re.compile(r"^\s*([^:\s]+)\s*:\s*([\w@.\-]+)\s*(>=|>|<=|<)\s*(?:([A-Za-z_][\w\-]*)\s*(?:([+-])\s*([0-9.eE+-]+))?"
                   r"|([0-9.eE+-]+))\s*$")
SYNTAX = "TASK:METRIC>=NUMBER or TASK:METRIC>=MODEL+NUMBER"
EXAMPLE = "e.g. 'stsb:spearman>=base+0.005' or 'sample:ndcg@10>=0.7'"


@dataclass
class Gate:
    text: str
    task: str
    metric: str
    op: str
    ref_model: Optional[str]  # compared with this model's score (plus ``delta``), or with ``number``
    sign: Optional[str]
    delta: Optional[str]
    number: Optional[str]

    @property
    def cut(self) -> tuple[str, Optional[int]]:
        """The task and the size its models are cut to (``stsb@64`` -> ("stsb", 64))."""
        m = re.fullmatch(r"(.+)@(\d+)", self.task)
        return (m.group(1), int(m.group(2))) if m else (self.task, None)

    def reference(self, models: Iterable[str]) -> tuple[Optional[str], Optional[str], Optional[str]]:
        """The compared model, sign and delta, with ``base-0.01`` (no spaces: read as one name)
        split where ``base`` is one of ``models``."""
        models = set(models)
        if self.ref_model and self.ref_model not in models and not self.sign:
            split = re.fullmatch(r"(.+?)([+-])(\d[\d.]*(?:[eE][+-]?\d+)?)", self.ref_model)
            if split and split.group(1) in models:
                return split.group(1), split.group(2), split.group(3)
        return self.ref_model, self.sign, self.delta


def parse_gate(text: str) -> Optional[Gate]:
    """The gate ``text`` parsed, or None when it is not of the gate form."""
    m = _GATE.match(text)
    return Gate(text, *m.groups()) if m else None


def task_kinds(tasks: Iterable) -> dict[str, Optional[str]]:
    """Eval tasks (EvalTask) as name -> kind; None for a hub task, whose kind its data says."""
    return {t.name: None if t.type == "mteb" else t.type for t in tasks}


def short_metrics() -> dict[str, list[str]]:
    """hmcl's short metric names, per task kind."""
    from hmcl_cli.evaluation.mteb_bridge import METRIC_NAMES

    return {kind: list(names) for kind, names in METRIC_NAMES.items()}


def metric_problem(metric: str, kind: Optional[str]) -> Optional[str]:
    """Why ``metric`` cannot be a score of a task of ``kind`` (None: it can, or it cannot be told
    before the task runs: a hub task, or a name that may be one of mteb's)."""
    from hmcl_cli.recipe import suggest

    names = short_metrics()
    if kind not in names or metric == "main_score" or metric in names[kind]:
        return None
    every = {n for ns in names.values() for n in ns}
    own = names[kind] + ["main_score"]
    close = suggest(metric, own)
    if "@" not in metric and metric not in every and ("_" in metric or close is None):
        return None  # mteb's names have no '@' (most have a '_'): one of them, checked when the task runs
    return (f"{metric!r} is not a metric of a {kind} task" + (f" — did you mean {close!r}?" if close else "")
            + f" (hmcl's: {', '.join(own)}; or any mteb score name)")


def beyond_maximum(metric: str, op: str, threshold: Optional[float]) -> bool:
    """Whether ``METRIC OP threshold`` asks more than any model can score: each of hmcl's
    metrics is at most 1."""
    bounded = {n for names in short_metrics().values() for n in names}
    return (metric in bounded and isinstance(threshold, float)
            and (threshold > 1 if op == ">=" else threshold >= 1 if op == ">" else False))


def gate_problems(gates: Iterable[str], tasks: dict[str, Optional[str]], models: Iterable[str],
                  dims: Optional[Iterable[int]] = None) -> list[str]:
    """What is wrong with each gate against an evaluation of ``tasks`` (name -> kind; None: a kind
    known only when it runs) and ``models`` (labels) with the models also cut to ``dims`` (None:
    not known yet): its form, its task, its metric, the model it compares with."""
    from hmcl_cli.recipe import suggest

    models, out = list(models), []
    for text in gates:
        g = parse_gate(text)
        if g is None:
            out.append(f"gate {text!r} is not of the form {SYNTAX} ({EXAMPLE})")
            continue
        task, size = g.task, None
        if task not in tasks:
            task, size = g.cut
        if task not in tasks:
            close = suggest(g.task, list(tasks))
            out.append(f"gate {text!r}: no task named {g.task!r}" + (f" — did you mean {close!r}?" if close else "")
                       + f" (tasks: {', '.join(tasks) or 'none'})")
            continue
        if size is not None and dims is not None and size not in set(dims):
            out.append(f"gate {text!r}: the models are not evaluated cut to {size} dimensions (add {size} to eval.dims, or --dim {size})")
        why = metric_problem(g.metric, tasks[task])
        if why:
            out.append(f"gate {text!r}: {why}")
        ref_model = g.reference(models)[0]
        if g.number is not None and beyond_maximum(g.metric, g.op, float(g.number)):
            out.append(f"gate {text!r}: no model can pass it: {g.metric} is at most 1")
        if ref_model and ref_model not in models:
            close = suggest(ref_model, models)
            out.append(f"gate {text!r}: no model named {ref_model!r}" + (f" — did you mean {close!r}?" if close
                       else "") + f" (models: {', '.join(models) or 'none'})")
    return out
