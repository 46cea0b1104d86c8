"""`extends:` — a recipe that starts from another (a team's shared base, a built-in)."""
import os
from pathlib import Path

import pytest

from hmcl_cli.errors import RecipeError
from hmcl_cli.recipe import load_recipe
from conftest import ROOT


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = """\
name: team-base
model:
  name_or_path: sentence-transformers/all-MiniLM-L6-v2
  query_prompt: "query: "
  lora:
    r: 8
    alpha: 16
data:
  sources:
    - path: data/train.jsonl
    - path: data/more.jsonl
train:
  batch_size: 16
  learning_rate: 3.0e-5
eval:
  tasks:
    - {name: dev, type: reranking, path: dev}
    - {name: held, type: reranking, path: data/held.jsonl}
  gate: ["dev:map>=base+0.01"]
mine:
  corpus: [data/corpus.jsonl]
"""


@pytest.fixture
def team(tmp_path):
    """A shared base recipe in one folder, a user's recipe in another."""
    base = write(tmp_path / "team" / "base.yaml", BASE)
    for f in ("train.jsonl", "more.jsonl", "held.jsonl", "corpus.jsonl"):
        write(tmp_path / "team" / "data" / f, '{"query": "q", "pos": ["p"]}\n')
    return base


def test_sections_merge_key_by_key_and_the_child_wins(team, tmp_path):
    mine = write(tmp_path / "me" / "mine.yaml", """\
extends: ../team/base.yaml
name: mine
model:
  lora:
    enabled: true
    r: 32
train:
  batch_size: 64
""")
    r = load_recipe(mine)
    assert r.name == "mine" and r.output_dir == "runs/mine"  # the parent's default output_dir uses the child's name
    assert r.model.lora.enabled and r.model.lora.r == 32 and r.model.lora.alpha == 16  # nested merge
    assert r.model.query_prompt == "query: " and r.model.name_or_path.endswith("all-MiniLM-L6-v2")
    assert r.train.batch_size == 64 and r.train.learning_rate == 3e-5
    assert r.eval.gate == ["dev:map>=base+0.01"]


def test_lists_are_replaced_whole(team, tmp_path):
    mine = write(tmp_path / "me" / "mine.yaml", """\
extends: ../team/base.yaml
data:
  sources:
    - path: own.jsonl
""")
    write(tmp_path / "me" / "own.jsonl", "")
    r = load_recipe(mine)
    assert [s.path for s in r.data.sources] == ["own.jsonl"]  # the child's own file, not rebased
    assert r.resolve(r.data.sources[0].path) == tmp_path / "me" / "own.jsonl"


def test_a_parents_relative_paths_stay_relative_to_the_parents_file(team, tmp_path):
    model = tmp_path / "team" / "models" / "tuned"
    write(model / "config.json", "{}")
    text = BASE.replace("sentence-transformers/all-MiniLM-L6-v2", "models/tuned")
    text = text.replace("  learning_rate: 3.0e-5", "  learning_rate: 3.0e-5\n  accelerate_config: conf/two-gpus.yaml")
    text = text.replace("  gate:", "  compare: {old: models/tuned, hub: org/model}\n  gate:")
    write(team, text + "  teacher: {model: ./models/tuned}\n")  # under mine:
    mine = write(tmp_path / "me" / "mine.yaml", "extends: ../team/base.yaml\n")
    r = load_recipe(mine)
    team_dir = tmp_path / "team"
    assert r.resolve(r.data.sources[0].path).resolve() == team_dir / "data" / "train.jsonl"
    assert r.resolve(r.data.sources[1].path).resolve() == team_dir / "data" / "more.jsonl"
    assert r.resolve(r.eval.tasks[1].path).resolve() == team_dir / "data" / "held.jsonl"
    assert r.eval.tasks[0].path == "dev"  # the run's prepared split, not a file
    assert r.resolve(r.mine.corpus[0]).resolve() == team_dir / "data" / "corpus.jsonl"
    assert r.resolve(r.model.name_or_path).resolve() == model  # a model folder beside the parent
    assert r.resolve(r.mine.teacher.model).resolve() == model
    assert r.resolve(r.eval.compare["old"]).resolve() == model and r.eval.compare["hub"] == "org/model"
    assert r.resolve(r.train.accelerate_config).resolve() == team_dir / "conf" / "two-gpus.yaml"
    assert not os.path.isabs(r.data.sources[0].path)  # relative: the two folders can move together


def test_hub_ids_and_absolute_paths_are_left_alone(team, tmp_path):
    absolute = tmp_path / "elsewhere.jsonl"
    write(team, BASE.replace("data/more.jsonl", str(absolute)))
    mine = write(tmp_path / "me" / "mine.yaml", "extends: ../team/base.yaml\n")
    r = load_recipe(mine)
    assert r.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert r.data.sources[1].path == str(absolute)


