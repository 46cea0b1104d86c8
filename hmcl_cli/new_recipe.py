"""``hmcl recipe new``: a recipe written from the data files themselves.

Each file is looked at (:func:`hmcl_cli.data.sniff.guess_source`: its format, columns, score
range or labels) and read back with the guessed settings; the recipe then gets a data source per
file, evaluation tasks and a gate that suit the data (Spearman for scored pairs, nDCG@10 or MAP
for queries with candidates), a training length for its size, and mining where the data has no
negatives. Every guess is written beside its key as a comment saying why, and the recipe is
loaded (validated) before it is put in place::

    from hmcl_cli.new_recipe import new_recipe
    path, said = new_recipe([Path("faq-train.csv")], dev=[Path("faq-dev.csv")])
"""

from __future__ import annotations

import math
import os
import re
from datetime import date
from pathlib import Path
from typing import Any, Optional, Sequence

from hmcl_cli.data.sniff import SAMPLE_ROWS, Guess, guess_source
from hmcl_cli.errors import RecipeError
from hmcl_cli.data.readers import primed
from hmcl_cli.io_utils import data_stem, ensure_dir
from hmcl_cli.recipe import yaml_text

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BATCH = 32  # train.batch_size's default
GROUP = 4  # train.group_size's default
MAX_LENGTH = 128  # model.max_length's default
LONGEST_DEFAULT = 1024  # the longest max length written for a model without a position table (decoders)
TARGET_STEPS = 100  # a small data set is trained for about this many steps (more epochs), at most MAX_EPOCHS
MAX_EPOCHS = 10
MIN_DRAWN_DEV = 100  # dev queries a drawn dev split aims at: data.dev_fraction rises for small data (up to 0.25)
LARGE_DEV = 5000  # a drawn dev split over this many queries is capped (data.dev_max_queries)
# data without negatives is mined where it has at least this many distinct candidates: ten times a
# step's in-batch candidates. The quickstart's questions as bare pairs (64 distinct answers) trained
# level or worse mined (dev nDCG@10 +0.0017 / -0.0026, MAP -0.0195 / -0.0008 over unmined, 2 seeds)
MINE_POOL = 10 * BATCH * GROUP


