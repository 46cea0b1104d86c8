"""``hmcl eval``: several models x several tasks, a side-by-side table, JSON, and a quality gate.

Every task runs through ``mteb.evaluate`` (see :mod:`hmcl_cli.evaluation.mteb_bridge`). Local
tasks are read from files: ``sts`` (pairs + score), ``reranking`` (graded JSONL: each query's own
candidates), ``retrieval`` (graded JSONL pooled into a corpus, or a BEIR folder),
``pair_classification`` (pairs + 0/1); ``mteb`` tasks come from the hub by MTEB name. A failing
model or task is reported in the table and the others still run.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hmcl_cli.console import console, log, show_table, warn
from hmcl_cli.data.example import BadRow, GradedExample, add_candidate
from hmcl_cli.data.readers import is_pattern, is_saved_dataset, primed, read_source, source_files
from hmcl_cli.errors import DataError, GateFailedError, HmclError, RecipeError, from_system_error
from hmcl_cli.io_utils import atomic_path, write_json_atomic
from hmcl_cli.recipe import EvalTask, SourceConfig, unread_keys_problem

MAIN_METRIC = {"sts": "spearman", "reranking": "map", "retrieval": "ndcg@10", "pair_classification": "ap"}


@dataclass
class TaskData:
    task: EvalTask
    kind: str
    fmt: str = ""
    pairs: Optional[tuple[list[str], list[str], np.ndarray]] = None  # sts / pair_classification
    examples: list = field(default_factory=list)  # graded examples (reranking / retrieval)
    corpus: list = field(default_factory=list)  # retrieval over a BEIR folder: every corpus document
    hub: Any = None  # an mteb task object (type mteb)


class _NliLabels(Exception):
    """A pair-classification file read with the 0/1 default holds NLI's label names."""


def _read_task_rows(task: EvalTask, src: SourceConfig, path: Path) -> tuple[dict, list]:
    """A task file's rows: (its examples by (prompt, query), every (query, text, candidate) pair as given)."""
    from hmcl_cli.data.readers import NLI_AS_BINARY, NO_GOLD_LABEL

    merged: dict[tuple, GradedExample] = {}  # rows of one query (answer selection, pairs) -> one example
    pairs: list[tuple[str, str, Any]] = []  # sts / pair classification keep every row as given
    guess_nli = task.type == "pair_classification" and not task.label_map and not task.format
    label_hint = ("map the file's labels with the task's `label_map` in a recipe's eval.tasks (e.g. "
                  "{entailment: pos, neutral: neg, contradiction: neg}), or `format: nli` for NLI labels")
    no_gold, deferred = 0, None
    for item in read_source(src, path):
        if isinstance(item, BadRow):
            if item.kind == NO_GOLD_LABEL:  # NLI pairs the annotators did not agree on: no label to score
                no_gold += 1
                continue
            hint = None
            if item.kind == "unknown label":
                label = str(getattr(item, "label", "")).lower()
                if guess_nli and src.label_map != NLI_AS_BINARY:
                    if label in NLI_AS_BINARY:
                        raise _NliLabels()
                    if label in ("-", "-1"):  # NLI's "no gold label" where NLI's label names follow
                        deferred = deferred or item
                        continue
                hint = label_hint
            raise DataError(f"task {task.name!r}: {item.located()}", hint=hint)
        ex = item[1]
        for text, cand in ex.candidates.items():
            pairs.append((ex.query, text, cand))
        target = merged.setdefault((ex.prompt or "", ex.query), GradedExample(ex.query, prompt=ex.prompt))
        for cand in ex.candidates.values():
            add_candidate(target, cand.text, cand.level, cand.score, "highest")
    if deferred is not None:  # no NLI label name followed: an unknown label after all
        raise DataError(f"task {task.name!r}: {deferred.located()}", hint=label_hint)
    if no_gold:
        log(f"task {task.name}: {no_gold} pair(s) without a gold label (SNLI's and MultiNLI's '-', the Hub copies' -1: "
            "the annotators did not agree) left out")
    return merged, pairs


