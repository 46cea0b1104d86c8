"""`hmcl recipe new`: a recipe written from data files (hmcl_cli/data/sniff.py, hmcl_cli/new_recipe.py)."""

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from hmcl_cli.data.prepare import prepare
from hmcl_cli.data.sniff import guess_source
from hmcl_cli.errors import DataError, RecipeError
from hmcl_cli.new_recipe import new_recipe
from hmcl_cli.recipe import load_recipe

from test_cli import hmcl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _sentence(i: int, n: int = 7) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" number {i}"


def _csv(path: Path, rows: list, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_all(guess, path: Path) -> int:
    """Examples the guessed source gives when prepare's reader reads the whole file (rejects fail)."""
    from hmcl_cli.data.readers import read_source

    n = 0
    for item in read_source(guess.source(), path):
        assert not hasattr(item, "reason"), item
        n += 1
    return n


def test_scored_pairs_with_a_header_are_sts_on_their_own_scale_and_read_both_ways(tmp_path):
    f = _csv(tmp_path / "sim.csv", [["sentence1", "sentence2", "score"]]
             + [[_sentence(i), _sentence(i + 1), f"{(i % 11) / 10:.1f}"] for i in range(60)])
    g = guess_source(f)
    assert (g.format, g.columns, g.score_range, g.symmetric) == ("sts", {}, (0.0, 1.0), True)
    assert g.rows == 60 and g.levels["pos"] and g.levels["neg"] and not g.rejected
    assert "scores 0 to 1" in g.reasons[0]
    assert _read_all(g, f) == 120  # each row both ways


def test_headerless_scored_pairs_and_columns_in_another_order(tmp_path):
    plain = _csv(tmp_path / "plain.csv", [[_sentence(i), _sentence(i + 2), str(i % 6)] for i in range(40)])
    g = guess_source(plain)
    assert (g.format, g.columns, g.score_range) == ("sts", {}, (0.0, 5.0))
    moved = _csv(tmp_path / "moved.csv", [[str(i % 6), _sentence(i), _sentence(i + 2)] for i in range(40)])
    g = guess_source(moved)
    assert g.format == "sts" and g.columns == {"score": 0, "query": 1, "candidate": 2}
    assert g.header_key is False  # the reader alone would take the first row for a header (a text third)
    assert _read_all(g, moved) == 80


def test_labelled_pairs_nli_answer_selection_and_duplicates(tmp_path):
    nli = _jsonl(tmp_path / "nli.jsonl", [{"premise": _sentence(i), "hypothesis": _sentence(i + 1),
                                           "label": ("entailment", "neutral", "contradiction")[i % 3]} for i in range(30)])
    g = guess_source(nli)
    assert (g.format, g.symmetric) == ("nli", False) and set(g.levels) == {"pos", "weak", "neg"}
    numbered = _jsonl(tmp_path / "nli-ids.jsonl", [{"premise": _sentence(i), "hypothesis": _sentence(i + 1),
                                                    "label": i % 3} for i in range(30)])
    g = guess_source(numbered)  # the Hub copies' numbering: 0 entailment, 1 neutral, 2 contradiction
    assert g.format == "nli" and (g.levels["pos"], g.levels["weak"], g.levels["neg"]) == (10, 10, 10)
    qa = _csv(tmp_path / "qa.csv", [["question", "answer", "label"]]
              + [[_sentence(i // 5), _sentence(100 + i), int(i % 5 == 0)] for i in range(50)])
    g = guess_source(qa)
    assert g.format == "answer_selection" and g.queries == 10 and "5.0 rows per question" in g.reasons[0]
    dup = _csv(tmp_path / "dup.csv", [["question1", "question2", "is_duplicate"]]
               + [[_sentence(i), _sentence(i + 50), i % 2] for i in range(30)])
    g = guess_source(dup)
    assert (g.format, g.symmetric) == ("pairs", True)


def test_graded_relevance_under_a_label_name_is_a_score(tmp_path):
    """`relevance` 0-3 (not 0/1): read as scores on that scale (3 pos, 2 weak), the column named for the reader."""
    f = _csv(tmp_path / "rel.csv", [["query", "document", "relevance"]]
             + [[_sentence(i), _sentence(i + 50), i % 4] for i in range(40)])
    g = guess_source(f)
    assert (g.format, g.columns, g.score_range) == ("sts", {"score": "relevance"}, (0.0, 3.0))
    assert (g.levels["pos"], g.levels["weak"], g.levels["neg"]) == (10, 10, 20)
    assert _read_all(g, f) == 40


def test_triplets_and_unlabelled_pairs(tmp_path):
    trip = _csv(tmp_path / "trip.csv", [["anchor", "positive", "negative"]]
                + [[_sentence(i), _sentence(i + 1), _sentence(i + 9)] for i in range(20)])
    g = guess_source(trip)
    assert g.format == "triplets" and g.levels["pos"] == 20 and g.levels["neg"] == 20
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"question": _sentence(i), "answer": _sentence(i + 3)} for i in range(20)])
    g = guess_source(pairs)
    assert g.format == "triplets" and g.levels["pos"] == 20 and not g.levels["neg"]


def test_columns_left_unread_are_named_and_a_headerless_third_text_is_a_negative(tmp_path):
    extra = _csv(tmp_path / "extra.csv", [["sentence1", "sentence2", "score", "genre"]]
                 + [[_sentence(i), _sentence(i + 50), i % 6, "news"] for i in range(30)])
    g = guess_source(extra)
    assert g.format == "sts" and g.reasons[-1] == "not read: column genre"
    plain = _csv(tmp_path / "plain3.csv", [[_sentence(i), _sentence(i + 50), _sentence(i + 99)] for i in range(30)])
    g = guess_source(plain)
    assert g.format == "triplets" and g.levels["neg"] == 30 and g.reasons[-1] == "column 2 read as negatives"


def test_columns_of_unknown_names_are_guessed_from_what_they_hold(tmp_path):
    f = _csv(tmp_path / "mine.csv", [["id", "title", "body", "relevant"]]
             + [[i, _sentence(i, 4), _sentence(i + 7, 12), i % 2] for i in range(30)])
    g = guess_source(f)
    assert g.format == "pairs"
    assert g.columns == {"query": "title", "candidate": "body", "label": "relevant"}
    assert any("guessed from what the columns hold" in r for r in g.reasons)
    assert _read_all(g, f) == 30


def test_a_row_number_column_is_no_score(tmp_path):
    """pandas' to_csv writes its index as a first column without a name (here with repeats, as after
    a concatenation): not a score; nor is a column of distinct whole numbers (a row number)."""
    import pandas as pd

    f = tmp_path / "pandas.csv"
    pd.DataFrame({"text_a": [_sentence(i) for i in range(40)],
                  "text_b": [_sentence(i + 100) for i in range(40)]}, index=[i % 6 for i in range(40)]).to_csv(f)
    g = guess_source(f)
    assert g.format == "triplets" and g.score_range is None and g.levels["pos"] == 40
    numbered = _csv(tmp_path / "numbered.csv", [["n", "first", "second"]]
                    + [[i, _sentence(i), _sentence(i + 100)] for i in range(40)])
    assert guess_source(numbered).format == "triplets"


def test_semicolon_csv_with_decimal_commas(tmp_path):
    f = _csv(tmp_path / "excel.csv", [["sentence1", "sentence2", "score"]]
             + [[_sentence(i), _sentence(i + 1), f"{i % 5},5"] for i in range(20)], delimiter=";")
    g = guess_source(f)
    assert (g.format, g.delimiter, g.score_range) == ("sts", ";", (0.0, 5.0))
    assert _read_all(g, f) == 40


def test_a_file_that_is_not_utf8_is_read_as_excel_saves_it(tmp_path):
    rows = ["Frage;Antwort;Bewertung"] + [f"Wie lange dauert Nummer {i} die Erstattung?;Die Erstattung {i} dauert "
                                          f"fünf Tage.;{i % 5},5" for i in range(40)]
    f = tmp_path / "excel.csv"
    f.write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    g = guess_source(f)
    assert (g.format, g.encoding, g.delimiter, g.rows, g.rejected_rows) == ("sts", "cp1252", ";", 40, 0)
    assert g.reasons[0].startswith("not UTF-8 (40 of the first 41 rows): read as cp1252")
    assert g.source_keys()["encoding"] == "cp1252" and _read_all(g, f) == 40
    assert "fünf" in g.texts["candidate"][0]
    out, _ = new_recipe([f], out=tmp_path / "x.yaml", encoding="latin-1")  # given: read so, no fallback
    assert load_recipe(out).data.sources[0].encoding == "latin-1"


def test_two_word_labels_get_a_label_map_and_unclear_ones_are_refused(tmp_path):
    yes = _csv(tmp_path / "yes.csv", [["query", "document", "relevance"]]
               + [[_sentence(i), _sentence(i + 5), ("Yes", "No")[i % 2]] for i in range(20)])
    g = guess_source(yes)
    assert g.format == "pairs" and g.label_map == {"Yes": "pos", "No": "neg"}
    assert _read_all(g, yes) == 20
    ab = _csv(tmp_path / "ab.csv", [["query", "document", "relevance"]]
              + [[_sentence(i), _sentence(i + 5), ("A", "B")[i % 2]] for i in range(20)])
    with pytest.raises(DataError, match=r"column relevance holds labels A, B: which level each means"):
        guess_source(ab)


def test_rows_the_reader_rejects_are_counted_and_said(tmp_path):
    rows = [["sentence1", "sentence2", "score"]] + [[_sentence(i), _sentence(i + 50), str(i % 6)] for i in range(30)]
    rows[5][2] = rows[9][2] = rows[12][1] = ""  # two without a score, one without its second text
    f = _csv(tmp_path / "holes.csv", rows)
    g = guess_source(f)
    assert (g.format, g.rows, g.rejected_rows, len(g.rejected)) == ("sts", 30, 3, 3)
    out, said = new_recipe([f], out=tmp_path / "h.yaml")
    assert any(s.startswith("  3 of the 30 rows read are rejected by the reader, e.g. ") for s in said)
    assert "# rejected by the reader: 3 of these rows, e.g. " in out.read_text()


def test_data_that_fits_no_format_is_refused_with_what_was_found(tmp_path):
    one = _csv(tmp_path / "one.csv", [["text"]] + [[_sentence(i)] for i in range(10)])
    with pytest.raises(DataError, match=r"columns text: cannot tell which column is the query"):
        guess_source(one)
    with pytest.raises(DataError, match="does not exist"):
        guess_source(tmp_path / "nope.csv")


def test_graded_jsonl_and_a_beir_folder(tmp_path):
    graded = _jsonl(tmp_path / "g.jsonl", [{"query": _sentence(i), "pos": [_sentence(i + 1)], "neg": [_sentence(i + 2)]}
                                           for i in range(10)])
    assert guess_source(graded).format == "graded"
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "text": _sentence(i)} for i in range(10)])
    _jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": _sentence(i + 30)} for i in range(5)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    g = guess_source(beir)
    assert (g.format, g.qrels_split, g.queries) == ("qrels", "test", 5)


