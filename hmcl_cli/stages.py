"""The pipeline stages as plain functions (the CLI calls these; so can Python code).

Every stage reads the recipe, writes into the run directory under a lock, saves the resolved
recipe there, and can be re-run alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Optional, Sequence

from rich.markup import escape

from hmcl_cli.console import err_console, log, warn
from hmcl_cli.errors import (PROCESS_LOST_HINT, DataError, HmclError, InterruptedRun, ModelNotFoundError,
                             ProcessLostError, RecipeError, StorageError, error_of_exit_code, from_system_error)
from hmcl_cli.data.origin import listed
from hmcl_cli.io_utils import RunLock, ensure_dir, folder_stamp, is_stream, write_text_atomic
from hmcl_cli.recipe import TRAINED_RECIPE, EvalTask, ExportFormat, Recipe
from hmcl_cli.training import RELAUNCHED_ENV

EXPORT_FORMATS = typing.get_args(ExportFormat)


def _start(recipe: Recipe) -> None:
    run = recipe.run_dir
    ensure_dir(run)
    write_text_atomic(run / "recipe.resolved.yaml", recipe.to_yaml())


def run_prepare(recipe: Recipe, progress: bool = True) -> dict:
    from hmcl_cli.data.prepare import prepare, print_stats

    with RunLock(recipe.run_dir):
        _start(recipe)
        tokenizer = None
        try:
            from transformers import AutoTokenizer

            from hmcl_cli.modeling.resolve import resolve_transformer

            tokenizer = AutoTokenizer.from_pretrained(resolve_transformer(recipe.model.name_or_path, recipe.model.revision, recipe.base_dir))
        except HmclError as e:
            warn(f"token-length stats skipped: {e}")
        except Exception as e:  # noqa: BLE001
            warn(f"token-length stats skipped: tokenizer did not load ({type(e).__name__})")
        stats = prepare(recipe, tokenizer=tokenizer, progress=progress)
        print_stats(stats)
        return stats


def run_mine(recipe: Recipe) -> dict:
    from hmcl_cli.mining import mine

    check_prepared(recipe)
    with RunLock(recipe.run_dir):
        _start(recipe)
        return mine(recipe)


def _data_changes(recipe: Recipe) -> list[str]:
    """What changed in the recipe's data since its run's prepare (:mod:`hmcl_cli.data.origin`);
    empty when nothing did or when there is no record to compare with."""
    from hmcl_cli.data.origin import origin_changes

    stats = recipe.run_dir / "data" / "stats.json"
    return (origin_changes(recipe, stats) if stats.is_file() else None) or []


def _check_mined(recipe: Recipe) -> None:
    """A warning when the training data was mined with other settings or corpus files than the
    recipe's now (a mine or model setting, or a ``mine.corpus`` file, edited after `hmcl mine`):
    training uses the candidates mined then; or not mined at all while the recipe enables mining."""
    from hmcl_cli.data.origin import mining_changes

    report = recipe.run_dir / "data" / "mining_report.json"
    if recipe.mine.enabled and not report.is_file() and (report.parent / "train.jsonl").is_file():
        warn(f"the recipe enables mine, but the training data in {report.parent} is not mined (`hmcl prepare` wrote "
             "it after the last `hmcl mine`, or mining never ran): training goes on without mined hard negatives; "
             "`hmcl mine RECIPE` first adds them (`hmcl run` runs every stage in order)")
    changes = (mining_changes(recipe, report) if report.is_file() else None) or []
    if changes:
        warn(f"the training data in {report.parent} was mined with other settings or corpus files than the recipe's now "
             f"({listed(changes, 3)}): its mined candidates are those; `hmcl prepare` then `hmcl mine` to mine "
             "them again")


def check_prepared(recipe: Recipe, resumed: bool = False) -> None:
    """A DataError when the run's prepared data was made from other data than the recipe names
    now (its data settings, or a source file changed since ``hmcl prepare``): mining or training
    would use the old data without a word (:mod:`hmcl_cli.data.origin`)."""
    changes = _data_changes(recipe)
    if not changes:
        return
    hint = ("run it without --resume: the data is prepared again and training starts over" if resumed else
            "run `hmcl prepare RECIPE` (with the same --set options) to prepare it again, or `hmcl run RECIPE`")
    raise DataError(f"{recipe.run_dir / 'data'} was prepared from other data than the recipe names now:\n  "
                    + listed(changes, 8, "\n  "), hint=hint)


def under_launcher() -> bool:
    """Whether this process runs under a launcher: torchrun's (several processes), accelerate's, or
    hmcl's own relaunch (accelerate's one-process launch sets neither rank variable: `train.launcher:
    accelerate` on one device relaunched itself without end)."""
    return any(v in os.environ for v in ("LOCAL_RANK", "ACCELERATE_PROCESS_ID", RELAUNCHED_ENV))


def relaunch_command(recipe_path: str, overrides: list[str], resume: bool, launcher_args: list[str],
                     config_file: Optional[str], num_processes: int, debug: bool = False) -> list[str]:
    """The `accelerate launch` command that runs this `hmcl train` in ``num_processes`` processes
    per machine (the GPUs here), unless the user's arguments or config file say otherwise.

    accelerate's ``--num_processes`` counts the processes of all machines: with ``--num_machines
    M`` and no ``--num_processes``, it is ``num_processes x M``. The launcher runs ``--quiet`` (a
    failed child's error is its own, without the launcher's traceback), except with ``debug``,
    which the relaunched `hmcl train` gets too."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    # a config file of the user's (the recipe's, or one among the launcher's arguments) sets the counts
    configured = bool(config_file) or _launcher_value(launcher_args, "--config_file") is not None
    machines = _as_int(_launcher_value(launcher_args, "--num_machines")) or 1
    given = _launcher_value(launcher_args, "--num_processes")
    total = _as_int(given)
    if not configured and given is None:
        total = num_processes * machines
        cmd += ["--num_processes", str(total)]
    modes = ("--multi_gpu", "--cpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm", "--tpu", "--config_file")
    if not configured and not any(a.split("=")[0] in modes for a in launcher_args) and (total or 1) > 1:
        # accelerate's torchrun path; on a CPU-only machine the processes form a gloo group
        cmd.append("--multi_gpu")
    if not (configured or accelerate_default_config()):
        # accelerate's defaults, given (it warns of each one it assumes), where no config file of the
        # user's (named, or accelerate's default one) sets them: given, they would override it
        cmd += [flag for name, value in (("--num_machines", "1"), ("--mixed_precision", "no"), ("--dynamo_backend", "no"))
                if _launcher_value(launcher_args, name) is None for flag in (name, value)]
    if not debug and not any(a in ("--quiet", "-q", "--debug") for a in launcher_args):
        cmd.append("--quiet")  # the launcher's traceback of a failed child only repeats its error
    cmd += list(launcher_args) + ["-m", "hmcl_cli", *(["--debug"] if debug else []), "train", recipe_path]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    return cmd


