"""The `hmcl` command: thin functions over hmcl_cli.stages (no logic here)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from hmcl_cli.console import console, err_console, output_on_stderr
from hmcl_cli.errors import HmclError, InterruptedRun, from_system_error


def _reflowed(text: str | None) -> str | None:
    """Help text with each paragraph's source line breaks joined: typer's rich help keeps a
    docstring's single line breaks after its first paragraph, so a wrapped sentence printed
    broken in the middle of a line. A paragraph whose lines are indented (an example) keeps them."""
    if not text:
        return text
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if any(ln.startswith(" ") for ln in p.splitlines()[1:]) else " ".join(p.split("\n"))
                       for p in paragraphs)


class _HelpFlag:
    """Help as a flag with no value (typer 0.29 labels it `--help <bool>`), and reflowed help text."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflowed(self.help)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_HelpFlag, typer.core.TyperCommand):
    pass


class _Group(_HelpFlag, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="hmcl",
    help="Adapt text-embedding models to your task with Hierarchical Multilevel Contrastive Learning.\n\n"
    "Quickstart:  hmcl run recipes/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(cls=_Group, help="List, copy, write (from your data), validate and document recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

STATE = {"debug": False}
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set train.epochs=2 (repeatable).")
RecipeArg = typer.Argument(..., metavar="RECIPE", help="Recipe YAML file.", show_default=False)


def _version(value: bool) -> None:
    if value:
        from hmcl_cli.environment import environment, environment_lines

        console.print("\n".join(environment_lines(environment())), highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="", help="Print the version, with Python's, the device and the packages' (for a bug report)."),
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks on errors."),
) -> None:
    STATE["debug"] = debug


def _load(recipe: Path, overrides: Optional[List[str]]):
    from hmcl_cli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


@app.command(cls=_Command, epilog="Example:  hmcl prepare recipes/sts-nli-en.yaml --set data.dev_fraction=0.05")
def prepare(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt) -> None:
    """Turn the recipe's data sources into graded train/dev(/test) JSONL + stats.json."""
    from hmcl_cli.stages import run_prepare

    run_prepare(_load(recipe, set_))


@app.command(cls=_Command, epilog="Example:  hmcl mine recipes/quickstart.yaml --set mine.num_negatives=5")
def mine(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt) -> None:
    """Mine hard negatives and weak-positives for the prepared data with the recipe's model."""
    from hmcl_cli.stages import run_mine

    run_mine(_load(recipe, set_))


@app.command(
    cls=_Command,
    context_settings={"allow_extra_args": True},
    epilog="Examples:  hmcl train recipes/quickstart.yaml --set train.max_steps=50\n\n"
    "hmcl train recipes/qwen-lora.yaml --plan\n\n"
    "hmcl train recipes/qwen-lora.yaml --launcher accelerate -- --num_processes 8",
)
def train(
    ctx: typer.Context,
    recipe: Path = RecipeArg,
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue from the last good checkpoint (of the same training data); without it a training starts over."),
    launcher: Optional[str] = typer.Option(None, "--launcher", metavar="auto|none|accelerate", help="Run under `accelerate launch` (its arguments after --), or not; auto: with several GPUs."),
    plan: bool = typer.Option(False, "--plan", metavar="", help="Print the memory plan (peak per device, knobs to fit) and exit."),
) -> None:
    """Train with the HMCL objective (relaunches under `accelerate launch` on several GPUs)."""
    from hmcl_cli.stages import maybe_relaunch, run_train

    launcher_args = _after_separator(list(ctx.args))
    r = _load(recipe, set_)
    if plan:
        from hmcl_cli.training.memory import plan_memory

        p = plan_memory(r)
        console.print(p.summary(), markup=False)
        for line in p.advice:
            console.print(f"  to fit: {line}", markup=False)
        return
    if launcher not in (None, "auto", "none", "accelerate"):
        raise typer.BadParameter(f"{launcher!r} is not one of auto, none, accelerate", param_hint="--launcher")
    code = maybe_relaunch(r, str(recipe), set_ or [], resume, launcher, launcher_args, debug=STATE["debug"])
    if code is not None:
        raise typer.Exit(code)
    run_train(r, resume=resume)