def _written(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_new_recipe_loads_prepares_every_row_and_suits_the_data(tmp_path, monkeypatch, tiny_bert):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    train = _csv(tmp_path / "data" / "faq-train.csv", [["question", "answer", "label"]]
                 + [[_sentence(i // 4), _sentence(200 + i), int(i % 4 == 0)] for i in range(400)])
    _csv(tmp_path / "data" / "faq-dev.csv", [["question", "answer", "label"]]
         + [[_sentence(1000 + i // 4), _sentence(300 + i), int(i % 4 == 0)] for i in range(80)])
    model = os.path.relpath(tiny_bert, tmp_path)
    out, said = new_recipe([Path("data/faq-train.csv")], dev=[Path("data/faq-dev.csv")], out=Path("recipes/faq.yaml"),
                           model=model)
    assert out == Path("recipes/faq.yaml") and any("format answer_selection" in s for s in said)
    r = _written(out)
    assert r["name"] == "faq"  # the file's name without "-train"
    assert [s["path"] for s in r["data"]["sources"]] == ["../data/faq-train.csv", "../data/faq-dev.csv"]  # from its folder
    assert r["model"]["name_or_path"] == os.path.join("..", model)  # a local model folder too
    assert [s.get("split") for s in r["data"]["sources"]] == ["train", "dev"]
    assert r["eval"]["gate"] == ["dev-reranking:map>=base"] and r["train"]["metric_for_best"] == "dev_map"
    assert r["mine"]["enabled"] is False and r["train"]["epochs"] == 10  # 100 queries: 4 steps an epoch
    assert "group_size" not in r["train"] and "eval_steps" not in r["train"]  # 4 candidates a query; 10 evals
    assert "# columns question, answer, label: labels 0, 1" in out.read_text()
    stats = prepare(load_recipe(out), progress=False)
    assert stats["sources"]["faq-train"]["rows"] == 400 and stats["sources"]["faq-dev"]["rows"] == 80
    assert stats["sources"]["faq-train"]["rejected"] == 0
    assert stats["splits"]["train"]["examples"] == 100 and stats["splits"]["dev"]["examples"] == 20
    with pytest.raises(RecipeError, match="exists"):
        new_recipe([train], out=out)
    assert _written(out)["data"]["sources"][1]["split"] == "dev"  # untouched
    new_recipe([train.resolve()], out=out, force=True)  # an absolute path stays absolute
    r = _written(out)
    assert r["data"]["sources"][0]["path"] == str(train.resolve()) and "split" not in r["data"]["sources"][0]
    assert r["data"]["dev_fraction"] == 0.25  # 100 queries: a drawn dev split of 10% would be 10
    assert not list(out.parent.glob(".*tmp"))
    new_recipe([train], dev=[train], out=out, force=True)  # one file named twice: two sources, each its split
    assert [(s["name"], s["split"]) for s in _written(out)["data"]["sources"]] == [("faq-train", "train"),
                                                                                   ("faq-train'", "dev")]


def test_new_recipe_for_scored_pairs_and_for_pairs_without_negatives(tmp_path):
    sim = _csv(tmp_path / "sim.csv", [[_sentence(i), _sentence(i + 5000), str(i % 6)] for i in range(3000)])
    out, _ = new_recipe([sim], out=tmp_path / "sim.yaml", sample=500)
    r = _written(out)
    assert "# 500 rows read of 3,000: 1,000 queries" in out.read_text()  # (each row both ways)
    # 6,000 queries less 600 drawn for dev: 169 steps of 32, one epoch, dev five times in it
    assert (r["train"]["epochs"], r["train"]["eval_steps"]) == (1, 33)
    assert r["eval"]["tasks"] == [{"name": "dev-sts", "type": "sts", "path": "dev", "format": "graded"}]
    assert r["eval"]["gate"] == ["dev-sts:spearman>=base"] and r["train"]["metric_for_best"] == "dev_spearman"
    assert r["data"]["sources"][0]["symmetric"] is True and r["data"]["dev_fraction"] == 0.1
    assert r["mine"]["enabled"] is False
    dev = _csv(tmp_path / "sim-dev.csv", [[_sentence(i), _sentence(i + 7000), str(i % 6)] for i in range(9000, 9100)])
    out, _ = new_recipe([sim], dev=[dev], out=tmp_path / "sim2.yaml")
    r = _written(out)
    assert [s.get("symmetric") for s in r["data"]["sources"]] == [True, None]  # dev pairs count once
    assert r["eval"]["tasks"] == [{"name": "sim-dev-sts", "type": "sts", "path": str(dev), "score_range": [0, 5]}]
    assert r["eval"]["gate"] == ["sim-dev-sts:spearman>=base"]
    pairs = _jsonl(tmp_path / "qa.jsonl", [{"query": _sentence(i), "positive": _sentence(i + 5)} for i in range(1400)])
    out, said = new_recipe([pairs], out=tmp_path / "qa.yaml")
    r = _written(out)
    assert r["mine"]["enabled"] is True and "mine: on" in " ".join(said)  # 1,400 distinct positives to mine from
    few = _jsonl(tmp_path / "few.jsonl", [{"query": _sentence(i), "positive": _sentence(5000 + i % 60)}
                                          for i in range(1400)])
    out, said = new_recipe([few], out=tmp_path / "few.yaml")
    assert _written(out)["mine"]["enabled"] is False and "only 60 distinct candidates" in " ".join(said)
    assert [t["type"] for t in r["eval"]["tasks"]] == ["retrieval"] and r["eval"]["gate"] == ["dev-retrieval:ndcg@10>=base"]


def test_a_decoder_llm_trains_lora_adapters(tmp_path, tiny_qwen, tiny_bert):
    f = _jsonl(tmp_path / "g.jsonl", [{"query": _sentence(i), "pos": [_sentence(i + 1)]} for i in range(10)])
    out, said = new_recipe([f], model=str(tiny_qwen), out=tmp_path / "q.yaml")
    m = load_recipe(out).model
    assert m.lora.enabled and m.gradient_checkpointing and "a decoder LLM" in out.read_text()
    assert any("LoRA (a decoder LLM)" in s for s in said)
    out, said = new_recipe([f], model=str(tiny_bert), out=tmp_path / "b.yaml")
    assert not load_recipe(out).model.lora.enabled and not any("LoRA" in s for s in said)
    out, said = new_recipe([f], model=str(tiny_bert), out=tmp_path / "b2.yaml", lora=True)
    assert load_recipe(out).model.lora.enabled
    out, said = new_recipe([f], model="someone/not-downloaded", out=tmp_path / "h.yaml")
    assert not load_recipe(out).model.lora.enabled and any("add --lora" in s for s in said)


def test_max_lengths_follow_the_data_where_they_run_past_the_default(tmp_path, tiny_bert):
    """Counted in the model's tokens (tiny_bert: a word a token, 256 positions): documents of ~180
    words get a doc_max_length that holds them; short queries keep the default."""
    def rows(words):
        return [{"query": _sentence(i), "pos": [_sentence(i + 1, words)]} for i in range(300)]

    out, said = new_recipe([_jsonl(tmp_path / "long.jsonl", rows(180))], model=str(tiny_bert), out=tmp_path / "l.yaml")
    m = load_recipe(out).model
    assert (m.doc_max_length, m.query_max_length, m.max_length) == (192, None, 128)
    assert any("model.doc_max_length 192" in s for s in said) and "would cut 100% of them" in out.read_text()
    out, _ = new_recipe([_jsonl(tmp_path / "longer.jsonl", rows(400))], model=str(tiny_bert), out=tmp_path / "x.yaml")
    assert load_recipe(out).model.doc_max_length == 256 and "model.segments encodes it whole" in out.read_text()
    # the texts are drawn from the whole sample, not its head: short documents first, long ones after
    mixed = [{"query": _sentence(i), "pos": [_sentence(i + 1, 20 if i < 2500 else 180)]} for i in range(5000)]
    out, _ = new_recipe([_jsonl(tmp_path / "mixed.jsonl", mixed)], model=str(tiny_bert), out=tmp_path / "m.yaml")
    assert load_recipe(out).model.doc_max_length == 192
    out, _ = new_recipe([_jsonl(tmp_path / "short.jsonl", rows(20))], model=str(tiny_bert), out=tmp_path / "s.yaml")
    m = load_recipe(out).model
    assert (m.doc_max_length, m.query_max_length) == (None, None) and "_max_length:" not in out.read_text()


def test_a_vocabulary_without_the_datas_script_is_warned_about_in_the_recipe(tmp_path, tiny_bert):
    """tiny_bert's vocabulary holds the quickstart sample's words and no Chinese."""
    known = ["size", "exchange", "free", "refund", "card", "days", "order", "return"]

    def rows(words):
        return [{"query": f"{words} {a} {b}", "pos": [f"{words} {a}"]} for a in known for b in known]

    out, said = new_recipe([_jsonl(tmp_path / "en.jsonl", rows("shoes ship"))], model=str(tiny_bert),
                           out=tmp_path / "en.yaml")
    assert "unknown token" not in out.read_text() and not any(s.startswith("warning") for s in said)
    out, said = new_recipe([_jsonl(tmp_path / "zh.jsonl", rows("飞机 起飞"))], model=str(tiny_bert),
                           out=tmp_path / "zh.yaml")
    # [CLS] 飞机 起飞 a b [SEP]: 2 of 6; [CLS] 飞机 起飞 a [SEP]: 2 of 5
    assert said[0].startswith("warning: 33% of the query texts' tokens and 40% of the candidate texts' tokens are")
    assert "# warning: 33% of the query texts' tokens" in out.read_text() and "multilingual" in out.read_text()


def test_a_recipe_that_would_not_load_is_not_written(tmp_path, monkeypatch):
    import hmcl_cli.new_recipe as nr

    f = _jsonl(tmp_path / "g.jsonl", [{"query": _sentence(i), "pos": [_sentence(i + 1)]} for i in range(10)])
    real = nr.recipe_text
    monkeypatch.setattr(nr, "recipe_text", lambda *a: (real(*a)[0].replace("batch_size:", "batch_sise:"), []))
    with pytest.raises(RecipeError, match="batch_sise"):
        new_recipe([f], out=tmp_path / "g.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jsonl"]  # neither the recipe nor a temporary file


def test_cli_recipe_new_then_run(tmp_path, tiny_bert):
    """The written recipe runs end to end (prepare, train, eval with its gate) with a tiny model."""
    train = _jsonl(tmp_path / "support-train.jsonl", [{"query": _sentence(i), "pos": [_sentence(i + 40)],
                                                       "neg": [_sentence(i + 80)]} for i in range(64)])
    out = hmcl("recipe", "new", train, "--model", tiny_bert, "--out", tmp_path / "s.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "format graded" in out.stdout and "hmcl run" in out.stdout
    run = hmcl("run", tmp_path / "s.yaml", "--set", "train.epochs=1", "--set", "export.enabled=false", cwd=tmp_path)
    assert run.returncode in (0, 6), run.stderr[-3000:]  # 6: the random model did not pass the gate
    results = json.loads((tmp_path / "runs" / "support" / "eval" / "results.json").read_text())
    assert list(results["tasks"]) == ["dev-retrieval", "dev-reranking"] and list(results["models"]) == ["base", "fine-tuned"]
    assert [g["gate"] for g in results["gates"]] == ["dev-retrieval:ndcg@10>=base"]
    assert run.returncode == (0 if results["gates"][0]["passed"] else 6)
    again = hmcl("recipe", "new", train, "--out", tmp_path / "s.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_the_shared_data_sets_are_read_as_the_built_in_recipes_read_them():
    stsb = guess_source(DATA / "stsb" / "stsb-en-train.csv")
    assert (stsb.format, stsb.score_range, stsb.symmetric, stsb.rows) == ("sts", (0.0, 5.0), True, 5749)
    sick = guess_source(DATA / "sick" / "SICK_train.txt")
    assert (sick.format, sick.score_range, sick.symmetric, sick.columns) == ("sts", (1.0, 5.0), True, {})
    assert any("entailment_judgment holds NLI labels" in r for r in sick.reasons)
    trec = guess_source(DATA / "trecqa" / "trecqa-train.csv")
    assert (trec.format, trec.queries, trec.rejected) == ("answer_selection", 93, [])


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_a_recipe_for_trecqa_takes_more_candidates_a_step_and_gates_on_map(tmp_path):
    out, _ = new_recipe([DATA / "trecqa" / "trecqa-train.csv"], dev=[DATA / "trecqa" / "trecqa-dev.csv"],
                        out=tmp_path / "t.yaml")
    r = _written(out)
    assert r["train"]["group_size"] == 8 and r["eval"]["gate"] == ["dev-reranking:map>=base"]