def default_config_note(launcher_args: list[str], config_file: Optional[str], num_processes: int) -> str:
    """What a relaunch says where `accelerate config` left a default config that accelerate reads
    and hmcl's process count overrides ('' where none does): the count there may be another."""
    if config_file or not accelerate_default_config() or any(
            _launcher_value(launcher_args, name) is not None for name in ("--config_file", "--num_processes")):
        return ""
    from accelerate.commands.config import default_config_file

    machines = _as_int(_launcher_value(launcher_args, "--num_machines")) or 1
    return (f"accelerate's default config ({default_config_file}) is read for its other settings; the process count "
            f"is hmcl's: {num_processes * machines} (every GPU here; `-- --num_processes N` or train.accelerate_config "
            "for another)")


def accelerate_default_config() -> bool:
    """Whether `accelerate config` left a default config file, which `accelerate launch` reads."""
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return False
    return os.path.isfile(default_config_file)


def _launcher_value(launcher_args: list[str], name: str) -> Optional[str]:
    """The value of ``name`` among accelerate arguments (``--name V`` or ``--name=V``; '' when it
    has none), or None when the argument is absent."""
    for i, a in enumerate(launcher_args):
        if a == name or a.startswith(name + "="):
            return a.split("=", 1)[1] if "=" in a else (launcher_args[i + 1] if i + 1 < len(launcher_args) else "")
    return None


def _as_int(value: Optional[str]) -> Optional[int]:
    """A launcher argument's number; None when absent or not a number (accelerate reports that)."""
    return int(value) if value and value.isdigit() else None


def maybe_relaunch(recipe: Recipe, recipe_path: Optional[str], overrides: list[str], resume: bool,
                   launcher: Optional[str], launcher_args: list[str], debug: bool = False,
                   command: str = "train") -> Optional[int]:
    """Relaunch `hmcl train` under `accelerate launch` when asked or when several GPUs exist.
    ``command``: the hmcl command the user ran (`train`, `run`), which an interrupted training
    names to continue with."""
    if under_launcher() or recipe_path is None:
        return None
    mode = launcher or recipe.train.launcher
    import torch

    n_gpus = torch.cuda.device_count()
    if mode == "none" or (mode == "auto" and n_gpus < 2 and not launcher_args):
        return None
    cfg = str(recipe.resolve(recipe.train.accelerate_config)) if recipe.train.accelerate_config else None
    cmd = relaunch_command(recipe_path, overrides, resume, launcher_args, cfg, max(1, n_gpus), debug=debug)
    log("relaunching: " + " ".join(cmd[1:]))
    note = default_config_note(launcher_args, cfg, max(1, n_gpus))
    if note:
        log(note)
    with tempfile.TemporaryDirectory(prefix="hmcl-launch-") as folder:
        exit_file = Path(folder) / EXIT_FILE_NAME
        env = {**os.environ, EXIT_FILE_ENV: str(exit_file), RELAUNCHED_ENV: command, PID_DIR_ENV: folder}
        if os.name == "posix":
            code, signalled = _wait_passing_on_signals(subprocess.Popen(cmd, env=env, start_new_session=True), Path(folder))
        else:
            code, signalled = subprocess.call(cmd, env=env), False
        return relaunch_exit_code(code, signalled, Path(folder), recipe)


def relaunch_exit_code(code: int, signalled: bool, folder: Path, recipe: Recipe) -> int:
    """The exit code of a relaunched training, from the launcher's (``code``; ``signalled``: hmcl
    passed a signal on) and what its processes left in ``folder``: the exit code the first one to
    fail wrote (:func:`record_exit_code`), and the marks of those that ended without a word
    (:func:`lost_processes`), which are named here."""
    exit_file, written = folder / EXIT_FILE_NAME, None
    if code and exit_file.is_file():  # the launcher exits 1 whatever the training's error was
        with contextlib.suppress(ValueError):
            code = written = int(exit_file.read_text())
    elif code and signalled:  # the launcher itself was stopped (torchrun: 254), not a training
        code = InterruptedRun.exit_code
    lost = lost_processes(folder) if code and not signalled else []
    if lost:  # the others said they lost one; this says which, and what ends a process so
        reported = written not in (None, ProcessLostError.exit_code)  # a first process's own error (5, 9, 1...)
        say_lost(lost, recipe, code if reported else None)
        if not reported:
            code = ProcessLostError.exit_code
    return code


def say_lost(lost: list[tuple[str, int]], recipe: Recipe, reported: Optional[int] = None) -> None:
    """The closing words on training processes that ended without a word (:func:`lost_processes`);
    ``reported``: the exit code of an error another process said first (out of memory on its GPU,
    say), which the launcher answers by stopping the others, killing those it cannot stop (a
    process waiting on its device for a collective with the failed one)."""
    from hmcl_cli.training.saved_model import checkpoints_in

    which = ", ".join(f"rank {rank} (pid {pid})" if rank != "?" else f"(pid {pid})" for rank, pid in lost)  # (one: no rank)
    ckpts = checkpoints_in(recipe.run_dir / "checkpoints")
    last = f"; the last checkpoint is {ckpts[-1].name}" if ckpts else "; no checkpoint was written yet"
    why = (f" after another process's error (exit code {reported}, its message is above): the launcher stops the other "
           "processes once one fails, and kills those that do not stop" if reported is not None
           else ": killed by a signal it cannot catch, or crashed in native code")
    err_console.print(f"[bold red]{ProcessLostError.kind}:[/bold red] training process {escape(which)} ended without a "
                      f"message{why}{last}", highlight=False)
    if reported is None:
        err_console.print(f"[dim]hint:[/dim] {escape(PROCESS_LOST_HINT)}", highlight=False)


def _wait_passing_on_signals(proc: subprocess.Popen, pid_dir: Path) -> tuple[int, bool]:
    """Wait for the launcher ``proc`` (started in a session of its own) and the training
    processes it started (each leaves its pid in ``pid_dir``: :func:`register_relaunched`);
    return the launcher's exit code and whether a signal was passed on.

    A Ctrl-C or SIGTERM reaches hmcl alone (the launcher's session has no terminal). hmcl passes
    it on as SIGINT to the training processes themselves, which finish their step and save a
    checkpoint (a second: they stop at once; a third kills them and the launcher), and waits for
    them. Not to the launcher: accelerate's one-process launcher answers a signal by terminating
    its trainer and killing it 5 s later, mid-save. Before, a SIGTERM to hmcl (a CI job
    cancelled) ended hmcl alone and left the training running on without it, holding the run
    directory."""
    import signal
    import time

    signals = 0
    while True:
        try:
            code = proc.wait()
            while _running(_registered(pid_dir)):  # a training process the launcher did not wait for
                time.sleep(0.2)
            return code, signals > 0
        except KeyboardInterrupt:
            signals += 1
            trainers = _registered(pid_dir)
            for pid in trainers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL if signals >= 3 else signal.SIGINT)
            if signals >= 3 or not trainers:  # (none started yet: the launcher's group goes as a whole)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL if signals >= 3 else signal.SIGTERM)
            if signals == 1 and trainers:
                warn("stop requested: the relaunched training finishes its step and saves a checkpoint "
                     "(again to stop it at once)")


