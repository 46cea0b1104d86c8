import re
from pathlib import Path

import pytest

from hmcl_cli.errors import RecipeError
from hmcl_cli.recipe import load_recipe, load_yaml_with_lines, schema_markdown
from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_quickstart_loads_and_resolves_references():
    r = load_recipe(QUICKSTART)
    assert r.name == "quickstart"
    assert r.output_dir == "runs/quickstart"  # ${name} resolved
    assert r.resolve(r.data.sources[0].path) == ROOT / "recipes" / "data" / "support-train.jsonl"


def test_overrides_are_typed():
    r = load_recipe(QUICKSTART, ["train.epochs=2", "train.learning_rate=3e-5", "loss.learn_temperature=true",
                                 "name=other", "data.sources.0.split=dev"])
    assert r.train.epochs == 2.0 and r.train.learning_rate == 3e-5
    assert r.loss.learn_temperature is True
    assert r.output_dir == "runs/other"  # references resolve after overrides
    assert r.data.sources[0].split == "dev"
    # the index past the last item adds one (a third source from the command line)
    r = load_recipe(QUICKSTART, ["data.sources.2.path=data/support-dev.jsonl", "data.sources.2.split=test"])
    assert [s.split for s in r.data.sources] == ["train", "dev", "test"]
    with pytest.raises(RecipeError, match=r"index 3 does not exist: data.sources has 2 items \(0-1; index 2 adds one\)"):
        load_recipe(QUICKSTART, ["data.sources.3.path=x.csv"])


def test_a_mining_window_is_refused_only_where_it_holds_no_rank():
    """range_max past top_k ends the window at top_k (it mined before the check came, and still
    does); a window with no rank in it (range_min at or past range_max or top_k) is refused."""
    assert load_recipe(QUICKSTART, ["mine.top_k=30"]).mine.range_max == 50  # ranks 10-29
    assert load_recipe(QUICKSTART, ["mine.top_k=5", "mine.num_negatives=0"]).mine.top_k == 5  # weak only
    for bad in (["mine.top_k=10"], ["mine.range_min=50"], ["mine.range_min=3", "mine.range_max=3"]):
        with pytest.raises(RecipeError, match="range_min"):
            load_recipe(QUICKSTART, bad)


def test_a_prompt_with_a_colon_is_text_on_the_command_line():
    """`--set "model.query_prompt=query: "` (E5's prompt, BGE's ends alike) was read by YAML as the
    mapping {query: null} and failed as "not a valid string". A one-line value in YAML's block style
    is the text as typed, its trailing space kept; lists and mappings are written [...] / {...}."""
    r = load_recipe(QUICKSTART, ["model.query_prompt=query: ",
                                 "model.doc_prompt=Represent this sentence for searching relevant passages: "])
    assert r.model.query_prompt == "query: "
    assert r.model.doc_prompt == "Represent this sentence for searching relevant passages: "
    assert load_recipe(QUICKSTART, ["model.query_prompt=#question "]).model.query_prompt == "#question "
    r = load_recipe(QUICKSTART, ["data.sources.0.format=sts", "data.sources.0.columns={query: q}",
                                 "loss.matryoshka_dims=[128, 64]"])
    assert r.data.sources[0].columns == {"query": "q"} and r.loss.matryoshka_dims == [128, 64]
    with pytest.raises(RecipeError, match=r"a mapping is written in braces: \{query: q\}"):
        load_recipe(QUICKSTART, ["data.sources.0.format=sts", "data.sources.0.columns=query: q"])


def test_a_section_or_list_given_as_a_value_says_how_to_write_it():
    with pytest.raises(RecipeError, match=r"model.lora: a section, not a value: set its keys \(enabled, r, .*"
                                          r"--set model.lora.enabled=") as e:
        load_recipe(QUICKSTART, ["model.lora=true"])
    assert "dictionary or instance" not in str(e.value)
    with pytest.raises(RecipeError, match=r"loss.matryoshka_dims: .*a list is written in brackets: \[64,128\]"):
        load_recipe(QUICKSTART, ["loss.matryoshka_dims=64,128"])
    assert load_recipe(QUICKSTART, ["loss.matryoshka_dims=[64,128]"]).loss.matryoshka_dims == [64, 128]