def load_task(task: EvalTask, resolve) -> TaskData:
    """Read a task's file(s) with the same readers as ``prepare`` (or find an MTEB hub task)."""
    if task.type == "mteb":
        if not task.mteb_name:
            raise RecipeError(f"eval task {task.name!r} of type mteb needs `mteb_name`")
        from hmcl_cli.evaluation.mteb_bridge import hub_task

        data = TaskData(task, "mteb", "mteb")
        data.hub = hub_task(task.mteb_name, task.split)
        return data
    if not task.path:
        raise RecipeError(f"eval task {task.name!r} needs `path`")
    path = resolve(task.path)
    fmt = task.format or {"sts": "sts", "pair_classification": "pairs"}.get(task.type, "graded")
    saved = is_saved_dataset(path)  # a folder of `datasets`' save_to_disk: of a dataset dict, task.split
    shards = source_files(path) if is_pattern(path) else None  # a pattern of files: read one after another
    if shards == []:
        raise DataError(f"task {task.name!r}: {path} matches no file", hint="fix eval.tasks[].path")
    first = shards[0] if shards else path
    if task.type == "retrieval" and path.is_dir() and not saved:
        fmt = "qrels"
    elif not task.format and fmt == "graded" and (first.is_file() or saved):  # a table of pairs or triplets
        from hmcl_cli.data.readers import ranking_format

        fmt = ranking_format(SourceConfig(path=str(first), encoding=task.encoding, delimiter=task.delimiter,
                                          hub_split=task.split if saved else None), first) or fmt
    exists = path.is_dir() if fmt == "qrels" else (first.is_file() or saved)
    if not exists:
        raise DataError(f"task {task.name!r}: {path} does not exist", hint="fix eval.tasks[].path")
    problem = unread_keys_problem(fmt, {"columns": task.columns, "score_range": task.score_range,
                                        "label_map": task.label_map})
    if problem:  # (a task's format can be the one its file's columns say: known only now)
        raise RecipeError(f"eval task {task.name!r} ({task.type}), {path}: {problem}")
    src = SourceConfig(path=str(path), format=fmt, columns=task.columns, score_range=task.score_range, encoding=task.encoding,
                       delimiter=task.delimiter, hub_split=task.split if saved else None,
                       qrels_split=task.split if fmt == "qrels" else "train",
                       label_map=task.label_map or ({"1": "pos", "0": "neg"} if task.type == "pair_classification" and fmt == "pairs"
                                                     else None))
    try:
        merged, pairs = _read_task_rows(task, src, path)
    except _NliLabels:  # 0/1 expected, NLI's label names found, and no label map given: read them as NLI's
        from hmcl_cli.data.readers import NLI_AS_BINARY

        src.label_map = dict(NLI_AS_BINARY)
        merged, pairs = _read_task_rows(task, src, path)
        log(f"task {task.name}: its labels are NLI's: entailment read as the positive class (1), neutral and "
            "contradiction as negative (0); a recipe's eval task sets another reading with `label_map`")
    examples = list(merged.values())
    if not examples:
        raise DataError(f"task {task.name!r}: {path} holds no examples")
    left_out: list = []
    if task.max_queries is not None and len(examples) > task.max_queries:
        from hmcl_cli.data.prepare import seeded_draw

        order = sorted(range(len(examples)), key=lambda i: seeded_draw(examples[i].query, 0))
        kept = set(order[:task.max_queries])
        left_out = [ex for i, ex in enumerate(examples) if i not in kept]
        examples = [ex for i, ex in enumerate(examples) if i in kept]
        log(f"task {task.name}: {len(examples)} of {len(examples) + len(left_out)} queries (max_queries)")
    data = TaskData(task, task.type, fmt, examples=examples)
    if fmt == "qrels":
        from hmcl_cli.mining import read_corpus

        data.corpus = read_corpus(path, task.encoding)  # judged and unjudged documents alike, as MTEB retrieves
    elif task.type == "retrieval":  # the queries left out keep their candidates in the corpus
        data.corpus = [t for ex in left_out for t in ex.candidates]
    if task.type in ("sts", "pair_classification"):
        a, b, gold = [], [], []
        for query, text, cand in pairs:
            a.append(query)
            b.append(text)
            gold.append(cand.score if task.type == "sts" else float(cand.level == 2))
        if task.type == "sts" and any(g is None for g in gold):
            raise DataError(f"task {task.name!r}: {path} has pairs without a score",
                            hint="an STS task needs a score column (map it with `columns: {score: ...}`)")
        data.pairs = (a, b, np.array(gold, dtype=float))
        distinct = len(set(gold))
        if distinct < 2:  # the metric is undefined (mteb divides by zero)
            what = ("Spearman correlation needs pairs with at least two different scores" if task.type == "sts" else
                    "average precision needs both positive (1) and negative (0) pairs")
            raise DataError(f"task {task.name!r}: {path}: {what}; it has {len(gold)} pair(s)"
                            + (f", all {'scored' if task.type == 'sts' else 'labelled'} {gold[0]:g}" if gold else ""),
                            hint="add pairs with other scores" if task.type == "sts" else "add pairs of the other label")
    return data