PID_DIR_ENV = "HMCL_PID_DIR"  # where each process of a relaunched training leaves its pid for hmcl


def register_relaunched() -> None:
    """In a training process hmcl relaunched: leave this process's pid where the waiting hmcl
    passes signals on to it (:func:`_wait_passing_on_signals`).

    The mark holds the process's rank and goes when it exits through Python (an error too): one
    left behind by a process no longer running names a process that was killed or crashed
    (:func:`lost_processes`)."""
    folder = os.environ.get(PID_DIR_ENV)
    if folder and os.path.isdir(folder):
        import atexit

        mark = Path(folder, f"pid-{os.getpid()}")
        with contextlib.suppress(OSError):
            mark.write_text(os.environ.get("RANK", "?"))
            atexit.register(unregister_relaunched)  # gone with the process: its pid may be reused


def unregister_relaunched() -> None:
    """This process ends as it should (atexit, and an exit that skips atexit): its mark goes."""
    folder = os.environ.get(PID_DIR_ENV)
    if folder:
        Path(folder, f"pid-{os.getpid()}").unlink(missing_ok=True)


def lost_processes(pid_dir: Path) -> list[tuple[str, int]]:
    """(rank, pid) of each training process that left its mark and no longer runs: it ended
    without Python's exit (SIGKILL, a crash in native code)."""
    lost = []
    for pid in sorted(_registered(pid_dir)):
        if not _running([pid]):
            with contextlib.suppress(OSError):
                lost.append((Path(pid_dir, f"pid-{pid}").read_text().strip() or "?", pid))
    return sorted(lost, key=lambda lp: (int(lp[0]) if lp[0].isdigit() else 1 << 30, lp[1]))  # rank 2 before 10


def _registered(pid_dir: Path) -> list[int]:
    return [int(p.name[4:]) for p in pid_dir.glob("pid-*") if p.name[4:].isdigit()]


def _running(pids: list[int]) -> bool:
    """Whether any of ``pids`` still runs (a zombie, which only waits for its parent to reap it,
    does not count)."""
    have_proc = Path("/proc").is_dir()
    for pid in pids:
        if have_proc:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # after "pid (name)"
            except (OSError, IndexError):
                continue  # gone
            if state not in ("Z", "X"):
                return True
            continue
        try:  # no /proc (macOS)
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
    return False


EXIT_FILE_NAME = "exit-code"  # in the relaunch's folder
EXIT_FILE_ENV = "HMCL_EXIT_FILE"  # where a relaunched `hmcl train` leaves its exit code for its parent