def test_misspelled_key_names_key_line_and_suggestion(tmp_path):
    text = QUICKSTART.read_text().replace("  learning_rate: 5.0e-5", "  lerning_rate: 5.0e-5")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = text.splitlines().index("  lerning_rate: 5.0e-5") + 1
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert f"bad.yaml:{line}" in msg and "train.lerning_rate" in msg and "did you mean 'train.learning_rate'" in msg


def test_unknown_key_in_set_override():
    with pytest.raises(RecipeError) as e:
        load_recipe(QUICKSTART, ["train.lerning_rate=1e-4"])
    assert "--set train.lerning_rate=1e-4" in str(e.value) and "train.learning_rate" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(QUICKSTART, ["trian.epochs=1"])
    assert "did you mean 'train'" in str(e.value)


def test_a_key_in_the_wrong_section_names_the_section_it_belongs_to(tmp_path):
    """`train.temperature` is loss's, `train.num_negatives` mine's: said so, not a near spelling
    of the wrong section (it was 'train.num_workers', and 'loss.learn_temperature' for
    loss.learning_rate); a key --set wrote under an unknown section is told as that --set, not as
    the file line of the section above it."""
    cases = {"train.temperature=0.02": "did you mean 'loss.temperature'?",
             "train.num_negatives=5": "did you mean 'mine.num_negatives'?",
             "loss.learning_rate=1e-4": "did you mean 'train.learning_rate'?",
             "temperature=0.02": "did you mean 'loss.temperature'?",
             "model.batch_size=8": "did you mean 'mine.batch_size' or 'mine.teacher.batch_size' or 'train.batch_size' or "
                                   "'eval.batch_size'?",
             "train.lerning_rate=1e-4": "did you mean 'train.learning_rate'?",  # a near spelling where none is elsewhere
             "train.lora.r=8": "--set train.lora.r=8: unknown key 'train.lora' — did you mean 'model.lora'?"}
    for override, expected in cases.items():
        with pytest.raises(RecipeError) as e:
            load_recipe(QUICKSTART, [override])
        assert expected in str(e.value) and f"--set {override}" in str(e.value), (override, str(e.value))
    text = QUICKSTART.read_text().replace("  learning_rate: 5.0e-5", "  learning_rate: 5.0e-5\n  temperature: 0.02")
    (tmp_path / "r.yaml").write_text(text)
    line = text.splitlines().index("  temperature: 0.02") + 1
    with pytest.raises(RecipeError, match=rf"r.yaml:{line}: unknown key 'train.temperature' — did you mean 'loss.temperature'\?"):
        load_recipe(tmp_path / "r.yaml")


def test_an_empty_name_or_output_dir_is_refused(monkeypatch):
    """`--set output_dir=$RUN_DIR` with the variable unset wrote the run into the current
    directory, and an empty name made the run directory `runs/` itself: both are refused, with
    the likely cause (an empty model was "  is not a model folder here"; an empty number was
    "unable to parse string"). `.` still names the current directory."""
    monkeypatch.setenv("EMPTY", "")
    for override in ("output_dir=", "name=", "name= ", "output_dir=${env:EMPTY}", "eval.tasks.0.name=",
                     "model.name_or_path="):
        with pytest.raises(RecipeError, match=r"is empty \(an unset shell variable"):
            load_recipe(QUICKSTART, [override])
    for override in ("train.epochs=", "train.precision=", "train.grad_cache_chunk="):  # any typed key given nothing
        # (said once, after a union's branches: it came between them, "... integer; it is empty ... or 'auto'")
        with pytest.raises(RecipeError, match=r"; it is empty \(an unset shell variable in `--set KEY=\$VAR`\?\)$"):
            load_recipe(QUICKSTART, [override])
    assert load_recipe(QUICKSTART, ["output_dir=."]).run_dir.resolve() == Path.cwd().resolve()