def evaluate(models: dict[str, Any], tasks: list[EvalTask], resolve, batch_size: int = 128,
             loader=None, dims: Sequence[int] = (), cache_dir: Optional[Path] = None) -> dict:
    """Evaluate every model on every task through mteb. ``models``: label -> EmbeddingModel or id/path
    (loaded one at a time with ``loader(name, label)``).
    ``dims``: also evaluate each model with its embeddings cut to these sizes, as ``<label>@<dim>``.
    ``cache_dir``: keep each model's embeddings there between calls (a file per model, named after
    its weights, settings and device: :func:`~hmcl_cli.evaluation.mteb_bridge.cache_file`), so a
    model evaluated again — the base, in every scheduled run — encodes only texts it has not seen.

    Returns ``{"tasks": {name: {"type", "main"}}, "models": [...], "results": {task: {model:
    metrics | {"error"}}}}``; each metrics dict has hmcl's short names (``spearman``, ``ndcg@10``,
    ``map``...), ``main_score`` and ``mteb`` (every score mteb reported).
    """
    from hmcl_cli.evaluation.mteb_bridge import MtebEncoder, cache_file, local_task, run_mteb
    from hmcl_cli.io_utils import use_cache_entry

    results: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}
    labels: list[str] = []  # the models, each followed by its cut sizes
    task_objs: dict[str, Any] = {}
    for t in tasks:
        try:
            data = load_task(t, resolve)
            task_objs[t.name] = (data.hub if data.kind == "mteb" else local_task(data), data.kind)
        except HmclError as e:
            task_objs[t.name] = e
            warn(f"task {t.name}: {_said(e)}")
    for label, model in models.items():
        if isinstance(model, (str, Path)):
            try:
                model = loader(str(model), label)
            except HmclError as e:
                warn(f"model {label}: {_said(e)}")
                for t in tasks:
                    results[t.name][label] = {"error": f"model failed to load: {_said(e)}", "error_class": "model"}
                labels.append(label)
                continue
        encoder = MtebEncoder(model, label, batch_size)  # one text cache per model for all tasks
        stored = cache_file(model, cache_dir) if cache_dir is not None else None
        if stored is not None:
            encoder.load(stored)
        views = [(label, encoder)]
        for d in dims:
            if d < model.dim:
                views.append((f"{label}@{d}", encoder.cut(d, f"{label}@{d}")))
            else:
                warn(f"model {label}: embeddings have {model.dim} dimensions; not evaluated cut to {d}")
        for view_label, view in views:
            labels.append(view_label)
            for t in tasks:
                entry = task_objs[t.name]
                if isinstance(entry, HmclError):
                    results[t.name][view_label] = {"error": _said(entry)}
                    continue
                log(f"eval {view_label} on {t.name}")
                try:
                    results[t.name][view_label] = run_mteb(view, *entry)
                except HmclError as e:
                    results[t.name][view_label] = {"error": str(e)}
                except Exception as e:  # noqa: BLE001 - one failure must not stop the table
                    if from_system_error(e) is not None:
                        raise  # out of memory / disk full: reported as such, with the knobs
                    results[t.name][view_label] = {"error": f"{type(e).__name__}: {e}"}
        reused = f"; {encoder.loaded} embeddings from {stored.name}" if stored is not None and encoder.loaded else ""
        log(f"eval {label}: {sum(v.encoded for _, v in views)} distinct texts encoded{reused}")
        if stored is not None:
            try:
                why_not = encoder.save(stored)
                if why_not is None:
                    use_cache_entry(stored, keep=len(models) + 1)  # this call's models, and one more
                elif why_not:
                    log(f"eval {label}: embeddings not cached ({why_not})")
            except OSError as e:  # a cache only: the results stand
                warn(f"eval {label}: embeddings not cached ({e})")
        del model, encoder, views
    def main_metric(t: EvalTask) -> str:
        entry = task_objs[t.name]
        if t.type == "mteb" and not isinstance(entry, HmclError):
            from hmcl_cli.evaluation.mteb_bridge import hub_main_metric

            return hub_main_metric(entry[0])
        return MAIN_METRIC.get(t.type, "main_score")

    report = {"tasks": {t.name: {"type": t.type, "main": main_metric(t)} for t in tasks},
              "models": labels, "results": results, "dims": list(dims),
              "cut": {f"{m}@{d}": [m, d] for m in models for d in dims if f"{m}@{d}" in labels}}
    reference = reference_model(list(models)) if models else None
    for t in tasks:  # the main metric of every model against the base or first one (cut to the same size)
        main, per = report["tasks"][t.name]["main"], results[t.name]
        for label, r in per.items():
            size = report["cut"].get(label, [None, None])[1]
            ref_label = reference if size is None else f"{reference}@{size}"
            ref = per.get(ref_label, {}).get(main)
            if label != ref_label and isinstance(ref, float) and isinstance(r.get(main), float):
                r[f"delta_vs_{reference}"] = r[main] - ref
    return report