def record_exit_code(code: int) -> None:
    """In a process that `hmcl train` relaunched: leave the exit code (2 recipe, 3 data, 5 out of
    memory...) for the parent, which `accelerate launch` would otherwise hand exit code 1 alone
    (a CI job could not tell a data error from a diverged loss). The first process to fail wins."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path or not code:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(code))


def check_base_is_not_an_output(recipe: Recipe) -> None:
    """The base model must not live where the run writes: with ``output_dir: .`` and
    ``model.name_or_path: ./model``, training replaced the user's base model folder with the trained
    one (and the eval's `base` column became the trained model)."""
    from hmcl_cli.export import export_folder
    from hmcl_cli.modeling.resolve import resolve_model

    try:  # where the base is (a run directory stands for its model/), if it is here
        here = resolve_model(recipe.model.name_or_path, recipe.model.revision, recipe.base_dir, download=False)
    except ModelNotFoundError:
        return  # not here yet (a hub model), or not a model: loading it says so
    run = recipe.run_dir.resolve()
    written = {run / "model": "the trained model", run / "best": "the best checkpoint's model",
               run / "checkpoints": "checkpoints"}
    written.update({run / "export" / export_folder(f): f"the {f} export" for f in EXPORT_FORMATS})
    hit = next((what for folder, what in written.items() if here == folder or folder in here.parents), None)
    if hit:
        raise RecipeError(
            f"model.name_or_path {recipe.model.name_or_path} is where this run writes {hit} ({here}): training "
            "would replace the model it starts from",
            hint="set output_dir to another folder (the default is runs/${name}), or copy the base model "
                 "out of the run directory")


def run_train(recipe: Recipe, resume: bool = False) -> Path:
    from hmcl_cli.training.trainer import HMCLTrainer

    check_base_is_not_an_output(recipe)
    check_prepared(recipe)
    _check_mined(recipe)

    register_relaunched()
    trainer = HMCLTrainer(recipe)
    main = os.environ.get("RANK", "0") == "0"  # under `accelerate launch` only rank 0 owns the run dir
    with RunLock(recipe.run_dir) if main else contextlib.nullcontext():
        if main:
            _start(recipe)
        trainer.setup(resume=resume)
        trainer.train()
        return trainer.save_final()


def model_loader(recipe: Recipe, recipe_base: Optional[str] = None):
    """How eval loads a model given by name: as saved (its own pooling, prompts and lengths), with
    the recipe's segments; a run directory is its trained model, an ONNX export folder runs its
    graph (:func:`local_model`, :class:`~hmcl_cli.export.onnx.OnnxModel`), a training checkpoint
    is the model training had at its step (:mod:`hmcl_cli.training.saved_model`). The label
    ``recipe_base`` is the recipe's base model: loaded with the recipe's model settings, as
    training starts from it (the step-0 dev score) and as mining encodes with it, so its row is
    the model before training, not another embedder. (A decoder LLM's own
    defaults have no instruction and other lengths: a tiny Qwen with the qwen-lora recipe scored
    0.1136 nDCG@10 on dev before training and 0.1415 as loaded plainly, which made a trained
    model that had gained look worse than the base.)"""
    from hmcl_cli.modeling.encoder import EmbeddingModel

    def load(name: str, label: Optional[str] = None):
        base_dir = recipe.base_dir if recipe._source else None
        if label is not None and label == recipe_base:
            return EmbeddingModel.from_recipe(recipe.model, base_dir, name_or_path=name)
        from hmcl_cli.export import is_onnx_export
        from hmcl_cli.export.onnx import OnnxModel
        from hmcl_cli.training.saved_model import checkpoint_model, is_checkpoint

        folder = local_model(name, base_dir)
        if folder is not None and is_onnx_export(folder):  # an export judged on the tasks beside the torch model
            model = OnnxModel(folder)
        elif folder is not None and is_checkpoint(folder):  # the model training had at that step
            model = checkpoint_model(folder)
        else:  # (a run directory: resolve_model takes its model/)
            model = EmbeddingModel.load(name, base_dir=base_dir, trust_remote_code=recipe.model.trust_remote_code)
        model.use_segments(recipe.model.segments)  # the recipe's segmentation applies to every model compared
        return model

    return load


def run_eval(recipe: Recipe, models: Optional[dict[str, str]] = None, json_out: Optional[Path] = None,
             gates: Optional[list[str]] = None, plot: Optional[Path] = None,
             tasks: Optional[list[EvalTask]] = None, in_run_dir: bool = True,
             more_models: Optional[dict[str, str]] = None) -> dict:
    """Evaluate the run's model (and the base, and any extra models) on the recipe's tasks;
    ``models`` instead of those, or ``more_models`` beside them (a label of theirs replaces theirs).

    Results go to ``<run>/eval/results.json`` (``in_run_dir``), and to ``json_out`` too."""
    from hmcl_cli.evaluation.runner import (check_gates, enforce_gates, evaluate, judged_model, plot_report,
                                             print_table, save_report)
    from hmcl_cli.training.saved_model import checkpoints_in

    _check_eval_outputs(json_out, plot)
    cfg = recipe.eval
    tasks = tasks if tasks is not None else cfg.tasks
    if not tasks:
        raise RecipeError("no evaluation tasks", hint="add eval.tasks to the recipe or pass --sts/--reranking/--retrieval")
    recipe_base = None
    if models is None:
        models = {}
        if cfg.include_base:
            models["base"], recipe_base = recipe.model.name_or_path, "base"
        models.update(cfg.compare)
        trained = recipe.run_dir / "model"
        if trained.is_dir():
            models["fine-tuned"] = str(trained)
        elif in_run_dir and (found := checkpoints_in(recipe.run_dir / "checkpoints")):
            warn(f"{trained} does not exist: its training has not finished (last checkpoint: {found[-1].name}); "
                 f"`--model {found[-1]}` scores the model at that checkpoint")
        for label, name in (more_models or {}).items():
            if label == recipe_base:
                recipe_base = None  # a base named on the command line is loaded as saved
            models[label] = name
    if not models:
        raise RecipeError("no models to evaluate" + (f": {recipe.run_dir / 'model'} is not trained yet and "
                                                     "eval.include_base is off" if in_run_dir else ""),
                          hint="name one with --model (a model folder, a run directory or a hub id)"
                          + (", or train the recipe first" if in_run_dir else ""))
    run_data = recipe.run_dir / "data"

    def resolve(p: str) -> Path:
        if p in ("dev", "test", "train"):
            return run_data / f"{p}.jsonl"
        return recipe.resolve(p)

    changes = _data_changes(recipe) if any(t.path in ("dev", "test", "train") for t in tasks) else []
    if changes:  # a warning: the evaluation itself is sound, on the data as it was prepared
        warn(f"eval reads the prepared splits in {run_data}, made from other data than the recipe names now "
             f"({listed(changes, 3)}); `hmcl prepare` to renew them")
    from hmcl_cli.data.readers import absent

    missing = [(t, why) for t in tasks if t.type != "mteb" and t.path for why in [absent(resolve(t.path))] if why]
    if missing:  # before any model loads (each task failed per model, after loading them)
        splits = [t for t, _ in missing if t.path in ("dev", "test", "train")]
        hint = "; ".join((["a task with path dev or test reads the run's prepared split: run `hmcl prepare RECIPE` "
                           "first"] if splits else [])
                         + (["fix eval.tasks[].path (relative to the recipe file)"] if len(splits) < len(missing) else []))
        raise DataError("\n  ".join(["evaluation file(s) not found:",
                                      *(f"task {t.name!r}: {resolve(t.path)} {why}" for t, why in missing)]),
                        hint=hint)
    from hmcl_cli.modeling.resolve import missing_local_model, path_hint

    base_dir = recipe.base_dir if recipe._source else None
    lost = [(label, name) for label, name in models.items() if missing_local_model(name, base_dir)]
    if lost:  # before any other model is loaded and evaluated
        raise ModelNotFoundError("\n  ".join(["model folder(s) not found:",
                                               *(f"{label}: {name} does not exist" for label, name in lost)]),
                                 hint=path_hint(base_dir))
    unknown = [f"{tasks[i].name}: {said}" for i, said, _ in mteb_needs(tasks, cached=False)]
    if unknown:  # before any model is loaded
        raise RecipeError("unknown MTEB task name:\n  " + "\n  ".join(unknown), hint="`mteb.get_tasks()` lists the names")
    gates = gates if gates is not None else cfg.gate
    dims = _eval_dims(recipe, models)
    if gates:  # before the evaluation, not after it
        from hmcl_cli.evaluation.gates import EXAMPLE, SYNTAX, gate_problems, task_kinds

        problems = gate_problems(gates, task_kinds(tasks), models, dims)
        if problems:
            raise RecipeError("\n  ".join(["quality gate:", *problems]), hint=f"a gate is {SYNTAX}, {EXAMPLE}")
    report = evaluate(models, tasks, resolve, cfg.batch_size, loader=model_loader(recipe, recipe_base),
                      dims=dims,
                      cache_dir=recipe.run_dir / "cache" if cfg.cache_embeddings and in_run_dir else None)
    if in_run_dir and models.get("fine-tuned") == str(recipe.run_dir / "model"):  # which training it scored
        report["fine_tuned_stamp"] = folder_stamp(recipe.run_dir / "model")
    print_table(report, title=f"evaluation ({recipe.name})")
    subject = judged_model(report["models"])
    gate_rows = check_gates(report, gates, subject) if gates else []
    report["gates"] = gate_rows
    # with a recipe, the run's results are its latest eval's whatever --json says (its model card reads them)
    outs = [recipe.run_dir / "eval" / "results.json"] if in_run_dir else []
    if json_out is not None and Path(json_out) not in outs:
        outs.append(json_out)
    for out in outs:
        save_report(report, out)
    if plot:
        plot_report(report, plot)
    enforce_gates(gate_rows)
    failed = [f"{t}/{m}" for t, per in report["results"].items() for m, r in per.items() if "error" in r]
    if failed:
        only_models = all(r.get("error_class") == "model" for per in report["results"].values()
                          for r in per.values() if "error" in r)
        total = sum(len(per) for per in report["results"].values())
        where = ("" if len(failed) == total else
                 f" (the other results are in {outs[-1]})" if outs else " (the other results are in the table)")
        raise (ModelNotFoundError if only_models else DataError)(
            f"{len(failed)} evaluation(s) failed: {', '.join(failed)}{where}", hint="see the errors under the table")
    return report


def _check_eval_outputs(json_out: Optional[Path], plot: Optional[Path]) -> None:
    """Before the evaluation, not after it: --plot needs matplotlib, and --json / --plot a place
    that can be written."""
    import importlib.util

    if plot and importlib.util.find_spec("matplotlib") is None:
        raise HmclError("--plot needs matplotlib, which is not installed", hint="pip install matplotlib, or leave out --plot")
    for flag, target, name in (("--json", json_out, "results.json"), ("--plot", plot, "results.png")):
        if target is not None and Path(target).is_dir():
            raise StorageError(f"cannot write {flag} {target}: it is a folder, and {flag} takes a file",
                               hint=f"give a file path, e.g. {flag} {Path(target) / name}")
        if target is not None and str(target) != "-" and not is_stream(target):
            try:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tempfile.NamedTemporaryFile(dir=Path(target).parent, prefix=".hmcl-write-check-").close()
            except OSError as e:
                raise (from_system_error(e) or StorageError(f"cannot write {target}: {e}",
                                                            hint="choose another --json / --plot path")) from None


def _eval_dims(recipe: Recipe, models: dict) -> list[int]:
    """The sizes every model is also scored cut to: ``eval.dims``, or under ``auto`` the recipe's
    matryoshka sizes and those any compared hmcl model folder was trained for."""
    if recipe.eval.dims != "auto":
        return list(recipe.eval.dims)
    from hmcl_cli.modeling.encoder import saved_matryoshka_dims
    from hmcl_cli.training.saved_model import checkpoint_recipe, is_checkpoint

    found = set(recipe.loss.matryoshka_dims)
    for m in models.values():
        if isinstance(m, (str, Path)) and is_checkpoint(Path(m)):
            found.update(checkpoint_recipe(Path(m), say_differences=False).loss.matryoshka_dims)  # (said on loading)
        elif isinstance(m, (str, Path)) and Path(m).is_dir():
            found.update(saved_matryoshka_dims(m))
    return sorted(found, reverse=True)


def _check_export_target(target: Path) -> None:
    """An export replaces its folder whole (written aside, then renamed): a folder there that is
    not an earlier export (no hmcl_export.json) holds someone's files, which would go with it."""
    if target.exists() and not target.is_dir():
        raise StorageError(f"export: {target} is a file, where the export writes a folder",
                           hint="choose another --out (export.formats name the folders under it)")
    if target.is_dir() and not (target / "hmcl_export.json").is_file():
        found = sorted(p.name for p in target.iterdir())
        if found:
            raise StorageError(
                f"export: {target} holds files that are not an hmcl export ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}), and an export replaces its folder whole",
                hint=f"choose another --out, or move those files out of {target}")


def run_export(recipe: Recipe, formats: Optional[list[str]] = None, model_dir: Optional[Path] = None,
               out_dir: Optional[Path] = None, checkpoint: Optional[Path] = None) -> dict:
    """Each export format of the recipe (or ``formats``) of the trained model, verified; or of the
    model at a training ``checkpoint`` (written aside beside ``out_dir``, by default
    ``<run>/export/step-N``, then exported as the trained model is)."""
    if checkpoint is not None:
        from hmcl_cli.training.saved_model import checkpoint_state, save_checkpoint_model

        checkpoint = Path(checkpoint)
        out_dir = Path(out_dir or checkpoint.parent.parent / "export" / checkpoint.name)
        _check_formats(formats or recipe.export.formats, out_dir)
        ensure_dir(out_dir.parent)
        state = checkpoint_state(checkpoint)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{checkpoint.name}-model-") as aside:
            log(f"export: building the model of checkpoint {checkpoint} (step {state.get('step', '?')} of "
                f"{state.get('total_steps', '?')})")
            made = save_checkpoint_model(checkpoint, Path(aside) / "model")
            return _export(recipe, formats, made, out_dir,
                           {"step": state.get("step"), "total_steps": state.get("total_steps"), "path": str(checkpoint)})
    return _export(recipe, formats, model_dir, out_dir)


def _check_formats(formats: list[str], out_dir: Optional[Path] = None) -> list[str]:
    """The formats, each once and known; with ``out_dir``, each's folder under it one an export may
    replace (:func:`_check_export_target`)."""
    from hmcl_cli.export import export_folder

    formats = list(dict.fromkeys(formats))  # each once: `-f onnx -f onnx` exported twice
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise RecipeError(f"unknown export format(s) {', '.join(map(repr, unknown))}",
                          hint=f"choose from {', '.join(EXPORT_FORMATS)}")
    for fmt in formats if out_dir is not None else []:
        _check_export_target(out_dir / export_folder(fmt))
    return formats


def _export(recipe: Recipe, formats: Optional[list[str]], model_dir: Optional[Path], out_dir: Optional[Path],
            checkpoint: Optional[dict] = None) -> dict:
    """:func:`run_export` of a model folder; ``checkpoint`` (step, total_steps, path) where it was
    made from one (its model card says so, and has no eval table: eval scores the final model)."""
    from hmcl_cli.export import export_folder
    from hmcl_cli.export.merged import export_merged
    from hmcl_cli.modeling.encoder import saved_config, saved_matryoshka_dims

    formats = _check_formats(formats or recipe.export.formats)
    model_dir = model_dir or recipe.run_dir / "model"
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"no trained model at {model_dir}",
                                 hint="run `hmcl train RECIPE` first, or pass --model")
    out_dir = out_dir or recipe.run_dir / "export"
    _check_formats(formats, out_dir)
    trained_with = model_dir / TRAINED_RECIPE  # the recipe the model was trained with, not this call's
    base = saved_config(model_dir).get("base_model")  # what it was trained from (not a run directory's name)
    card = {"name": recipe.name, "base_model": base if isinstance(base, str) and base else recipe.model.name_or_path,
            "recipe": trained_with.read_text(encoding="utf-8") if trained_with.is_file() else recipe.to_yaml(),
            "matryoshka_dims": saved_matryoshka_dims(model_dir),
            "repo": recipe.export.push_to_hub.repo if recipe.export.push_to_hub is not None else None}
    from hmcl_cli.data.prepare import prepared_counts

    try:  # the data as training read it (mined candidates included), not stats.json's count before mining
        card["data"] = prepared_counts(recipe.run_dir / "data")
        card["mined"] = (recipe.run_dir / "data" / "train.unmined.jsonl").is_file()
    except (OSError, ValueError):
        pass
    report = scored_report(recipe, model_dir) if checkpoint is None else None  # (eval scores the final model)
    if report is not None:
        card["eval"] = report
    if checkpoint is not None:
        card["checkpoint"] = checkpoint
    reports = {}
    for fmt in formats:
        if fmt == "merged":
            reports[fmt] = export_merged(model_dir, out_dir / export_folder(fmt), recipe.export.verify_texts, card,
                                         dim=recipe.export.dim)
        else:
            from hmcl_cli.export.onnx import export_onnx

            dev = None
            dev_file = recipe.run_dir / "data" / "dev.jsonl"
            if fmt == "onnx-int8" and dev_file.is_file():
                from hmcl_cli.data.prepare import load_graded

                dev = load_graded(dev_file)  # int8 is reported with its metric change on dev
            reports[fmt] = export_onnx(model_dir, out_dir / export_folder(fmt), quantize=fmt == "onnx-int8",
                                       extra_texts=recipe.export.verify_texts, opset=recipe.export.opset,
                                       dev_examples=dev, dim=recipe.export.dim)
    if recipe.export.push_to_hub is not None:
        from hmcl_cli.export.hub import commit_message, push_exports

        cfg = recipe.export.push_to_hub
        url = push_exports(out_dir, cfg, commit_message(recipe.name, report), formats)
        log(f"export pushed -> {cfg.repo}{f' ({cfg.branch})' if cfg.branch else ''}: {url}")
        reports["push_to_hub"] = {"repo": cfg.repo, "url": url}
    return reports


