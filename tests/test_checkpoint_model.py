"""A training checkpoint as a model: rebuilt as training had it at its step, scored by
``hmcl eval --model``, exported by ``hmcl export --model`` (hmcl_cli/training/saved_model.py)."""

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import make_trainer
from hmcl_cli.errors import ModelNotFoundError
from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.training.saved_model import CHECKPOINT_RECIPE, checkpoint_model, is_checkpoint, save_checkpoint_model

TEXTS = ["how do I get a refund", "the parcel never arrived", "reset my password", "a completely unrelated sentence"]
# the final model is the last step's, and both checkpoints (steps 3 and 6) stay
LAST = {"load_best_at_end": False, "keep_last": 5}


def _trained(tmp_path, model_dir, **sections):
    t = make_trainer(tmp_path, model_dir, train=LAST, **sections)
    t.train()
    t.save_final()
    run = t.recipe.run_dir
    (run / "recipe.resolved.yaml").write_text(t.recipe.to_yaml())  # as each stage writes it
    return run, sorted(p for p in (run / "checkpoints").iterdir() if is_checkpoint(p))


def _emb(model):
    return model.encode(TEXTS, side="doc").numpy()


@pytest.mark.parametrize("fixture,sections", [
    ("tiny_bert", {}),
    # LoRA on a decoder, with the ordinal classifier whose thresholds a model folder keeps
    ("tiny_qwen", {"model": {"lora": {"enabled": True, "r": 4}}, "loss": {"classification_weight": 0.5}}),
])
def test_a_checkpoint_is_the_model_training_had_at_its_step(tmp_path, fixture, sections, request):
    run, ckpts = _trained(tmp_path, request.getfixturevalue(fixture), **sections)
    assert [p.name for p in ckpts] == ["step-0000003", "step-0000006"]
    assert (ckpts[-1] / CHECKPOINT_RECIPE).is_file()
    final = _emb(EmbeddingModel.load(str(run / "model")))  # the last step's weights (LAST)
    last = checkpoint_model(ckpts[-1])
    np.testing.assert_allclose(_emb(last), final, atol=2e-5)
    assert not hasattr(last.backbone, "peft_config")  # merged
    earlier = _emb(checkpoint_model(ckpts[0]))
    assert np.abs(earlier - final).max() > 1e-3  # another step's model, not the final one read again
    # a folder of it is what training writes as <run>/model
    folder = save_checkpoint_model(ckpts[-1], tmp_path / "made")
    np.testing.assert_allclose(_emb(EmbeddingModel.load(str(folder))), final, atol=2e-5)
    written = sorted(p.name for p in (run / "model").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == written
    if sections:
        assert "adapter" in written and "hmcl_thresholds.json" in written
        made = json.loads((folder / "hmcl_thresholds.json").read_text())
        trained = json.loads((run / "model" / "hmcl_thresholds.json").read_text())
        assert made == pytest.approx(trained)


def test_eval_and_export_take_a_checkpoint(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    from test_cli import hmcl

    run, ckpts = _trained(tmp_path, tiny_bert)
    recipe = tmp_path / "recipe.yaml"
    out = hmcl("eval", str(recipe), "--model", str(ckpts[-1]), "--model", f"early={ckpts[0]}", "--model",
               f"all={run / 'checkpoints'}", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    scores = json.loads((tmp_path / "r.json").read_text())["results"]["dev-retrieval"]
    assert list(scores) == ["base", "fine-tuned", "step-0000006", "early", "all/step-0000003", "all/step-0000006"]
    assert scores["step-0000006"]["main_score"] == pytest.approx(scores["fine-tuned"]["main_score"], abs=1e-6)
    assert scores["early"]["main_score"] != scores["fine-tuned"]["main_score"]
    assert scores["all/step-0000003"]["main_score"] == scores["early"]["main_score"]
    # exported beside the run's own export, with a card that says which step it is
    out = hmcl("export", "--model", str(ckpts[0]), "-f", "merged", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    merged = run / "export" / "step-0000003" / "merged"
    card = (merged / "README.md").read_text()
    assert "training step 3 of 6" in card and f"base_model: {tiny_bert}" in card
    assert [p.name for p in (run / "export").iterdir()] == ["step-0000003"]  # nothing left aside
    st = SentenceTransformer(str(merged), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), _emb(checkpoint_model(ckpts[0])), atol=2e-5)
    # a training that has not finished: eval of the recipe says which checkpoint it can score
    shutil.rmtree(run / "model")
    out = hmcl("eval", str(recipe), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"last checkpoint: step-0000006); `--model {ckpts[-1]}` scores" in " ".join(out.stderr.split())


def test_a_checkpoint_without_its_own_recipe_is_rebuilt_with_its_runs(tmp_path, tiny_bert, capsys):
    run, ckpts = _trained(tmp_path, tiny_bert)
    ckpt = ckpts[-1]
    final = _emb(EmbeddingModel.load(str(run / "model")))
    resolved = run / "recipe.resolved.yaml"
    changed = yaml.safe_load(resolved.read_text())
    changed["model"]["max_length"] = 24
    resolved.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    np.testing.assert_allclose(_emb(checkpoint_model(ckpt)), final, atol=2e-5)  # its own recipe: the run's is not read
    assert "other settings" not in capsys.readouterr().err
    # as checkpoints were written before they kept their recipe
    (ckpt / CHECKPOINT_RECIPE).unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest[CHECKPOINT_RECIPE]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    checkpoint_model(ckpt)
    err = capsys.readouterr().err
    assert "trained with other settings than" in err and "max_length" in err
    changed["model"]["max_length"] = 48  # as trained
    resolved.write_text(yaml.safe_dump(changed))
    np.testing.assert_allclose(_emb(checkpoint_model(ckpt)), final, atol=2e-5)
    resolved.unlink()
    with pytest.raises(ModelNotFoundError, match="no recipe to rebuild its model with"):
        checkpoint_model(ckpt)


def test_a_checkpoint_finds_a_base_named_relative_to_its_recipe_and_says_when_it_is_gone(tmp_path, tiny_bert, monkeypatch):
    shutil.copytree(tiny_bert, tmp_path / "base")
    run, ckpts = _trained(tmp_path / "project", tmp_path / "base", model={"name_or_path": "../base"})
    final = _emb(EmbeddingModel.load(str(run / "model")))
    monkeypatch.chdir(tmp_path / "project" / "run")  # not where ../base is
    (ckpts[-1] / "optim.pt").write_bytes(b"garbage")  # not read (nor hashed: twice the weights) for its model
    np.testing.assert_allclose(_emb(checkpoint_model(ckpts[-1])), final, atol=2e-5)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(ModelNotFoundError, match="its base model .*base is needed to rebuild it"):
        checkpoint_model(ckpts[-1])
    # a damaged checkpoint is refused, not rebuilt half
    (ckpts[0] / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ModelNotFoundError, match="is unusable: model.pt checksum mismatch"):
        checkpoint_model(ckpts[0])
    # removed between its check and the read of its weights (a running training's keep_last)
    import hmcl_cli.training.saved_model as saved_model

    read_recipe = saved_model.checkpoint_recipe
    monkeypatch.setattr(saved_model, "checkpoint_recipe",
                        lambda ckpt, **kw: (read_recipe(ckpt, **kw), shutil.rmtree(ckpt))[0])
    with pytest.raises(ModelNotFoundError, match="was removed while it was read"):
        checkpoint_model(ckpts[-1])


def test_checkpoints_are_labelled_by_step_then_run(tmp_path, monkeypatch):
    from hmcl_cli.evaluation.runner import labelled_models

    assert list(labelled_models(["runs/a/checkpoints/step-0000003"])) == ["step-0000003"]
    assert list(labelled_models(["runs/a/checkpoints/step-0000003", "runs/b/checkpoints/step-0000003"])) == [
        "a/step-0000003", "b/step-0000003"]
    # a folder of checkpoints is each of them
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):
        for step in ("step-0000010", "step-0000020"):
            (tmp_path / run / "checkpoints" / step).mkdir(parents=True)
            for f in ("model.pt", "trainer_state.json"):
                (tmp_path / run / "checkpoints" / step / f).touch()
    for odd in ("diverged", ".step-0000030.tmp"):  # a diverged training's state, one being written
        (tmp_path / "a" / "checkpoints" / odd).mkdir()
        for f in ("model.pt", "trainer_state.json"):
            (tmp_path / "a" / "checkpoints" / odd / f).touch()
    assert labelled_models(["a/checkpoints"]) == {"step-0000010": "a/checkpoints/step-0000010",
                                                  "step-0000020": "a/checkpoints/step-0000020"}
    assert list(labelled_models(["a/checkpoints", "b/checkpoints"])) == [
        "a/step-0000010", "a/step-0000020", "b/step-0000010", "b/step-0000020"]
    assert list(labelled_models(["x=a/checkpoints"])) == ["x/step-0000010", "x/step-0000020"]
    assert list(labelled_models(["a"])) == ["a"]  # a run directory: its trained model, not its checkpoints


def test_eval_scores_a_checkpoint_at_the_matryoshka_sizes_it_was_trained_for(tmp_path, tiny_bert):
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import _eval_dims

    run, ckpts = _trained(tmp_path / "m", tiny_bert, loss={"matryoshka_dims": [16]})
    plain = load_recipe(data={"name": "x", "model": {"name_or_path": str(tiny_bert)}})
    assert _eval_dims(plain, {"c": str(ckpts[-1])}) == [16]
    assert _eval_dims(plain, {"m": str(run / "model")}) == [16]  # as its trained model