def _said(error: HmclError) -> str:
    """An error's message with its hint (what to do), for the table and the JSON."""
    return f"{error} (hint: {error.hint})" if error.hint else str(error)


def print_table(report: dict, title: str = "evaluation") -> None:
    """One row per task (and per cut size when models were also evaluated cut, `size`), one column
    per model, each but the reference (`base`, else the first) with its difference from the
    reference at the same size."""
    from rich.table import Table

    cut = report.get("cut", {})
    models = [m for m in report["models"] if m not in cut]
    sizes: list = [None, *report.get("dims", [])]
    t = Table(title=title)
    t.add_column("task")
    t.add_column("metric")
    if cut:
        t.add_column("size", justify="right")
    ref = models.index(reference_model(models))
    for i, m in enumerate(models):
        t.add_column(m, justify="right")
        if i != ref:
            t.add_column(f"Δ vs {models[ref]}", justify="right")
    for task, per_model in report["results"].items():
        metric = report["tasks"][task]["main"]
        for size in sizes if cut else [None]:
            labels = [m if size is None else f"{m}@{size}" for m in models]
            if size is not None and not any(label in per_model for label in labels):
                continue  # no model was cut to this size (all narrower)
            first = per_model.get(labels[ref], {}).get(metric)
            row = [task, metric] + (["full" if size is None else str(size)] if cut else [])
            for i, label in enumerate(labels):
                r = per_model.get(label, {})
                v = r.get(metric)
                row.append("error" if "error" in r else f"{v:.4f}" if isinstance(v, float) else "-")
                if i != ref:
                    row.append(f"{v - first:+.4f}" if isinstance(v, float) and isinstance(first, float) else "-")
            t.add_row(*row)
    show_table(t)
    from rich.markup import escape

    for task, per_model in report["results"].items():
        said: dict[str, list[str]] = {}  # one line per task and error, naming every model it hit
        for m, r in per_model.items():
            if "error" in r:
                said.setdefault(r["error"], []).append(m)
        for error, hit in said.items():
            console.print(f"[red]{escape(task)} / {escape(', '.join(hit))}:[/red] {escape(error)}")