def scored_report(recipe: Recipe, model_dir: Path) -> Optional[dict]:
    """The run's eval results (``eval/results.json``) where they scored the model in ``model_dir``
    as it is now (:func:`folder_stamp`), for its model card and Hub commit; else None, with a
    warning saying why (trained again since, another model, no results)."""
    path = recipe.run_dir / "eval" / "results.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError:
        return None
    if report.get("fine_tuned_stamp") != folder_stamp(model_dir):
        warn(f"the model card leaves out {path}: it did not score {model_dir} as it is now (trained again since, "
             "or another model, or no fine-tuned model among those it scored); run `hmcl eval RECIPE` before "
             "exporting to include it")
        return None
    return report


def check_model(recipe: Recipe) -> str:
    """What can be checked of the recipe's model without its weights or the network (``hmcl
    recipe validate``): its sentence-transformers pipeline is one hmcl reproduces, and the max
    lengths fit its position table. Raises as loading would; returns what it found, or why it
    could not look (a hub model not downloaded yet)."""
    from hmcl_cli.modeling.resolve import resolve_model, transformer_folder

    m = recipe.model
    try:
        folder = resolve_model(m.name_or_path, m.revision, recipe.base_dir, download=False)
    except ModelNotFoundError:
        return f"{m.name_or_path} not checked (not downloaded yet)"
    import torch  # only now: a model that is not here needs none of it (validate answers in ~1 s)
    from transformers import AutoConfig

    from hmcl_cli.modeling.encoder import check_max_lengths, is_decoder_config, position_limit
    from hmcl_cli.modeling.st_modules import read_pipeline
    from hmcl_cli.training.memory import meta_model
    pipeline = read_pipeline(folder)
    try:
        config = AutoConfig.from_pretrained(transformer_folder(folder), trust_remote_code=m.trust_remote_code)
        skeleton = meta_model(config, None, torch.float32)
        limit = position_limit(skeleton)
    except Exception as e:  # noqa: BLE001 - loading itself reports it; validate says it could not look
        return f"{m.name_or_path}: config not read ({type(e).__name__}); lengths not checked"
    if m.lora.enabled and m.lora.target_modules != "auto":
        from hmcl_cli.modeling.lora import check_target_modules

        check_target_modules(skeleton, list(m.lora.target_modules), m.name_or_path)
    pooling = m.pooling if m.pooling != "auto" else pipeline.pooling or ("last_token" if is_decoder_config(config) else "mean")
    check_max_lengths(limit, m.query_max_length or m.max_length, m.doc_max_length or m.max_length,
                      m.segments.length if m.segments else 0, m.name_or_path,
                      keys=("model.query_max_length" if m.query_max_length else "model.max_length",
                            "model.doc_max_length" if m.doc_max_length else "model.max_length"))
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if hidden:  # the embedding size: the hidden size, or the last Dense layer's
        from hmcl_cli.modeling.st_modules import head_dim

        from hmcl_cli.losses.hmcl import matryoshka_too_wide

        wide = matryoshka_too_wide(recipe.loss.matryoshka_dims, head_dim(pipeline.head, int(hidden)))
        if wide:
            raise RecipeError(f"{wide} of {m.name_or_path}", hint="fix the loss section of the recipe")
    layers = f", then {' -> '.join(layer.kind for layer in pipeline.head)}" if pipeline.head else ""
    if not (pipeline.include_prompt if m.include_prompt == "auto" else m.include_prompt):
        layers = " (prompt tokens left out)" + layers
    return (f"{m.name_or_path}: {pooling} pooling{layers}; "
            f"{f'at most {limit} tokens per sequence' if limit else 'no position limit'}")