def test_chain_and_list_apply_in_order(team, tmp_path):
    write(tmp_path / "me" / "fast.yaml", "train: {batch_size: 128, learning_rate: 1.0e-4}\n")
    write(tmp_path / "me" / "mid.yaml", "extends: ../team/base.yaml\ntrain: {learning_rate: 5.0e-5, epochs: 3}\n")
    mine = write(tmp_path / "me" / "mine.yaml", "extends: [mid.yaml, fast.yaml]\ntrain: {epochs: 2}\n")
    r = load_recipe(mine)
    # base -> mid -> fast (later parents win) -> the file itself
    assert (r.train.batch_size, r.train.learning_rate, r.train.epochs) == (128, 1e-4, 2.0)
    assert r.name == "team-base"


def test_an_error_in_a_parent_names_the_parents_file_and_line(team, tmp_path):
    write(team, BASE.replace("  batch_size: 16", "  batch_sise: 16"))
    mine = write(tmp_path / "me" / "mine.yaml", "extends: ../team/base.yaml\nname: mine\ntrain:\n  epocs: 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(mine)
    msg = str(e.value)
    line = BASE.splitlines().index("  batch_size: 16") + 1
    assert f"{team}:{line}: unknown key 'train.batch_sise'" in msg and "did you mean 'train.batch_size'" in msg
    assert f"{mine}:4: unknown key 'train.epocs'" in msg


def test_a_value_the_child_replaces_is_reported_at_the_child(team, tmp_path):
    mine = write(tmp_path / "me" / "mine.yaml", "extends: ../team/base.yaml\ntrain:\n  batch_size: lots\n")
    with pytest.raises(RecipeError, match=rf"{mine}:3: train.batch_size"):
        load_recipe(mine)


def test_a_builtin_recipe_by_name(tmp_path):
    mine = write(tmp_path / "mine.yaml", "extends: quickstart\nname: mine\ntrain: {max_steps: 5}\n")
    r = load_recipe(mine)
    assert r.name == "mine" and r.train.max_steps == 5
    assert r.resolve(r.data.sources[0].path) == ROOT / "recipes" / "data" / "support-train.jsonl"
    assert r.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_local_file_wins_over_a_builtin_of_that_name(tmp_path):
    write(tmp_path / "quickstart.yaml", "name: local\nmodel: {name_or_path: x/y}\n")
    r = load_recipe(write(tmp_path / "mine.yaml", "extends: quickstart.yaml\n"))
    assert r.name == "local"


def test_bad_extends(team, tmp_path):
    me = tmp_path / "me"
    with pytest.raises(RecipeError, match=r"mine.yaml:1: extends 'quickstrt'.*did you mean 'quickstart'"):
        load_recipe(write(me / "mine.yaml", "extends: quickstrt\n"))
    write(me / "a.yaml", "extends: b.yaml\nname: a\n")
    write(me / "b.yaml", "extends: a.yaml\nmodel: {name_or_path: x/y}\n")
    with pytest.raises(RecipeError, match="goes round in a circle"):
        load_recipe(me / "a.yaml")
    with pytest.raises(RecipeError, match="goes round in a circle"):
        load_recipe(write(me / "self.yaml", "extends: self.yaml\n"))
    with pytest.raises(RecipeError, match=r"extends: expected a recipe file"):
        load_recipe(write(me / "num.yaml", "extends: 3\n"))
    with pytest.raises(RecipeError, match="cannot be set from the command line"):
        load_recipe(team, ["extends=other.yaml"])
    with pytest.raises(RecipeError, match="recipe files only"):
        load_recipe(data={"extends": "quickstart", "name": "x", "model": {"name_or_path": "x/y"}})


def test_the_same_parent_twice_is_not_a_circle(team, tmp_path):
    write(tmp_path / "me" / "a.yaml", "extends: ../team/base.yaml\n")
    write(tmp_path / "me" / "b.yaml", "extends: ../team/base.yaml\n")
    r = load_recipe(write(tmp_path / "me" / "mine.yaml", "extends: [a.yaml, b.yaml]\n"))
    assert r.name == "team-base"


def test_merged_recipe_is_what_the_run_records(team, tmp_path):
    import yaml

    mine = write(tmp_path / "me" / "mine.yaml", "extends: ../team/base.yaml\nname: mine\n")
    dumped = yaml.safe_load(load_recipe(mine).to_yaml())
    assert "extends" not in dumped and dumped["train"]["batch_size"] == 16
    again = load_recipe(write(tmp_path / "me" / "flat.yaml", yaml.safe_dump(dumped)))
    assert again.model_dump() == load_recipe(mine).model_dump()