def _path_parts(path: str) -> list[str]:
    return [p for p in Path(path).parts if p not in ("", ".", "/")] or [path]


def _shortest_names(paths: list[str], named, reserved: list[str]) -> list[str]:
    """``named(path, depth)`` for each path, each with the smallest depth that tells it from the
    other paths and from the ``reserved`` names (the same path twice shares its name)."""
    depth = [1] * len(paths)
    names: list[str] = []
    for _ in range(64):
        names = [named(p, d) for p, d in zip(paths, depth)]
        clash = [i for i, n in enumerate(names)
                 if n in reserved or any(m == n and q != paths[i] for m, q in zip(names, paths))]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    return names


def _given_names(given: list[tuple[Optional[str], str]], flag: str) -> list[str]:
    """The names given (NAME=...) to a repeatable flag's values; one given twice is an error."""
    explicit = [n for n, _ in given if n]
    twice = sorted({n for n in explicit if explicit.count(n) > 1})
    if twice:
        raise RecipeError(f"{flag}: the name {twice[0]!r} is given twice", hint=f"give each {flag} its own (NAME=...)")
    return explicit


def _each_checkpoint(label: Optional[str], model: str) -> list[tuple[Optional[str], str]]:
    """A folder of training checkpoints (``runs/x/checkpoints``) as each of them, oldest first
    (labelled ``LABEL/step-N`` where it was labelled); any other model as it is."""
    from hmcl_cli.training.saved_model import checkpoints_in, is_checkpoint

    folder = Path(model).expanduser()
    if not folder.is_dir() or is_checkpoint(folder) or (folder / "config.json").is_file():
        return [(label, model)]
    steps = checkpoints_in(folder)
    return [(f"{label}/{p.name}" if label else None, str(p)) for p in steps] or [(label, model)]


def labelled_models(items: list[str]) -> dict[str, str]:
    """``--model [LABEL=]MODEL`` values as label -> model. An unlabelled model is named after its
    folder (a run's ``model/`` after the run), with as many parent folders as it takes to tell it
    from the others (``runs/a/model`` and ``runs/b/model``: ``a`` and ``b``; two ``ckpt`` folders:
    ``x/ckpt`` and ``y/ckpt``; a training checkpoint ``runs/a/checkpoints/step-N``: ``step-N``,
    or ``a/step-N``; a folder of checkpoints is each of them); a label given twice is an error, not a
    model silently dropped."""
    given = [(label or None, m) for label, _, m in (item.rpartition("=") for item in items)]
    empty = [item for item, (_, m) in zip(items, given) if not m.strip()]
    if empty:
        raise RecipeError(f"--model {empty[0]!r}: no model given", hint="--model [LABEL=]MODEL, e.g. --model runs/x")
    given = [each for label, m in given for each in _each_checkpoint(label, m)]
    explicit = _given_names(given, "--model")

    def named(m: str, depth: int) -> str:
        parts = _path_parts(m)
        if parts[-1] == "model" and len(parts) > 1:
            parts = parts[:-1]  # runs/x/model: the run's name
        elif len(parts) > 1 and parts[-2] == "checkpoints":
            parts = parts[:-2] + parts[-1:]  # runs/x/checkpoints/step-N: step-N, else x/step-N
        return "/".join(parts[-depth:])

    unnamed = [m for label, m in given if not label]
    names = iter(primed(_shortest_names(unnamed, named, explicit), explicit))
    return {label or next(names): m for label, m in given}