def missing_inputs(recipe: Recipe) -> list[tuple[tuple, str]]:
    """The files and folders the recipe's enabled stages will read that are not there: (key, a
    line saying so) (``hmcl run`` stops on them before the first stage; ``hmcl recipe validate``
    reports them): data sources, the mine corpus, eval task files, the accelerate config, and
    local model folders (a hub id is not checked: it may be downloaded)."""
    from hmcl_cli.modeling.resolve import resolve_model

    out: list[tuple[tuple, str]] = []

    def note(key: tuple, value: str, why: str = "does not exist") -> None:
        written = recipe.written_as(key)
        out.append((key, f"{'.'.join(map(str, key))}: {value} {why}" + (f" ({written})" if written else "")))

    from hmcl_cli.data.readers import absent

    def note_absent(key: tuple, value: str) -> None:  # a path, or a pattern of files (shards/train-*.parquet)
        why = absent(recipe.resolve(value))
        if why:
            note(key, value, why)

    for i, src in enumerate(recipe.data.sources):
        if src.path:
            note_absent(("data", "sources", i, "path"), src.path)
    if recipe.mine.enabled:
        for i, p in enumerate(recipe.mine.corpus):
            note_absent(("mine", "corpus", i), p)
    if recipe.train.accelerate_config and not recipe.resolve(recipe.train.accelerate_config).is_file():
        note(("train", "accelerate_config"), recipe.train.accelerate_config)
    if recipe.eval.enabled:
        splits = {s.split for s in recipe.data.sources}
        made = {"train": True, "dev": "dev" in splits or recipe.data.dev_fraction > 0,
                "test": "test" in splits or recipe.data.test_fraction > 0}
        for i, task in enumerate(recipe.eval.tasks):
            if not task.path or task.type == "mteb":
                continue
            if task.path in made:
                if recipe.data.sources and not made[task.path]:
                    note(("eval", "tasks", i, "path"), task.path,
                         f"names the prepared {task.path} split, which this recipe's data has none of (no source "
                         f"with split: {task.path}, data.{task.path}_fraction 0)")
            else:
                note_absent(("eval", "tasks", i, "path"), task.path)
    from hmcl_cli.export import is_onnx_export

    for key, name in recipe_models(recipe):
        if not is_folder(name, recipe.base_dir) or is_onnx_export(local_model(name, recipe.base_dir) or name):
            continue  # a hub id (hub_needs), or an ONNX export eval runs
        try:
            resolve_model(name, base_dir=recipe.base_dir, download=False)  # (a run directory: its model/)
        except ModelNotFoundError:
            note(key, name, "is not a model folder here")
    return out


def recipe_models(recipe: Recipe) -> list[tuple[tuple, str]]:
    """(key, name) of every model the recipe's enabled stages load: the model, the mining teacher,
    the models eval compares."""
    models = [(("model", "name_or_path"), recipe.model.name_or_path)]
    if recipe.mine.enabled and recipe.mine.teacher:
        models.append((("mine", "teacher", "model"), recipe.mine.teacher.model))
    if recipe.eval.enabled:
        models += [(("eval", "compare", label), name) for label, name in recipe.eval.compare.items()]
    return models