def _after_separator(extra: list[str]) -> list[str]:
    """The arguments for ``accelerate launch``: those after ``--``. Anything else left over (a
    second recipe, a stray word) is a usage error, not an argument handed to the launcher, which
    would start a multi-process launch for a typo."""
    argv = sys.argv[1:]
    tail = argv[argv.index("--") + 1:] if "--" in argv else []
    if extra and extra != tail[len(tail) - len(extra):]:
        stray = extra[: len(extra) - len(tail)] if tail else extra
        raise typer.BadParameter(
            f"unexpected argument(s) {' '.join(stray)!r}: `hmcl train` takes one recipe; options "
            "for `accelerate launch` go after `--` (hmcl train RECIPE --launcher accelerate -- --num_processes 8)")
    return extra


@app.command(
    cls=_Command,
    name="eval",
    epilog="Examples:  hmcl eval recipes/quickstart.yaml\n\n"
    "hmcl eval --model runs/x/model --model base=sentence-transformers/all-MiniLM-L6-v2 "
    "--sts dev.csv --reranking dev.jsonl --json out.json --gate 'sts:spearman>=base+0.005'\n\n"
    "hmcl eval --model runs/x --sts dev.csv --dim 128 --dim 64   (also scored cut to 128 and 64 dimensions)",
)
def eval_(
    recipe: Optional[Path] = typer.Argument(None, metavar="RECIPE", help="Recipe (optional when tasks and models are given as flags; with one, flags add to its tasks and models)."),
    set_: Optional[List[str]] = SetOpt,
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", metavar="[LABEL=]MODEL", help="A model to evaluate (folder, run dir, training checkpoint (RUN/checkpoints/step-N), hub id or ONNX export folder), optionally labelled (else named after its folder, or its run's); repeatable. With a recipe: besides its base and trained model."),
    sts: Optional[List[str]] = typer.Option(None, "--sts", metavar="[NAME=]FILE", help="An STS task: a file of (text, text, score) rows (a pattern of such files, or a folder saved by `datasets`), optionally named."),
    reranking: Optional[List[str]] = typer.Option(None, "--reranking", metavar="[NAME=]FILE", help="A reranking task: a graded JSONL file, a table (CSV/TSV/parquet) of labelled pairs or triplets (or a pattern of such files), or a folder saved by `datasets`, optionally named."),
    retrieval: Optional[List[str]] = typer.Option(None, "--retrieval", metavar="[NAME=]PATH", help="A retrieval task: as --reranking (its candidates pooled into a corpus), or a BEIR folder, optionally named."),
    pair_classification: Optional[List[str]] = typer.Option(None, "--pair-classification", metavar="[NAME=]FILE", help="A pair-classification task: a file of (text, text, 0/1) rows, or NLI labels (entailment the positive class), (a pattern of such files, or a folder saved by `datasets`), optionally named."),
    mteb_task: Optional[List[str]] = typer.Option(None, "--mteb", metavar="TASK", help="MTEB task by name, e.g. STSBenchmark (needs network or a cached dataset)."),
    split: str = typer.Option("test", "--split", metavar="SPLIT", help="Split of --mteb tasks, BEIR --retrieval folders and dataset dicts saved by `datasets`."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, metavar="N", help="Evaluate N queries of each --retrieval and --reranking task (the first by a fixed seeded hash; a retrieval corpus keeps every document)."),
    gate: Optional[List[str]] = typer.Option(None, "--gate", metavar="GATE", help="TASK:METRIC>=MODEL+DELTA or >=VALUE, e.g. sts:spearman>=base+0.005 (repeatable); exit 6 when one fails. It judges the first --model not labelled base (one it compares with: the first other)."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write all results here (with a recipe, also to its run's eval/results.json; `-`: standard output, the table and log then go to stderr)."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Grouped bar chart of each task's main metric (PNG; `-`: standard output)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, metavar="N", help="Encoding batch size (default: the recipe's eval.batch_size, else 128)."),
    dim: Optional[List[int]] = typer.Option(None, "--dim", min=1, metavar="N", help="Also evaluate each model cut to this many dimensions (matryoshka), as <model>@<dim>; repeatable."),
) -> None:
    """Evaluate models side by side (STS, reranking, retrieval, pair classification) with a gate."""
    from hmcl_cli.data.readers import absent
    from hmcl_cli.evaluation.runner import labelled_models, task_names
    from hmcl_cli.recipe import EvalTask, load_recipe
    from hmcl_cli.stages import run_eval

    r = _load(recipe, set_) if recipe else load_recipe(data={"name": "eval", "output_dir": ".", "model": {"name_or_path": "none"}, "eval": {"include_base": False}}, overrides=set_ or [])
    given, missing = [], []
    for kind, items in (("sts", sts), ("reranking", reranking), ("retrieval", retrieval), ("pair_classification", pair_classification)):
        for item in items or []:
            name, _, path = item.rpartition("=")
            if not path.strip():
                raise typer.BadParameter(f"{item!r}: no file given", param_hint=f"--{kind.replace('_', '-')}")
            why = absent(Path(path).resolve())
            if why:  # before any model loads
                missing.append(f"--{kind.replace('_', '-')} {item}: {Path(path).resolve()} {why}")
            given.append((kind, name or None, path))
    # with a recipe, task flags add to its tasks (so its gates still find theirs)
    names = task_names(given, taken=[t.name for t in r.eval.tasks] if recipe else ())
    if json_out is not None and plot is not None and str(json_out) == "-" and str(plot) == "-":
        raise typer.BadParameter("--json - and --plot - would both write to standard output (the JSON and the PNG "
                                 "one after the other, neither readable): give one of them a file", param_hint="--plot")
    if max_queries is not None and not (reranking or retrieval):
        raise typer.BadParameter("it applies to --retrieval and --reranking tasks, and none is given", param_hint="--max-queries")
    tasks = [EvalTask(name=n, type=kind, path=str(Path(path).resolve()), split=split,
                      max_queries=max_queries if kind in ("retrieval", "reranking") else None)
             for n, (kind, _, path) in zip(names, given)]
    if missing:
        from hmcl_cli.errors import DataError

        raise DataError("\n  ".join(["evaluation file(s) not found:", *missing]),
                        hint="paths are relative to the current folder")
    for name in mteb_task or []:
        tasks.append(EvalTask(name=name, type="mteb", mteb_name=name, split=split))
    if recipe and tasks:
        tasks = list(r.eval.tasks) + tasks
    models = labelled_models(model) if model else None
    if batch_size:
        r.eval.batch_size = batch_size
    if dim:
        r.eval.dims = list(dim)
    # a flag-only call (no recipe) writes a file only when asked with --json
    # with a recipe, --model adds to its models (base, eval.compare, fine-tuned): its gates still apply
    from hmcl_cli.io_utils import writes_stdout

    with output_on_stderr(writes_stdout(json_out) or writes_stdout(plot)):  # stdout holds the data alone
        run_eval(r, models=None if recipe else models, more_models=models if recipe else None, json_out=json_out,
                 gates=gate, plot=plot, tasks=tasks or None, in_run_dir=recipe is not None)


@app.command(cls=_Command, epilog="Examples:  hmcl export recipes/quickstart.yaml\n\n"
             "hmcl export --model runs/quickstart --format onnx --out exported/\n\n"
             "hmcl export --model runs/sts --dim 128   # a matryoshka model cut to 128 dimensions\n\n"
             "hmcl export --model runs/sts/checkpoints/step-0000400 -f merged   # the model at a checkpoint\n\n"
             "hmcl export --model runs/quickstart --push-to-hub my-org/support-embedder")
def export(
    recipe: Optional[Path] = typer.Argument(None, metavar="RECIPE", help="Recipe (or use --model)."),
    set_: Optional[List[str]] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", help="Run dir, model dir, model id or a training checkpoint (RUN/checkpoints/step-N: exported to RUN/export/step-N unless --out)."),
    fmt: Optional[List[str]] = typer.Option(None, "--format", "-f", metavar="FORMAT", help="merged | onnx | onnx-int8 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Output folder."),
    dim: Optional[int] = typer.Option(None, "--dim", min=1, metavar="N", help="Cut the embeddings to their first N dimensions (matryoshka; export.dim)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME",
                                              help="Upload the verified exports to this Hugging Face model repo (export.push_to_hub)."),
    public: bool = typer.Option(False, "--public", metavar="", help="With --push-to-hub: create the repo public (default private)."),
) -> None:
    """Export a deployable model (merged sentence-transformers folder, ONNX, int8 ONNX), verified."""
    from hmcl_cli.errors import ModelNotFoundError
    from hmcl_cli.modeling.resolve import resolve_model
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_export

    from hmcl_cli.training.saved_model import is_checkpoint

    checkpoint = Path(model) if model and is_checkpoint(Path(model)) else None
    run_dir = None  # --model RUN_DIR (or one of its checkpoints): its dev data
    if checkpoint:
        run_dir = checkpoint.parent.parent
    elif model and (Path(model) / "data").is_dir():
        run_dir = Path(model)
    r = _load(recipe, set_) if recipe else load_recipe(data={
        "name": run_dir.name if checkpoint else "export", "model": {"name_or_path": model or "none"},
        **({"output_dir": str(run_dir)} if run_dir else {})})
    model_dir = None
    if model and not checkpoint:
        try:
            model_dir = resolve_model(model)  # (a run directory: its model/)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"--model {model}: {e}", hint=e.hint) from None
    elif recipe is None and not checkpoint:
        raise typer.BadParameter("give a RECIPE or --model")
    if dim is not None:
        r.export.dim = dim
    if push_to_hub:
        from hmcl_cli.export.hub import check_push_possible
        from hmcl_cli.recipe import PushConfig

        from pydantic import ValidationError

        from hmcl_cli.errors import RecipeError

        try:
            r.export.push_to_hub = PushConfig(repo=push_to_hub, private=not public)
        except ValidationError:
            raise RecipeError(f"--push-to-hub {push_to_hub!r} is not a model repo id",
                              hint="give OWNER/NAME, e.g. --push-to-hub my-org/support-embedder") from None
        check_push_possible(r.export.push_to_hub)
    elif public:
        raise typer.BadParameter("--public goes with --push-to-hub")
    run_export(r, formats=fmt or None, model_dir=model_dir, out_dir=out, checkpoint=checkpoint)


@app.command(cls=_Command, name="run", epilog="Example:  hmcl run recipes/quickstart.yaml --set train.epochs=2")
def run_cmd(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt,
            resume: bool = typer.Option(False, "--resume", metavar="", help="Go on from where the run stopped: data it prepared and mined is kept (an error if the recipe's data or a source file changed since), training continues from its last checkpoint.")) -> None:
    """Run every stage the recipe enables, in order (prepare, mine, train, eval, export).

    Before the first stage it checks the input files, the packages the stages need, MTEB task
    names and, where the Hugging Face Hub cannot be used, what the run would fetch from it."""
    from hmcl_cli.stages import run_all

    run_all(_load(recipe, set_), resume=resume, launch=(str(recipe), set_ or [], STATE["debug"]))


# ----------------------------------------------------------------------------- recipes
@recipe_app.command(cls=_Command, name="ls", epilog="Example:  hmcl recipe ls")
def recipe_ls() -> None:
    """List the built-in recipes."""
    import yaml

    from hmcl_cli.recipe import builtin_recipes

    for name, path in builtin_recipes().items():
        text = path.read_text()
        model = (yaml.safe_load(text) or {}).get("model", {}).get("name_or_path", "")
        console.print(f"[bold]{name}[/bold]  {escape(model)}  [dim]{escape(recipe_summary(text))}[/dim]")


def recipe_summary(text: str) -> str:
    """A recipe's first sentence: its header comment after the command line(s) that run it."""
    words: list[str] = []
    for ln in text.splitlines():
        if not ln.startswith("#"):
            break
        body = ln[1:].strip()
        if body.startswith("hmcl ") and not words:
            continue
        if not body:
            if words:
                break
            continue
        words.append(body)
        joined = " ".join(words)
        end = joined.find(". ")
        if end >= 0 or joined.endswith("."):
            return joined[: end + 1] if end >= 0 else joined
    return " ".join(words)


@recipe_app.command(cls=_Command, name="cp", epilog="Example:  hmcl recipe cp quickstart my-recipe.yaml")
def recipe_cp(name: str = typer.Argument(..., metavar="NAME", help="Built-in recipe name (`hmcl recipe ls`)."),
              dest: Path = typer.Argument(..., metavar="DEST", help="Destination file or folder.")) -> None:
    """Copy a built-in recipe (and the sample data it uses) to DEST."""
    from hmcl_cli.recipe import copy_builtin_recipe

    target, notes = copy_builtin_recipe(name, dest)
    console.print(f"copied {name} -> {target}", markup=False)
    for note in notes:
        console.print(f"  {note}", markup=False)


@recipe_app.command(cls=_Command, name="new",
                    epilog="Examples:  hmcl recipe new data/faq-train.csv --dev data/faq-dev.csv   ·   "
                           "hmcl recipe new pairs.parquet --model BAAI/bge-small-en-v1.5 --out search.yaml")
def recipe_new(train: List[Path] = typer.Argument(..., metavar="TRAIN", show_default=False, help=(
                   "Training data: files (csv, tsv, jsonl, json, parquet; compressed too), a folder saved by "
                   "`datasets` or a BEIR folder.")),
               dev: Optional[List[Path]] = typer.Option(None, "--dev", metavar="FILE", help=(
                   "Dev data (repeatable); without it dev queries are drawn from the training data.")),
               model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", "--model", metavar="MODEL",
                                         help="Base model: a folder or hub id."),
               name: Optional[str] = typer.Option(None, "--name", metavar="NAME",
                                                  help="The recipe's name (its run folder); default: the first file's."),
               out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE",
                                                  help="Where to write it (default: NAME.yaml here)."),
               lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", metavar="", show_default=False, help=(
                   "Train LoRA adapters instead of every weight (default: where the model is here and is a "
                   "decoder LLM).")),
               encoding: str = typer.Option("utf-8", "--encoding", metavar="CODEC", help=(
                   "The files' text encoding (a file that is not UTF-8 is read as cp1252, as Excel saves a CSV, "
                   "unless this names another: latin-1, utf-16, ...).")),
               force: bool = typer.Option(False, "--force", metavar="", help="Replace an existing file.")) -> None:
    """Write a recipe for your data files: each file's format, columns and scale are read from the
    file itself, each guess is commented in the recipe with its reason, and the recipe is checked
    before it is written."""
    from hmcl_cli.new_recipe import new_recipe

    path, said = new_recipe(train, dev or [], model=model, name=name, out=out, force=force, lora=lora, encoding=encoding)
    for line in said:
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {path}: check its guesses (comments beside each data source), then\n  hmcl run {path}",
                  markup=False, highlight=False)