def test_wrong_type_and_missing_key(tmp_path):
    with pytest.raises(RecipeError, match=r"train.batch_size.*(integer|int)"):
        load_recipe(QUICKSTART, ["train.batch_size=many"])
    f = tmp_path / "r.yaml"
    f.write_text("name: x\n")
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        load_recipe(f)


def test_python_tags_and_malformed_yaml_are_rejected(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo hacked']\nmodel: {name_or_path: x}\n")
    with pytest.raises(RecipeError, match="evil.yaml:1: YAML tag .*python/object.* not allowed"):
        load_recipe(f)
    f.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(f)


def test_unknown_reference_and_env(tmp_path, monkeypatch):
    f = tmp_path / "r.yaml"
    f.write_text("name: ${env:RUN_NAME}\nmodel: {name_or_path: m}\noutput_dir: out/${nmae}\n")
    monkeypatch.setenv("RUN_NAME", "nightly")
    with pytest.raises(RecipeError, match=r"r.yaml:3: output_dir: reference \$\{nmae\} names no key.*"
                                          r"did you mean \$\{name\}"):
        load_recipe(f)
    f.write_text("name: ${env:RUN_NAME}\nmodel: {name_or_path: m}\n")
    assert load_recipe(f).output_dir == "runs/nightly"
    # a key the recipe leaves at its default is referred to with that default
    f.write_text("name: x\nmodel: {name_or_path: m}\noutput_dir: runs/bs${train.batch_size}-${loss.temperature}\n")
    from hmcl_cli.recipe import Recipe

    defaults = Recipe.model_validate({"name": "x", "model": {"name_or_path": "m"}})
    assert load_recipe(f).output_dir == f"runs/bs{defaults.train.batch_size}-{defaults.loss.temperature}"
    f.write_text("name: x\nmodel: {name_or_path: m}\ndata: {sources: [{path: a.csv}]}\noutput_dir: w${data.sources.0.weight}\n")
    assert load_recipe(f).output_dir == "w1.0"
    with pytest.raises(RecipeError, match=r"reference \$\{data.sources.3.weight\} names no key"):
        load_recipe(f, ["output_dir=w${data.sources.3.weight}"])
    # an unset variable is named with the file and line that refer to it; so is a --set
    monkeypatch.delenv("RUN_NAME")
    f.write_text("model: {name_or_path: m}\nname: ${env:RUN_NAME}\n")
    with pytest.raises(RecipeError, match="r.yaml:2: name: environment variable 'RUN_NAME' is not set"):
        load_recipe(f)
    with pytest.raises(RecipeError, match=r"--set output_dir=\$\{model.name_or_pth\}: .*did you mean \$\{model.name_or_path\}"):
        load_recipe(f, overrides=["name=x", "output_dir=${model.name_or_pth}"])
    # a reference to a required key the recipe lacks says to write it
    f.write_text("model: {name_or_path: m}\n")
    with pytest.raises(RecipeError, match=r"reference \$\{name\}: the recipe does not set name") as e:
        load_recipe(f)
    assert "--set name=" in e.value.hint


def test_unquoted_reference_in_flow_yaml_says_to_quote_it(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nmodel: {name_or_path: m}\ntrain: {epochs: ${env:EPOCHS}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:3: malformed YAML.*\n  train: \{epochs: \$\{env:EPOCHS\}\}\n +\^") as e:
        load_recipe(f)
    assert "quote a ${...} reference" in e.value.hint
    f.write_text("name: ${env:RUN}: x\nmodel: {name_or_path: m}\n")  # a reference, but no { } or [ ] around it
    with pytest.raises(RecipeError, match="r.yaml:1: malformed YAML") as e:
        load_recipe(f)
    # not the reference's hint: the value holds ': ', and quoting it is what helps
    assert "quote a ${...} reference" not in e.value.hint
    assert e.value.hint.endswith('is written in quotes: name: "${env:RUN}: x"')
    f.write_text("name: x\nmodel: {name_or_path: m\n")  # other broken YAML: the plain hint
    with pytest.raises(RecipeError, match="malformed YAML") as e:
        load_recipe(f)
    assert e.value.hint == "fix the YAML syntax"


def test_lines_are_recorded():
    data, lines = load_yaml_with_lines("a:\n  b: 1\n  c:\n    - d: 2\n")
    assert lines[("a", "b")] == 2 and lines[("a", "c", 0, "d")] == 4 and data["a"]["c"][0]["d"] == 2


def test_schema_documents_every_section():
    md = schema_markdown()
    for key in ("model.name_or_path", "train.learning_rate", "loss.weak_weight", "eval.gate", "data.sources[].format"):
        assert f"`{key}`" in md


def test_the_editor_schema_judges_recipes_as_load_recipe_does(tmp_path, monkeypatch):
    """`hmcl recipe schema --format json` is for editors that check YAML against a JSON Schema:
    the built-in recipes, a recipe that only extends one, and references on typed keys pass; a
    misspelt key (at any depth), a wrong type and a value outside a choice are flagged, as
    load_recipe flags them."""
    import jsonschema
    import yaml

    from hmcl_cli.recipe import editor_json_schema

    schema = editor_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    check = jsonschema.Draft202012Validator(schema)

    def errors(text: str) -> list[str]:
        return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in check.iter_errors(yaml.safe_load(text))]

    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        assert errors(path.read_text()) == [], path.name
    good = {"child": "extends: quickstart\ntrain: {epochs: 2}\nmodel: {max_length: 256}\n",
            "references": "name: r\nmodel: {name_or_path: m, max_length: '${env:LEN}', pooling: '${env:POOL}'}\n"
                          "train: {batch_size: '${env:BS:-16}', enabled: '${env:TRAIN}'}\n"
                          "data: {sources: [{path: a.jsonl}]}\n"}
    for name, text in good.items():
        assert errors(text) == [], name
    monkeypatch.setenv("LEN", "96"), monkeypatch.setenv("POOL", "cls"), monkeypatch.setenv("TRAIN", "false")
    (tmp_path / "r.yaml").write_text(good["references"])
    r = load_recipe(tmp_path / "r.yaml")  # what the schema lets through, hmcl reads
    assert (r.model.max_length, r.model.pooling, r.train.batch_size, r.train.enabled) == (96, "cls", 16, False)
    bad = [  # (recipe text, the editor's error, the key hmcl's error names)
        ("train: {lerning_rate: 1.0e-4}", "train: Additional properties are not allowed ('lerning_rate'", "train.lerning_rate"),
        ("data: {sources: [{path: a.csv, formt: sts}]}", "data.sources.0: Additional properties are not allowed ('formt'",
         "data.sources.0.formt"),
        ("eval: {tasks: [{name: a, type: sts, paht: x}]}", "eval.tasks.0: Additional properties are not allowed ('paht'",
         "eval.tasks.0.paht"),
        ("trian: {epochs: 1}", ": Additional properties are not allowed ('trian'", "'trian'"),
        ("train: {epochs: three}", "train.epochs: ", "train.epochs"),
        ("model: {pooling: avg}", "model.pooling: ", "model.pooling"),
        ("train: {batch_size: 0}", "train.batch_size: ", "train.batch_size"),
        ("data: {sources: [{path: a.csv, format: nli, thresholds: {pos: 4.0}}]}", "data.sources.0.thresholds: ",
         "does not read `thresholds`"),
        ("data: {sources: [{path: a.jsonl, symmetric: true}]}", "data.sources.0.symmetric: ", "does not read `symmetric`"),
        ("data: {sources: [{path: a.csv, format: sts, qrels_split: dev}]}", "data.sources.0.qrels_split: ",
         "does not read `qrels_split`"),
        ("data: {sources: [{path: a.csv, format: sts, columns: {querry: q}}]}", "data.sources.0.columns: ",
         "unknown role 'querry' — did you mean 'query'?"),
    ]
    for text, expected, key in bad:
        found = errors(text)
        assert len(found) == 1 and found[0].startswith(expected), (text, found)
        recipe = {"name": "x", "model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}}
        for section, value in yaml.safe_load(text).items():
            recipe[section] = {**recipe.get(section, {}), **value}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(RecipeError) as refused:  # hmcl refuses it too, for that key
            load_recipe(tmp_path / "bad.yaml")
        assert key in str(refused.value), str(refused.value)


def test_every_builtin_recipe_validates_and_opens_with_its_command():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# hmcl ") and path.name in first, path.name
        r = load_recipe(path)
        assert r.name == path.stem, path.name


def test_decoder_recipes_use_last_token_pooling_lora_and_memory_savers():
    from pathlib import Path

    for name in ("qwen-lora", "qwen-7b-lora"):
        r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
        assert r.model.pooling == "last_token" and r.model.padding_side == "left"
        assert r.model.lora.enabled and r.model.gradient_checkpointing and r.train.grad_cache_chunk
        assert r.model.query_prompt and not r.model.trust_remote_code


def test_a_value_that_fits_no_branch_of_a_union_gets_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {name_or_path: m}\ndata: {sources: [{path: a.jsonl}]}\n"
                 "train:\n  grad_cache_chunk: big\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    lines = [x for x in str(e.value).splitlines() if "grad_cache_chunk" in x]
    assert len(lines) == 1 and "r.yaml:5" in lines[0] and "integer" in lines[0] and "'auto'" in lines[0], lines
    assert "constrained" not in str(e.value)
    assert "| `train.grad_cache_chunk` | int >= 1 or 'auto' |" in schema_markdown()
    assert load_recipe(p, overrides=["train.grad_cache_chunk=auto"]).train.grad_cache_chunk == "auto"
    assert load_recipe(p, overrides=["train.grad_cache_chunk=16"]).train.grad_cache_chunk == 16


def test_every_schema_key_has_a_description():
    """`hmcl recipe schema` is the manual of the recipe keys: none is left without a meaning."""
    rows = [line for line in schema_markdown().splitlines()[2:] if line.startswith("| `")]
    assert len(rows) > 100
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in rows]  # "\|" is a | in a type
    assert {len(c) for c in cells} == {4}
    bare = [c[0] for c in cells if not c[3]]
    assert not bare, f"keys without a description: {bare}"


def test_recipe_cp_keeps_the_data_folder_an_env_default_names(tmp_path, monkeypatch):
    """A built-in recipe reads data through ``${env:HMCL_DATA:-<relative folder>}``; relative to a
    copy elsewhere that default would name another folder. The copy names the same folder (when
    it exists), says which variable to set when it does not, and says which sample files a kept
    data/ folder beside the destination lacks."""
    import hmcl_cli.recipe as recipe_module

    shipped = tmp_path / "pkg" / "recipes"
    (shipped / "data").mkdir(parents=True)
    (shipped / "data" / "sample.jsonl").write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    shared = tmp_path / "pkg" / "shared"
    shared.mkdir()
    (shared / "train.jsonl").write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n')
    body = ("model: {name_or_path: some/model}\n"
            "data:\n  sources:\n    - path: ${env:HMCL_DATA:-%s}/train.jsonl\n    - path: data/sample.jsonl\n")
    (shipped / "here.yaml").write_text("# hmcl run recipes/here.yaml\n# Data from $HMCL_DATA (default: ../shared beside "
                                       "the project).\nname: here\n" + body % "../shared")
    (shipped / "gone.yaml").write_text("# hmcl run recipes/gone.yaml\nname: gone\n" + body % "../absent")
    monkeypatch.setattr(recipe_module, "builtin_recipes",
                        lambda: {p.stem: p for p in sorted(shipped.glob("*.yaml"))})
    monkeypatch.delenv("HMCL_DATA", raising=False)

    dest = tmp_path / "team" / "deep"
    target, notes = recipe_module.copy_builtin_recipe("here", dest / "mine.yaml")
    text = target.read_text()
    assert text.startswith(f"# hmcl run {target.as_posix()}\n# Data from $HMCL_DATA (default: "
                           f"{shared.resolve().as_posix()}).\n")  # the header says the copy's default
    assert f"${{env:HMCL_DATA:-{shared.resolve().as_posix()}}}/train.jsonl" in text
    r = load_recipe(target)
    assert r.resolve(r.data.sources[0].path) == shared.resolve() / "train.jsonl"
    assert (dest / "data" / "sample.jsonl").is_file() and notes == [
        f"its data: $HMCL_DATA, or where that is not set, {shared.resolve().as_posix()}"]
    monkeypatch.setenv("HMCL_DATA", str(tmp_path))  # the variable still wins
    assert load_recipe(target).data.sources[0].path == f"{tmp_path}/train.jsonl"

    (tmp_path / "other" / "data").mkdir(parents=True)  # the user's own data/ folder is kept
    target, notes = recipe_module.copy_builtin_recipe("gone", tmp_path / "other")
    assert target == tmp_path / "other" / "gone.yaml"
    assert "${env:HMCL_DATA:-../absent}/train.jsonl" in target.read_text()
    assert "export HMCL_DATA=<folder>" in notes[0]
    assert "sample.jsonl" in notes[1] and not (tmp_path / "other" / "data" / "sample.jsonl").exists()
    with pytest.raises(RecipeError, match="already exists"):
        recipe_module.copy_builtin_recipe("gone", tmp_path / "other")


def test_eval_tasks_and_compared_models_keep_their_own_names(tmp_path):
    """Results are kept by task name and model label: a second task named `dev` replaced the
    first's results, and `compare: {base: ...}` replaced the recipe's base, without a word."""
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nmodel: {name_or_path: m}\neval:\n  tasks:\n    - {name: dev, type: sts, path: a.csv}\n"
                 "    - {name: dev, type: sts, path: b.csv}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:4: eval.tasks: tasks 0 and 1 are both named 'dev'"):
        load_recipe(f)
    f.write_text("name: x\nmodel: {name_or_path: m}\neval:\n  compare: {base: runs/old}\n")
    with pytest.raises(RecipeError, match="'base' labels the recipe's base model"):
        load_recipe(f)
    assert load_recipe(f, ["eval.include_base=false"]).eval.compare == {"base": "runs/old"}
    with pytest.raises(RecipeError, match="'fine-tuned' labels the model this recipe trains"):
        load_recipe(f, ["eval.compare={fine-tuned: runs/old}"])


def test_yes_and_no_are_labels_and_number_keys_are_label_text(tmp_path):
    """YAML 1.1 read `label_map: {yes: pos, no: neg}` as booleans and `{0: neg, 1: pos}` as
    numbers, and the schema refused both ("Input should be a valid string"); a file whose labels are
    yes/no or 0/1 could not be mapped. Only true/false are booleans now (YAML 1.2), number keys
    read as the labels' text, and a boolean key still reads yes/no."""
    (tmp_path / "pairs.csv").write_text("q,c,label\n")
    path = tmp_path / "r.yaml"
    path.write_text("name: no\nmodel: {name_or_path: m}\ndata:\n  sources:\n"
                    "    - {path: pairs.csv, format: pairs, label_map: {yes: pos, no: neg}}\n"
                    "    - {path: pairs.csv, format: nli, label_map: {0: pos, 1.0: weak, 2: neg}}\n"
                    "train: {enabled: yes, one_forward: no, compile: off}\n")
    r = load_recipe(path)
    assert r.name == "no"
    assert r.data.sources[0].label_map == {"yes": "pos", "no": "neg"}
    assert r.data.sources[1].label_map == {"0": "pos", "1": "weak", "2": "neg"}
    assert r.train.enabled is True and r.train.one_forward is False and r.train.compile is False
    again = load_recipe(path, overrides=["data.sources.0.label_map={on: pos, off: neg}", "train.enabled=no"])
    assert again.data.sources[0].label_map == {"on": "pos", "off": "neg"} and again.train.enabled is False


def test_a_date_is_a_name_and_a_number_where_text_belongs_says_to_quote_it(tmp_path):
    """`name: 2026-12-06` (a scheduled run named by its date) was a date, which no key takes
    ("Input should be a valid string (got datetime.date(2026, 12, 6))"); it is text now. A number
    where text belongs cannot be read back as written (1.10 is 1.1): the error says to quote it."""
    path = tmp_path / "r.yaml"
    path.write_text("name: 2026-12-06\nmodel: {name_or_path: m}\n")
    r = load_recipe(path)
    assert r.name == "2026-12-06" and r.output_dir.endswith("runs/2026-12-06")
    assert load_recipe(path, overrides=["name=2026-12-07"]).name == "2026-12-07"
    with pytest.raises(RecipeError, match=r"r.yaml:2: model.revision: Input should be a valid string; .*quote it") as err:
        path.write_text("name: nightly\nmodel: {name_or_path: m, revision: 1.10}\n")
        load_recipe(path)
    assert "`'1.10'` stays 1.10" in str(err.value)
    path.write_text("name: nightly\nmodel: {name_or_path: m, revision: '1.10'}\n")
    assert load_recipe(path).model.revision == "1.10"


def _refused(recipe_file: Path) -> str:
    """The error load_recipe raises for the file, on one line."""
    with pytest.raises(RecipeError) as refused:
        load_recipe(recipe_file)
    return " ".join(str(refused.value).split())


def test_a_source_key_its_format_does_not_read_is_refused(tmp_path):
    """`thresholds` on an nli source, `symmetric: true` on a graded one (the default format) or
    `label_map` on an sts one were dropped without a word: the source graded as if they were not
    there. Each is refused, naming the source's line, every such key, the formats that read them
    and how to unset one a base recipe sets; an explicit null (false, {}) is no setting."""
    (tmp_path / "r.yaml").write_text(
        "name: r\nmodel: {name_or_path: m}\ndata:\n  sources:\n"
        "    - {path: a.tsv, format: nli, thresholds: {pos: 4.0}, grade_map: {1: pos}}\n"
        "    - {path: b.jsonl, symmetric: true}\n"
        "    - {path: c.csv, format: sts, label_map: {a: pos}, symmetric: true, score_range: [0, 1]}\n")
    said = _refused(tmp_path / "r.yaml")
    assert ("r.yaml:5: data.sources.0: format nli (grades a pair by its label) does not read `thresholds` and "
            "`grade_map` (`thresholds` is for sts; `grade_map` is for qrels): leave them out (or unset: --set "
            "...thresholds=null --set ...grade_map=null)") in said
    assert "r.yaml:6: data.sources.1: format graded" in said and "--set ...symmetric=false" in said
    assert "r.yaml:7: data.sources.2: format sts" in said and "does not read `label_map` (" in said
    assert "`symmetric`" not in said.split("data.sources.2")[1] and "score_range" not in said  # read by sts
    unset = ["data.sources.0.thresholds=null", "data.sources.0.grade_map=null", "data.sources.1.symmetric=false",
             "data.sources.2.label_map=null"]
    r = load_recipe(tmp_path / "r.yaml", [f"{item}" for item in unset])
    assert [s.format for s in r.data.sources] == ["nli", "graded", "sts"]
    # the built-in recipe's note: SICK graded by its labels, its sts thresholds unset
    builtin = Path(__file__).resolve().parents[1] / "recipes" / "sts-nli-en.yaml"
    nli = ["data.sources.1.format=nli", "data.sources.3.format=nli"]
    with pytest.raises(RecipeError, match="does not read `thresholds`"):
        load_recipe(builtin, nli)
    r = load_recipe(builtin, nli + ["data.sources.1.thresholds=null", "data.sources.3.thresholds=null"])
    assert [s.format for s in r.data.sources] == ["sts", "nli", "sts", "nli"]
    assert "--set data.sources.1.thresholds=null" in builtin.read_text()


def test_an_unknown_column_role_is_refused_with_the_closest_role(tmp_path):
    """`columns: {querry: question}` was no mapping at all: the query came from the header's names
    or the first column without a word. Each unknown role is named, with the closest role; a role's
    column may be a name or an index (sources and eval tasks alike)."""
    from hmcl_cli.data.readers import ROLE_ALIASES
    from hmcl_cli.recipe import COLUMN_ROLES

    assert set(COLUMN_ROLES) == set(ROLE_ALIASES)  # the roles the readers know
    (tmp_path / "r.yaml").write_text(
        "name: r\nmodel: {name_or_path: m}\ndata:\n  sources:\n"
        "    - {path: a.csv, format: sts, columns: {querry: q, candidate: 1, scroe: s, zzz: c}}\n"
        "eval:\n  tasks:\n    - {name: t, type: sts, path: b.csv, columns: {labels: l}}\n")
    said = _refused(tmp_path / "r.yaml")
    assert ("r.yaml:5: data.sources.0.columns: unknown role 'querry' — did you mean 'query'?; unknown role 'scroe' — "
            "did you mean 'score'?; unknown role 'zzz' (the roles: query, candidate, score, label, positive, "
            "negative, prompt;") in said
    assert "eval.tasks.0.columns: unknown role 'labels' — did you mean 'label'?" in said
    ok = load_recipe(tmp_path / "r.yaml", ["data.sources.0.columns={query: q, candidate: 1, score: s}",
                                            "eval.tasks.0.columns={label: l}"])
    assert ok.data.sources[0].columns == {"query": "q", "candidate": 1, "score": "s"}


def test_an_eval_task_key_its_type_does_not_read_is_refused(tmp_path):
    """A hub task (type mteb) with a `path` evaluated the hub's dataset, the file unread; a file's
    task with `mteb_name` evaluated the file. Both are refused when the recipe loads, as are an mteb
    task without `mteb_name` and a file's task without `path` (found only at evaluation before)."""
    (tmp_path / "r.yaml").write_text(
        "name: r\nmodel: {name_or_path: m}\ndata: {sources: [{path: a.jsonl}]}\neval:\n  tasks:\n"
        "    - {name: a, type: sts, path: dev.csv, mteb_name: STSBenchmark}\n"
        "    - {name: b, type: mteb, mteb_name: STSBenchmark, path: dev.csv, score_range: [0, 5]}\n"
        "    - {name: c, type: mteb}\n"
        "    - {name: d, type: reranking}\n")
    said = _refused(tmp_path / "r.yaml")
    assert "r.yaml:6: eval.tasks.0: `mteb_name` is read by tasks of type mteb; this task (sts) reads `path`" in said
    assert "r.yaml:7: eval.tasks.1: a task of type mteb" in said and "`path` and `score_range` would do nothing" in said
    assert "r.yaml:8: eval.tasks.2: a task of type mteb needs `mteb_name`" in said
    assert "r.yaml:9: eval.tasks.3: a task of type reranking reads a file: it needs `path`" in said
    ok = load_recipe(tmp_path / "r.yaml", ["eval.tasks.0.mteb_name=null", "eval.tasks.1.path=null",
                                            "eval.tasks.1.score_range=null", "eval.tasks.2.mteb_name=SICK-R",
                                            "eval.tasks.3.path=dev"])
    assert [t.type for t in ok.eval.tasks] == ["sts", "mteb", "mteb", "reranking"]