def local_model(name: str, base_dir: Optional[Path] = None) -> Optional[Path]:
    """The folder a model reference names here (relative to the current directory, else to
    ``base_dir``, as ``resolve_model`` looks), or None (a hub id, or nothing there)."""
    here = Path(os.path.expanduser(name))
    for folder in (here, *([Path(base_dir) / name] if base_dir is not None and not here.is_absolute() else [])):
        if folder.is_dir():
            return folder
    return None


def is_folder(name: str, base_dir: Optional[Path] = None) -> bool:
    """A model named as a folder: a path written as one (``./``, ``/``, ``~``), or one that is
    there (:func:`local_model`); else a hub id."""
    return name.startswith((".", "/", "~")) or local_model(name, base_dir) is not None


def hub_needs(recipe: Recipe, prepared: bool = False) -> list[tuple[tuple, str, type]]:
    """What the recipe's enabled stages would fetch from the Hugging Face Hub, each as (key, a line
    saying what, the error class of its failure): hub models that are not here (no folder, not in
    the cache, no package that ships them), hub data sources (streamed from the Hub; not when
    ``prepared``: a resumed run keeps its data), and MTEB tasks whose dataset is not cached. An
    MTEB name mteb does not know is a line of its own (``None`` as its class: wrong wherever it runs)."""
    from hmcl_cli.modeling.resolve import resolve_model

    out: list[tuple[tuple, str, type]] = []
    for key, name in recipe_models(recipe):
        if is_folder(name, recipe.base_dir):
            continue  # missing_inputs says if it is not there
        try:
            resolve_model(name, recipe.model.revision if key[0] == "model" else None, recipe.base_dir, download=False)
        except ModelNotFoundError:
            out.append((key, f"{'.'.join(map(str, key))}: model {name} (not downloaded yet)", ModelNotFoundError))
    if not prepared:
        for i, src in enumerate(recipe.data.sources):
            if src.hub:
                out.append((("data", "sources", i, "hub"), f"data.sources.{i}.hub: dataset {src.hub} (read from the Hub)",
                            DataError))
    if recipe.eval.enabled:
        for i, said, kind in mteb_needs(recipe.eval.tasks):
            out.append((("eval", "tasks", i, "mteb_name"), f"eval.tasks.{i}.mteb_name: {said}", kind))
    return out


def mteb_needs(tasks: list[EvalTask], cached: bool = True) -> list[tuple[int, str, Optional[type]]]:
    """The MTEB hub tasks among ``tasks`` that mteb does not know (None as the class: wrong wherever
    it runs) or, with ``cached``, whose dataset is not in the local cache (DataError): (index, what)."""
    hub_tasks = [(i, t) for i, t in enumerate(tasks) if t.type == "mteb" and t.mteb_name]
    if not hub_tasks:
        return []
    import mteb

    from hmcl_cli.evaluation.mteb_bridge import hub_task_cached

    out: list[tuple[int, str, Optional[type]]] = []
    for i, t in hub_tasks:
        try:
            task = mteb.get_task(t.mteb_name)
        except (KeyError, ValueError) as e:
            said = str(e.args[0]) if e.args else str(e)
            out.append((i, said.removeprefix("KeyError: "), None))  # (mteb's message repeats its class)
            continue
        if cached and not hub_task_cached(task):
            out.append((i, f"MTEB task {t.mteb_name} (its dataset {task.metadata.dataset['path']} is not cached)",
                        DataError))
    return out


def check_mteb_names(needs: list[tuple[tuple, str, type]], where: str) -> list[tuple[tuple, str, type]]:
    """A RecipeError for the MTEB task names among ``needs`` that mteb does not know; the others."""
    unknown = [line for _, line, kind in needs if kind is None]
    if unknown:
        raise RecipeError(f"{where}: unknown MTEB task name:\n  " + "\n  ".join(unknown),
                          hint="`mteb.get_tasks()` lists the names")
    return needs


def check_hub_needs(recipe: Recipe, where: str, prepared: bool = False) -> None:
    """Before the first stage: an unknown MTEB task name, or what the run must fetch from the Hub
    (:func:`hub_needs`) when the Hub is switched off or out of reach, is an error now, not after
    hours of training (the Hub's clients would retry each request with back-off, then fail)."""
    from hmcl_cli.hub_access import hub_unreachable

    needs = check_mteb_names(hub_needs(recipe, prepared), where)
    why = hub_unreachable(datasets=any(kind is DataError for _, _, kind in needs)) if needs else None
    if why:
        raise needs[0][2](f"{where}: needs the Hugging Face Hub, which cannot be used: {why}\n  "
                          + "\n  ".join(line for _, line, _ in needs),
                          hint="run with network (models and MTEB datasets are then cached for later runs), or "
                          "point these keys at local folders and files")


def check_inputs(recipe: Recipe, where: str) -> None:
    """A DataError listing :func:`missing_inputs`, if any."""
    missing = missing_inputs(recipe)
    if missing:
        env = sorted({name for key, _ in missing for name in recipe.env_names(key)})
        raise DataError(f"{where}: not found:\n  " + "\n  ".join(line for _, line in missing),
                        hint="paths are relative to the recipe file"
                        + "".join(f"; export {name}=<folder> to read them elsewhere" for name in env))


def check_stage_packages(recipe: Recipe) -> None:
    """Before `hmcl run` starts: the optional packages its enabled stages need, so that a missing
    one stops the run at once rather than after hours of training (mining with faiss, ONNX export)."""
    if recipe.mine.enabled and recipe.mine.search == "faiss":
        from hmcl_cli.mining import require_faiss

        require_faiss()
    if recipe.export.enabled and any(f.startswith("onnx") for f in recipe.export.formats):
        from hmcl_cli.export.onnx import require_onnx

        require_onnx()
        m = recipe.model
        if m.include_prompt is False and (m.query_prompt or m.doc_prompt):
            raise RecipeError("export.formats has onnx, but model.include_prompt false leaves the prompt out of the "
                              "pooling, which an ONNX graph (pooling every token it is given) cannot do",
                              hint="drop onnx from export.formats (merged keeps the behaviour), or set "
                              "model.include_prompt true")