@recipe_app.command(cls=_Command, name="validate", epilog="Example:  hmcl recipe validate my-recipe.yaml --set train.epochs=3")
def recipe_validate(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt,
                    show: bool = typer.Option(False, "--show", metavar="", help="Print the resolved recipe.")) -> None:
    """Check a recipe (keys, types, references, paths; the model, if it is here) without running anything."""
    from hmcl_cli.stages import check_inputs, check_mteb_names, check_model, hub_needs

    r = _load(recipe, set_)
    check_inputs(r, str(recipe))
    needs = check_mteb_names(hub_needs(r), str(recipe))
    model = check_model(r)
    if show:
        console.print(r.to_yaml(), markup=False)
    from rich.markup import escape

    console.print(f"[green]ok[/green] {escape(str(recipe))} (model {escape(model)})")
    if needs:  # not an error here: the run may have network where this does not
        console.print("fetched from the Hugging Face Hub when it runs (network needed then):\n  "
                      + "\n  ".join(escape(line) for _, line, _ in needs))


@recipe_app.command(cls=_Command, name="schema",
                    epilog="Examples:  hmcl recipe schema mine   ·   hmcl recipe schema batch_size   ·   "
                           "hmcl recipe schema --format json > hmcl-recipe.schema.json")
def recipe_schema(keys: Optional[List[str]] = typer.Argument(None, metavar="KEY", help=(
                      "Only these keys and the keys under them (`mine`, `train.learning_rate`), or every key "
                      "a name ends (`batch_size`).")),
                  fmt: str = typer.Option("markdown", "--format", metavar="markdown|json", help=(
                      "markdown: a table of every key; json: the recipes' JSON Schema, for an editor to check and "
                      "complete recipes with (README: Recipes)."))) -> None:
    """Print every recipe key with its type, default and meaning (or the keys each KEY names)."""
    import json

    from hmcl_cli.recipe import editor_json_schema, schema_lookup, schema_markdown

    if fmt not in ("markdown", "json"):
        raise typer.BadParameter(f"{fmt!r} is not a schema format: markdown or json", param_hint="'--format'")
    if fmt == "json":
        if keys:
            raise typer.BadParameter("the JSON Schema is printed whole (an editor reads all of it); leave out KEY, "
                                     "or look KEY up without --format json", param_hint="'KEY'")
        console.print(json.dumps(editor_json_schema(), indent=2), markup=False)
    elif not keys:
        console.print(schema_markdown(), markup=False)
    else:
        rows = [row for key in keys for row in schema_lookup(key)]  # every KEY looked up before any is printed
        for name, tp, default, text in dict.fromkeys(rows):
            console.print(f"[bold]{escape(name)}[/bold]  {escape(tp)}"
                          + (f"  (default {escape(default)})" if default and default != "required"
                             else "  (required)" if default else ""))
            if text:
                console.print(textwrap.indent(textwrap.fill(text, width=max(40, min(console.width, 100) - 2)), "  "),
                              markup=False, highlight=False)