def task_names(given: list[tuple[str, Optional[str], str]], taken: Sequence[str] = ()) -> list[str]:
    """Names of ``hmcl eval``'s task flags, ``(kind, NAME or None, path)`` each: a file is named
    after its stem (``dev.csv.gz`` -> ``dev``), with parent folders where two files share it
    (``x/dev``, ``y/dev``), and ``-<kind>`` where one file is two kinds of task; none is one of
    ``taken`` (the recipe's tasks)."""
    from hmcl_cli.io_utils import data_stem

    flag = "--" + "/--".join(dict.fromkeys(k.replace("_", "-") for k, _, _ in given))
    explicit = _given_names([(name, path) for _, name, path in given], flag)
    clash = sorted(set(explicit) & set(taken))
    if clash:
        raise RecipeError(f"{flag}: {clash[0]!r} names a task of the recipe", hint="give the file another name (NAME=FILE)")
    explicit += list(taken)
    unnamed = [(kind, path) for kind, name, path in given if not name]

    def named(path: str, depth: int) -> str:
        parts = _path_parts(path)
        if depth > len(parts):  # dev.csv beside dev.jsonl: the whole file names
            return "/".join(parts)
        stem = data_stem(path)
        if any(c in stem for c in "*?["):  # a pattern of files: test-*.parquet -> test, */part-*.csv -> its folder's
            stem = re.split(r"[*?\[]", stem)[0].rstrip("-_. ")
            if not stem:
                parts, stem = parts[:-1] or ["files"], (parts[-2] if len(parts) > 1 else "files")
        return "/".join((parts[:-1] + [stem])[-depth:])

    base = _shortest_names([path for _, path in unnamed], named, explicit)
    kinds: dict[str, set] = {}
    for (kind, path), n in zip(unnamed, base):
        kinds.setdefault(path, set()).add(kind)
    names = iter(primed([n + (f"-{kind}" if len(kinds[path]) > 1 else "") for (kind, path), n in zip(unnamed, base)],
                         explicit))
    return [name or next(names) for _, name, _ in given]


def judged_model(models: list[str]) -> str:
    """The model a gate judges unless it compares with that one: the recipe's trained model
    (`fine-tuned`), else the first model not labelled `base`, else the first."""
    if "fine-tuned" in models:
        return "fine-tuned"
    return next((m for m in models if m != "base" and "@" not in m), models[0])


def reference_model(models: list[str]) -> str:
    """The model the table's Δ columns and the JSON's ``delta_vs_<model>`` compare with: the one
    labelled `base` if any (`--model runs/x --model base=...`), else the first."""
    return "base" if "base" in models else models[0]


def check_gates(report: dict, gates: list[str], model: Optional[str] = None) -> list[dict]:
    """Evaluate gate expressions on ``model`` (default: :func:`judged_model`), or on the first other
    model where a gate compares with that one. Returns one row each."""
    from hmcl_cli.evaluation.gates import EXAMPLE, SYNTAX, beyond_maximum, parse_gate

    preferred = model or judged_model(report["models"])
    whole = [m for m in report["models"] if m not in report.get("cut", {})]
    rows = []
    for g in gates:
        parsed = parse_gate(g)
        if parsed is None:
            raise RecipeError(f"gate {g!r} is not of the form {SYNTAX}", hint=EXAMPLE)
        task, metric, op, number = parsed.task, parsed.metric, parsed.op, parsed.number
        # the model judged: the preferred one, unless the gate compares with it (`--model base=...
        # --model runs/x --gate 'dev:map>=base'`): then the first other model
        named = parsed.reference(report["models"])[0]
        model = next((m for m in whole if m != named), preferred) if named == preferred else preferred
        subject, size = model, None
        if task not in report["results"] and parsed.cut[0] in report["results"] and parsed.cut[1] is not None:
            task, size = parsed.cut  # `stsb@64:spearman>=...`: the models cut to 64 dimensions
            subject = f"{model}@{size}"
        res = report["results"].get(task)
        if res is None:
            raise RecipeError(f"gate {g!r}: no task named {task!r} (tasks: {', '.join(report['results'])})")
        if size is not None and subject not in res:
            raise RecipeError(f"gate {g!r}: {model} was not evaluated cut to {size} dimensions",
                              hint=f"add {size} to eval.dims (or `--dim {size}`)")
        got = res.get(subject, {})
        value = got.get(metric, got.get("mteb", {}).get(metric))  # hmcl's short name, or mteb's
        ref_model, sign, delta = parsed.reference(res)
        if ref_model and size is not None:
            ref_model = f"{ref_model}@{size}"  # compared at the same size
        if ref_model:
            if ref_model not in res:
                raise RecipeError(f"gate {g!r}: no model named {ref_model!r} (models: {', '.join(report['models'])})")
            ref = res[ref_model].get(metric, res[ref_model].get("mteb", {}).get(metric))
            threshold = None if ref is None else ref + (float(delta) if sign == "+" else -float(delta) if sign else 0.0)
        else:
            threshold = float(number)
        ok = (isinstance(value, float) and threshold is not None and not math.isnan(value)
              and {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold, "<": value < threshold}[op])
        row = {"gate": g, "model": subject, "value": value, "threshold": threshold, "passed": bool(ok)}
        if ref_model == subject:  # e.g. a recipe's eval before any training: the base judged against itself
            row.update(passed=False, why=f"it would compare {subject} with itself: no other model to judge was evaluated")
        elif not ok and beyond_maximum(metric, op, threshold):  # `>=base+0.01` with the base at 0.9904
            row.update(unreachable=True, why=f"{subject}: {_num(value)}, needs {_num(threshold)}, more than {metric} "
                                              "can be (at most 1)")
        rows.append(row)
    return rows


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "missing"