def new_recipe(train: Sequence[Path], dev: Sequence[Path] = (), model: str = DEFAULT_MODEL,
               name: Optional[str] = None, out: Optional[Path] = None, force: bool = False,
               sample: int = SAMPLE_ROWS, lora: Optional[bool] = None,
               encoding: str = "utf-8") -> tuple[Path, list[str]]:
    """Write a recipe for ``train`` (and ``dev``) files; returns its path and what was decided, in words.
    ``lora``: train LoRA adapters (None: where the model is here and is a decoder LLM); ``encoding``:
    the files' (a file that is not UTF-8 is read as cp1252 unless another is given)."""
    if not train:
        raise RecipeError("no training data named", hint="hmcl recipe new TRAIN_FILE [--dev DEV_FILE]")
    guesses = [guess_source(Path(p), sample, encoding) for p in train]
    dev_guesses = [guess_source(Path(p), sample, encoding) for p in dev]
    name = name or _name_of(Path(train[0]))
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise RecipeError(f"--name {name!r}: a recipe's name becomes its run folder (runs/<name>): use letters, digits, "
                          "`-`, `_` and `.`", hint="e.g. --name faq-search")
    out = Path(out) if out is not None else Path(f"{name}.yaml")
    if out.is_dir():
        out = out / f"{name}.yaml"
    if out.exists() and not force:
        raise RecipeError(f"{out} exists", hint="name another file with --out, or replace it with --force")
    text, said = recipe_text(guesses, dev_guesses, model, name, out, lora)
    from hmcl_cli.recipe import load_recipe

    ensure_dir(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # beside it: the data paths are relative to its folder
    try:
        tmp.write_text(text, encoding="utf-8")
        load_recipe(tmp)  # what was written loads (keys, types, references), or nothing is put in place
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, said


def _name_of(path: Path) -> str:
    """A run name from a data file: ``data/faq-train.csv`` -> ``faq``; ``train.csv`` -> its folder's name."""
    stem = data_stem(path) if path.is_file() else path.name
    stem = re.sub(r"(^|[-_.])(train|training)($|[-_.])", r"\1\3", stem, flags=re.IGNORECASE).strip("-_.")
    if not stem:
        stem = path.resolve().parent.name
    return re.sub(r"[^\w.-]+", "-", stem).strip("-_.") or "my-recipe"


def _rel(path: Path, folder: Path) -> str:
    """``path`` as the recipe names it: a path given relative, relative to the recipe's folder (a
    shared recipe travels with its data); one given absolute stays so."""
    path = Path(path)
    return str(path) if path.is_absolute() else os.path.relpath(path.resolve(), folder.resolve())


def _estimated_queries(g: Guess) -> int:
    """The file's queries: those read, scaled by the rows the whole file holds beyond the sample."""
    if g.total_rows and g.rows:
        return max(g.queries, round(g.queries * g.total_rows / g.rows))
    return g.queries


def _model_here(model: str) -> Optional[tuple[Path, Any]]:
    """The folder and config of a model that is here (a folder, the Hugging Face cache, an installed
    model package); None where it is not (not downloaded yet) or its config cannot be read."""
    from hmcl_cli.errors import HmclError
    from hmcl_cli.modeling.resolve import resolve_model, transformer_folder

    try:
        folder = transformer_folder(resolve_model(model, None, Path.cwd(), download=False))
        from transformers import AutoConfig

        return folder, AutoConfig.from_pretrained(folder)
    except (HmclError, OSError, ValueError):
        return None


def _length_lines(here: Optional[tuple[Path, Any]], model: str, guesses: list[Guess], said: list[str]) -> list[str]:
    """What the model's tokenizer makes of texts drawn from the data: ``query_max_length`` /
    ``doc_max_length`` where they run longer than the default (their 99th percentile, rounded up to
    32, within the model's positions: the default would cut them), and a warning where many of their
    tokens are its unknown token (a vocabulary without their script). Nothing where the model is not
    here (``here``: its folder and config) to count with."""
    if here is None:
        return []
    import torch
    from transformers import AutoTokenizer

    from hmcl_cli.data.prepare import token_length_stats, unknown_tokens_warning
    from hmcl_cli.modeling.encoder import position_limit
    from hmcl_cli.training.memory import meta_model

    folder, config = here
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        limit = position_limit(meta_model(config, 1, torch.float32))
    except (OSError, ValueError):
        return []
    cap = limit or LONGEST_DEFAULT
    texts = {side: [t for g in guesses for t in g.texts.get(side, [])] for side in ("query", "candidate")}
    lengths = token_length_stats(tokenizer, texts, dict.fromkeys(texts, MAX_LENGTH),
                                 limit=max(1, *map(len, texts.values())))
    lines = []
    if warning := unknown_tokens_warning(lengths, model):
        said.append("warning: " + warning)
        lines += [f"  # {ln}" for ln in _wrapped(f"warning: {warning}", 96)]
    for side, st in lengths.items():
        p99, over = st["p99"], st["over_max_length"] / st["texts"]
        if p99 <= MAX_LENGTH:
            continue
        length = min(cap, -(-p99 // 32) * 32)
        name, key = ("queries", "query_max_length") if side == "query" else ("candidates", "doc_max_length")
        lines += [f"  # {name}: 99% of {st['texts']:,} drawn at random within {p99} tokens; the default "
                  f"{MAX_LENGTH} would cut {over:.0%} of them" + (f"; past {cap} (the model's positions) a text is "
                                                                  "cut: model.segments encodes it whole"
                                                                  if length < p99 else ""),
                  f"  {key}: {length}"]
        said.append(f"model.{key} {length}: 99% of the {name} drawn fit in {p99} tokens ({over:.0%} over "
                    f"{MAX_LENGTH}, the default)")
    return lines


def _model_lines(model: str, kind: Optional[str], lora: Optional[bool], said: list[str]) -> list[str]:
    lines = ["model:", f"  name_or_path: {yaml_text(model)}"]
    if lora is None and kind == "decoder":
        lora = True
        lines.append("  # a decoder LLM: LoRA adapters on its projections, activations recomputed in the backward pass")
    elif lora is None and kind is None:
        said.append(f"model {model}: not here (downloaded when the recipe runs), so not looked at: for a decoder LLM "
                    "add --lora (adapters instead of every weight)")
    if lora:
        lines += ["  gradient_checkpointing: true", "  lora:", "    enabled: true",
                  "  # decoders embed best with an instruction on queries, e.g.",
                  "  # query_prompt: \"Instruct: Given a question, retrieve passages that answer it\\nQuery: \""]
        said.append(f"model {model}: LoRA" + (" (a decoder LLM)" if kind == "decoder" else ""))
    return lines


def recipe_text(guesses: list[Guess], dev_guesses: list[Guess], model: str, name: str,
                out: Path, lora: Optional[bool] = None) -> tuple[str, list[str]]:
    """The recipe's YAML text (with comments) and the decisions, in words."""
    folder = out.parent
    said: list[str] = []
    lines = [f"# hmcl run {out.name}",
             f"# Written by `hmcl recipe new` on {date.today().isoformat()} from the data files below; each data",
             "# source says what it was read as and why. Check those guesses, then run the command above",
             "# (`hmcl recipe schema KEY` explains any key).",
             f"name: {yaml_text(name)}", "seed: 42", "output_dir: runs/${name}", ""]
    from hmcl_cli.modeling.encoder import is_decoder_config

    here = _model_here(model)  # (as given: a folder relative to the working directory)
    kind = None if here is None else "decoder" if is_decoder_config(here[1]) else "encoder"
    written = _rel(Path(model), folder) if Path(model).is_dir() else model  # a local folder: relative to the recipe
    lines += (_model_lines(written, kind, lora, said) + _length_lines(here, written, guesses, said)
              + ["", "data:", "  sources:"])
    labels = primed([data_stem(g.path) if g.path.is_file() else g.path.name for g in guesses + dev_guesses])
    for i, (g, label) in enumerate(zip(guesses + dev_guesses, labels)):
        split = "dev" if i >= len(guesses) else ("train" if dev_guesses else None)
        for reason in g.reasons:
            lines += [f"    # {ln}" for ln in _wrapped(reason, 92)]
        rows = f"{g.rows:,} rows read" + (f" of {g.total_rows:,}" if g.total_rows else " (first rows)" if g.more_rows else "")
        lines.append(f"    # {rows}: {g.queries:,} queries; candidates {_levels(g)}")
        if g.rejected:
            lines.append(f"    # rejected by the reader: {g.rejected_rows:,} of these rows, e.g. {g.rejected[0]}")
        lines.append(f"    - name: {yaml_text(label)}")
        lines.append(f"      path: {yaml_text(_rel(g.path, folder))}")
        lines.append(f"      format: {g.format}")
        keys = g.source_keys()
        if split == "dev":  # (read both ways, a dev pair would count twice in its metrics)
            keys.pop("symmetric", None)
        for key, value in keys.items():
            lines.append(f"      {key}: {yaml_text(value)}")
        if split:
            lines.append(f"      split: {split}")
        said.append(f"{g.path}: format {g.format}" + "".join(f", {k} {yaml_text(v)}" for k, v in keys.items())
                    + (f" (split {split})" if split else "") + f" — {g.reasons[0]}")
        if g.rejected:
            said.append(f"  {g.rejected_rows:,} of the {g.rows:,} rows read are rejected by the reader, e.g. "
                        f"{g.rejected[0]}: `hmcl prepare` stops at the first (data.on_error: skip leaves them out, "
                        "counted)")
    train_queries = sum(_estimated_queries(g) for g in guesses)
    if not dev_guesses:
        fraction = 0.1
        if train_queries * fraction < MIN_DRAWN_DEV:
            fraction = min(0.25, math.ceil(100 * MIN_DRAWN_DEV / max(1, train_queries)) / 100)
        dev_queries = round(train_queries * fraction)
        lines += ["  # no dev file: dev queries are drawn from the data (each query by a seeded hash)",
                  f"  dev_fraction: {yaml_text(fraction)}"]
        if dev_queries > LARGE_DEV:
            lines += ["  # every in-training dev evaluation encodes the whole dev split: keep it to this many queries",
                      f"  dev_max_queries: {LARGE_DEV}"]
        train_queries -= min(dev_queries, LARGE_DEV)
        said.append(f"dev: drawn from the data, data.dev_fraction {fraction:g} (about {min(dev_queries, LARGE_DEV):,} "
                    "queries)")
    steps_per_epoch = max(1, math.ceil(train_queries / BATCH))
    epochs = max(1, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    negatives = sum(g.levels["neg"] + g.levels["weak"] for g in guesses)
    pool = sum(g.candidates for g in guesses)  # (at least: the files' samples)
    lines += ["", "mine:"]
    if negatives:
        lines.append("  enabled: false   # the data has its own negatives (`--set mine.enabled=true` mines more)")
    elif pool < MINE_POOL:
        lines += [f"  # the data has no negatives, and {pool:,} distinct candidates: a batch's in-batch negatives (up to",
                  f"  # {BATCH * GROUP} an anchor) already take in much of them, and mining from so few did not help",
                  "  enabled: false"]
        said.append(f"mine: off (no negatives in the data, but only {pool:,} distinct candidates to mine from)")
    else:
        lines += ["  # the data has no negatives: hmcl mine adds hard ones from its own texts (beyond in-batch ones)",
                  "  enabled: true"]
        said.append("mine: on (the training data has no negatives)")
    lines += ["", "train:",
              f"  # about {train_queries:,} training queries: {steps_per_epoch:,} steps of {BATCH} an epoch",
              f"  epochs: {epochs}", f"  batch_size: {BATCH}"]
    per_query = sum(sum(g.levels.values()) for g in guesses) / max(1, sum(g.queries for g in guesses))
    if per_query >= 2 * GROUP:  # many candidates per query (answer selection): more of them a step
        lines.append(f"  group_size: {2 * GROUP}   # {per_query:.0f} candidates per query in the data")
    if epochs == 1 and steps_per_epoch >= 50:
        lines.append(f"  eval_steps: {max(10, steps_per_epoch // 5)}   # dev five times in the epoch; the best is kept")
    tasks, gate, metric, said_eval = _eval_tasks(guesses, dev_guesses, folder)
    lines.append(f"  metric_for_best: {metric}   # the dev metric that picks the model kept (as the gate's)")
    said.append(f"train: {epochs} epoch(s) of about {steps_per_epoch:,} steps; eval: {said_eval}")
    lines += ["", "eval:", "  tasks:"] + tasks + ["  gate:   # exit code 6 when the trained model is worse than the base",
                                                  f"    - {yaml_text(gate)}"]
    lines += ["", "export:", "  formats: [merged]   # onnx, onnx-int8 with `pip install onnx onnxruntime`", ""]
    return "\n".join(lines), said


def _eval_tasks(guesses: list[Guess], dev_guesses: list[Guess], folder: Path) -> tuple[list[str], str, str, str]:
    """Evaluation tasks on the dev data, the gate, the in-training dev metric and a summary: Spearman
    for scored pairs (sts), else retrieval nDCG@10 (and reranking where the data has negatives; MAP
    for answer selection)."""
    if all(g.format == "sts" for g in guesses + dev_guesses):
        out: list[str] = []
        if dev_guesses:  # the dev files as they are: each pair once, with its score
            names = primed([f"{data_stem(g.path)}-sts" for g in dev_guesses])
            for g, task in zip(dev_guesses, names):
                out += [f"    - name: {yaml_text(task)}", "      type: sts", f"      path: {yaml_text(_rel(g.path, folder))}"]
                out += [f"      {k}: {yaml_text(v)}" for k, v in g.source_keys().items() if k != "symmetric"]
            return out, f"{names[0]}:spearman>=base", "dev_spearman", f"Spearman on {', '.join(names)}"
        out = ["    - name: dev-sts", "      type: sts", "      path: dev   # the prepared dev split",
               "      format: graded"]
        return out, "dev-sts:spearman>=base", "dev_spearman", "Spearman on the drawn dev split"
    negatives = any(g.levels["neg"] for g in guesses + dev_guesses)
    out = ["    - name: dev-retrieval", "      type: retrieval", "      path: dev   # the prepared dev split"]
    if negatives:
        out += ["    - name: dev-reranking", "      type: reranking", "      path: dev"]
    if negatives and all(g.format == "answer_selection" for g in guesses):
        return out, "dev-reranking:map>=base", "dev_map", "reranking MAP (and retrieval) on dev"
    return (out, "dev-retrieval:ndcg@10>=base", "dev_ndcg@10",
            "retrieval nDCG@10" + (" and reranking" if negatives else "") + " on dev")


def _levels(g: Guess) -> str:
    return ", ".join(f"{k} {g.levels[k]:,}" for k in ("pos", "weak", "neg") if g.levels[k]) or "none"


def _wrapped(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]