def main() -> None:
    """Entry point: run the app, turning library errors into one readable message + exit code."""
    from hmcl_cli.modeling.tokenizing import quiet_forks

    quiet_forks()  # forks stay quiet; hmcl's own tokenising still runs on every core
    _quiet_libraries()
    args, debug = _debug_first(sys.argv[1:])
    _sigterm_is_interrupt()
    try:
        try:
            # without standalone mode typer *returns* the exit code of typer.Exit and of Ctrl-C (130)
            code = app(args=args, standalone_mode=False)
            if code == InterruptedRun.exit_code:
                raise KeyboardInterrupt
            if isinstance(code, int) and code:
                _exit(code)
            leave_distributed_child()
        except (MemoryError, OSError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            mapped = from_system_error(e)
            if mapped is None or debug:
                raise
            raise mapped from None
    except HmclError as e:
        if debug:
            raise
        if not _said_by_local_rank_0(e.exit_code):
            err_console.print(f"[bold red]{e.kind}:[/bold red] {escape(str(e))}", markup=True, highlight=False)
            if e.hint:
                err_console.print(f"[dim]hint:[/dim] {escape(str(e.hint))}")
        _exit(e.exit_code)
    except KeyboardInterrupt:
        if not _said_by_local_rank_0(InterruptedRun.exit_code):
            err_console.print("[bold red]interrupted[/bold red] (finished outputs are intact; the unfinished one was "
                              "discarded)")
        _exit(InterruptedRun.exit_code)
    except typer.Exit as e:
        _exit(e.exit_code)
    except typer.Abort:
        _exit(1)
    except Exception as e:
        if isinstance(e, _usage_errors()):  # a misspelt command or option, a missing argument
            e.show()
            _exit(e.exit_code)
        if debug:
            raise
        err_console.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {escape(str(e))}")
        err_console.print("[dim]hint:[/dim] rerun with --debug for the traceback, and please report it")
        _exit(1)


def _said_by_local_rank_0(code: int) -> bool:
    """Whether another process of this machine's training says this error: a recipe, data or
    model error, or an interrupt, is the same in every process of a machine (they read the same
    files), so only local rank 0 prints it (two processes printed it twice). An out-of-memory
    or any other error may be one process's own: every process prints those."""
    from hmcl_cli.errors import DataError, ModelNotFoundError, RecipeError

    same_everywhere = {RecipeError.exit_code, DataError.exit_code, ModelNotFoundError.exit_code,
                       InterruptedRun.exit_code}
    return os.environ.get("LOCAL_RANK", "0") != "0" and code in same_everywhere


def _exit(code: int) -> None:
    """Exit with ``code``, left for the parent first where `hmcl train` relaunched this process."""
    if code:
        from hmcl_cli.stages import record_exit_code

        record_exit_code(code)
    sys.exit(code)


def _debug_first(argv: list[str]) -> tuple[list[str], bool]:
    """The arguments with ``--debug`` moved in front of the command, and whether it was given.
    Errors say "rerun with --debug", and a rerun adds it at the end (``hmcl train r.yaml --debug``),
    where the command's own options are read; what follows ``--`` (the launcher's) stays as it is."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    if "--debug" not in head:
        return argv, False
    return ["--debug", *(a for a in head if a != "--debug"), *tail], True


def _usage_errors() -> tuple[type, ...]:
    """The exception classes of a command-line usage error: click's, and those of the click that
    typer 0.29 and later carry inside (``typer._click``), which are not click's classes."""
    kinds: list[type] = []
    for module in ("typer._click.exceptions", "click.exceptions"):  # typer 0.29 needs no click installed
        try:
            kinds.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(kinds)


def leave_distributed_child(exit_now=os._exit) -> None:
    """End a process that ``accelerate launch`` started for a multi-process run, once its command
    has succeeded, without Python's interpreter teardown.

    By then every output is written and the process group destroyed (the trainer's end), but
    gloo's work objects can still hold tensors that the teardown destroys after the interpreter
    is half gone, which aborts the process ("terminate called without an active exception",
    seen now and then at the end of 2-process FSDP runs whose results were complete) and fails
    the launch. Nothing is left to do, so the process flushes its output and exits at once. A
    process whose group is still alive, or one not started by a launcher, ends normally."""
    import logging

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    from hmcl_cli.stages import unregister_relaunched

    unregister_relaunched()  # (atexit's handlers do not run)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0)


def _sigterm_is_interrupt() -> None:
    """SIGTERM (CI cancel, kill) unwinds like Ctrl-C: temp outputs are removed, locks released,
    and training saves a checkpoint first (it installs its own handler while it runs)."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use)
        pass


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    for name in ("transformers", "accelerate", "datasets", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # by their environment variables (a value the user set stays): importing transformers to set
    # them costs ~0.7 s, which a command that never loads a model (--help, recipe validate) need not pay
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # imported already: the variables were read
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