def enforce_gates(rows: list[dict]) -> None:
    for r in rows:
        mark = "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"
        said = r.get("why") or f"{r['model']}: {_num(r['value'])}, needs {_num(r['threshold'])}"
        console.print(f"gate {mark}: {r['gate']} ({said})")
    failed = [r for r in rows if not r["passed"]]
    if failed:
        hint = "the model was not good enough to ship; see the table above"
        if any(r.get("unreachable") for r in failed):
            hint = ("no model can pass a gate above its metric's maximum: the model it compares with is already "
                    "near 1 there; lower the margin (e.g. >=base) or give a threshold of at most 1")
        elif any(r.get("why") for r in failed):
            hint = ("train the recipe first (its run directory has no model/ to evaluate), or name the model to "
                    "judge with --model")
        raise GateFailedError(f"{len(failed)} of {len(rows)} quality gate(s) not met: " + "; ".join(
            f"{r['gate']} ({r.get('why') or _versus(r)})" for r in failed), hint=hint)


def _versus(row: dict) -> str:
    value, threshold = row["value"], row["threshold"]
    return f"{value if value is None else round(value, 4)} vs {threshold if threshold is None else round(threshold, 4)}"


def save_report(report: dict, path: Path) -> None:
    write_json_atomic(path, report)
    log(f"eval results -> {'standard output' if str(path) == '-' else path}")


def plot_report(report: dict, path: Path) -> None:
    """A grouped bar chart of each task's main metric, one bar per model (cut sizes included),
    each bar labelled with its value (models a few thousandths apart look alike as bars), the
    legend beside the axes; PNG (or the format of ``path``'s suffix), ``-`` for standard output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["results"])
    models = report["models"]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) * len(models) + 1.0), 3.5))
    try:
        for i, m in enumerate(models):
            vals = [report["results"][t].get(m, {}).get(report["tasks"][t]["main"], float("nan")) for t in tasks]
            vals = [v if isinstance(v, (int, float)) else float("nan") for v in vals]
            bars = ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=m)
            ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.4f}" for v in vals], fontsize=7,
                         rotation=90, padding=2)
        ax.margins(y=0.25)  # room for the labels
        ax.set_xticks(np.arange(len(tasks)) + width * (len(models) - 1) / 2)
        ax.set_xticklabels([f"{t}\n{report['tasks'][t]['main']}" for t in tasks])
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        if str(path) == "-":
            fig.savefig(sys.stdout.buffer, format="png", bbox_inches="tight")
            sys.stdout.flush()
        else:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, bbox_inches="tight")
            log(f"eval plot -> {path}")  # as the results file is told
    finally:
        plt.close(fig)