def run_all(recipe: Recipe, resume: bool = False, launch: Optional[tuple[str, list[str], bool]] = None) -> None:
    """`hmcl run`: every stage the recipe enables, in order. With ``resume`` the data stages a
    run already finished (prepare: ``data/stats.json``; mine: ``data/mining_report.json``) are
    not run again, so training resumes on the data its checkpoints were trained on. ``launch``
    (the recipe file, its ``--set`` overrides, ``--debug``) lets training run under `accelerate
    launch` as `hmcl train` does (several GPUs, or ``train.launcher: accelerate``)."""
    data = recipe.run_dir / "data"
    done = resume and (data / "train.jsonl").is_file() and (data / "stats.json").is_file()
    enabled = {"prepare": bool(recipe.data.sources), "mine": recipe.mine.enabled, "train": recipe.train.enabled,
               "eval": recipe.eval.enabled and bool(recipe.eval.tasks),
               "export": recipe.export.enabled and bool(recipe.export.formats)}
    summary = RunSummary(recipe, planned=[name for name, on in enabled.items() if on])
    with summary:  # (a run.json of an earlier run is replaced even when the checks stop this one)
        summary.stage("checks", check_run, recipe, prepared=enabled["prepare"] and done)
        if enabled["prepare"] and done:
            check_prepared(recipe, resumed=True)
            log(f"resume: prepare finished before ({data / 'stats.json'}); not run again")
            summary.skipped("prepare")
        elif enabled["prepare"]:
            summary.stage("prepare", run_prepare, recipe)
        if enabled["mine"] and done and (data / "mining_report.json").is_file():
            log(f"resume: mine finished before ({data / 'mining_report.json'}); not run again")
            summary.skipped("mine")
        elif enabled["mine"]:
            summary.stage("mine", run_mine, recipe)
        if enabled["train"] and enabled["eval"]:
            check_prepared_eval_tasks(recipe)
        if enabled["train"]:
            try:
                summary.stage("train", _train_stage, recipe, resume, launch)
            except InterruptedRun as e:  # the command that continues it is this one, not `hmcl train`
                e.hint = ("continue with `hmcl run RECIPE --resume` (with the same --set options): the prepared "
                          "data is kept and training goes on from its checkpoint")
                raise
        if enabled["eval"]:
            with RunLock(recipe.run_dir):
                summary.stage("eval", run_eval, recipe)
        if enabled["export"]:
            with RunLock(recipe.run_dir):
                summary.stage("export", run_export, recipe)
    log(f"done: {recipe.run_dir} ({summary.times()})")


def _train_stage(recipe: Recipe, resume: bool, launch: Optional[tuple[str, list[str], bool]]) -> Path:
    """`hmcl run`'s training: relaunched under `accelerate launch` where `hmcl train` would be
    (on several GPUs `hmcl run` trained in one process, on one GPU), else in this process."""
    if launch is not None:
        path, overrides, debug = launch
        code = maybe_relaunch(recipe, path, overrides, resume, None, [], debug=debug, command="run")
        if code:  # the relaunched training printed its error; its exit code stays the run's
            raise error_of_exit_code(code, "training, relaunched under accelerate launch, "
                                     + ("stopped (its message is above)" if code == InterruptedRun.exit_code
                                        else f"failed (exit code {code}; its error is above)"))
        if code == 0:
            return recipe.run_dir / "model"
    return run_train(recipe, resume=resume)


def check_prepared_eval_tasks(recipe: Recipe) -> None:
    """`hmcl run`, once the data is prepared: a retrieval task on a prepared split too big for
    mteb's search in this machine's memory stops the run before training, not after it."""
    from hmcl_cli.evaluation.mteb_bridge import retrieval_parts
    from hmcl_cli.evaluation.runner import load_task

    for task in recipe.eval.tasks:
        split = recipe.run_dir / "data" / f"{task.path}.jsonl"
        if task.type != "retrieval" or task.path not in ("dev", "test", "train") or not split.is_file():
            continue
        try:
            retrieval_parts(load_task(task, lambda _: split))
        except DataError as e:
            raise DataError(f"{e} (checked before training, which would otherwise end in this failed "
                            "evaluation)", hint=e.hint) from None


def check_run(recipe: Recipe, prepared: bool = False) -> None:
    """What `hmcl run` checks before its first stage: packages, inputs, what it fetches from the
    Hub, a push's token (``prepared``: the data stages will not run again)."""
    check_stage_packages(recipe)
    if recipe.train.enabled:
        check_base_is_not_an_output(recipe)
    if recipe.train.enabled or recipe.mine.enabled:
        check_model(recipe)  # its pipeline, lengths and matryoshka sizes: before the data stages, not after
    where = str(recipe._source or recipe.name)
    check_inputs(recipe, where)  # before hours of training, not after
    check_hub_needs(recipe, where, prepared)
    if recipe.export.enabled:
        from hmcl_cli.export import export_folder

        for fmt in recipe.export.formats:
            _check_export_target(recipe.run_dir / "export" / export_folder(fmt))
    if recipe.export.enabled and recipe.export.push_to_hub is not None:
        from hmcl_cli.export.hub import check_push_possible

        check_push_possible(recipe.export.push_to_hub)


class RunSummary:
    """What `hmcl run` did, for a CI job to read: ``<run>/run.json`` with each stage's seconds
    (or ``skipped``), and ``status``: ``ok``, or the stage that failed with the error's kind and
    exit code and the ``planned`` stages that did not run (also said in the log). Written when the
    run ends, however it ends."""

    def __init__(self, recipe: Recipe, planned: Sequence[str] = ()):
        self.recipe, self.stages, self.failed, self.planned = recipe, {}, None, list(planned)

    def stage(self, name: str, fn, *args, **kwargs):
        import time

        t0 = time.perf_counter()
        self.failed = name
        out = fn(*args, **kwargs)
        self.stages[name] = round(time.perf_counter() - t0, 1)
        self.failed = None
        return out

    def skipped(self, name: str) -> None:
        self.stages[name] = "skipped"

    def times(self) -> str:
        return ", ".join(f"{k} {v}{'' if v == 'skipped' else ' s'}" for k, v in self.stages.items() if k != "checks")

    def __enter__(self) -> "RunSummary":
        return self

    def __exit__(self, kind, error, tb) -> None:
        import datetime

        from hmcl_cli import __version__
        from hmcl_cli.environment import environment
        from hmcl_cli.io_utils import write_json_atomic

        status: dict = {"status": "ok"}
        if error is not None:
            mapped = error if isinstance(error, HmclError) else from_system_error(error)
            not_run = [name for name in self.planned if name not in self.stages and name != self.failed]
            status = {"status": "failed", "stage": self.failed,
                      "error": getattr(mapped, "kind", type(error).__name__),
                      "exit_code": getattr(mapped, "exit_code", 130 if isinstance(error, KeyboardInterrupt) else 1),
                      "not_run": not_run}
        if os.environ.get("RANK", "0") != "0":
            return
        if error is not None and self.failed:
            where = "before its first stage" if self.failed == "checks" else f"in {self.failed}"
            warn(f"hmcl run stopped {where}" + (f"; not run: {', '.join(status['not_run'])}" if status["not_run"] else ""))
        if not self.recipe.run_dir.is_dir():
            return
        try:
            write_json_atomic(self.recipe.run_dir / "run.json", {
                **status, "stages": self.stages, "hmcl": __version__, "environment": environment(),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        except OSError as e:
            warn(f"run.json not written ({e})")

