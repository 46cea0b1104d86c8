"""`hmcl prepare` on the real sets in ../shared/data and on every kind of bad input.

Level counts are recomputed here from the raw files with the csv module, independently of the
readers, and compared with what prepare writes.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
from conftest import ROOT, SHARED, needs_shared

from hmcl_cli.data.prepare import prepare
from hmcl_cli.errors import DataError
from hmcl_cli.recipe import load_recipe

LEVEL = {2: "pos", 1: "weak", 0: "neg"}


def _recipe(tmp_path: Path, sources: list[dict], **data) -> "object":
    return load_recipe(data={
        "name": "prep", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "unused"},
        "data": {"sources": sources, **data},
    })


def _written(tmp_path: Path, split: str = "train") -> list[dict]:
    path = tmp_path / "run" / "data" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _output_levels(rows: list[dict]) -> Counter:
    return Counter({k: sum(len(r[k]) for r in rows) for k in ("pos", "weak", "neg")})


def _expected(pairs: list[tuple[str, str, int]]) -> tuple[Counter, Counter, int]:
    """Raw level counts, and counts after merging per query with the highest level winning."""
    raw = Counter(LEVEL[lvl] for _, _, lvl in pairs)
    best: dict[tuple[str, str], int] = {}
    for q, c, lvl in pairs:
        best[(q, c)] = max(lvl, best.get((q, c), -1))
    merged = Counter(LEVEL[lvl] for lvl in best.values())
    return raw, merged, len({q for q, _ in best})


def _sts_level(score: float, pos: float = 4.0, weak: float = 2.0) -> int:
    return 2 if score >= pos else 1 if score >= weak else 0


@needs_shared
@pytest.mark.parametrize("lang", ["en", "de", "zh"])
def test_stsb_sts_levels_match_raw_file(tmp_path, lang):
    path = SHARED / ("stsb" if lang == "en" else "stsb-multi") / f"stsb-{lang}-train.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    pairs = [(r[0], r[1], _sts_level(float(r[2]))) for r in rows]
    raw, merged, n_queries = _expected(pairs)
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "split": "train",
                                        "score_range": [0, 5]}]), progress=False)
    src = stats["sources"]["stsb-%s-train.csv" % lang]
    assert src["rows"] == len(rows) == {"en": 5749}.get(lang, len(rows))
    assert src["rejected"] == 0
    assert Counter(src["candidates_per_level"]) == raw
    out = _written(tmp_path)
    assert _output_levels(out) == merged and len(out) == n_queries
    # text and scores intact (multilingual, punctuation, no normalisation)
    first = next(r for r in out if r["query"] == rows[0][0])
    kept = [t for k in ("pos", "weak", "neg") for t in first[k]]
    assert rows[0][1] in kept
    level = LEVEL[_sts_level(float(rows[0][2]))]
    assert first[f"{level}_scores"][first[level].index(rows[0][1])] == pytest.approx(float(rows[0][2]))
    if lang == "zh":
        assert any("\u4e00" <= ch <= "\u9fff" for ch in first["query"])


@needs_shared
def test_sick_nli_labels_to_levels(tmp_path):
    path = SHARED / "sick" / "SICK_train.txt"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    mapping = {"ENTAILMENT": 2, "NEUTRAL": 1, "CONTRADICTION": 0}
    pairs = [(r["sentence_A"], r["sentence_B"], mapping[r["entailment_judgment"]]) for r in rows]
    raw, merged, n_queries = _expected(pairs)
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "nli", "split": "train"}]), progress=False)
    src = stats["sources"]["SICK_train.txt"]
    assert src["rows"] == len(rows) == 4500
    assert Counter(src["candidates_per_level"]) == raw
    out = _written(tmp_path)
    assert _output_levels(out) == merged and len(out) == n_queries
    # relatedness_score kept as the candidate score
    r0 = rows[0]
    ex = next(r for r in out if r["query"] == r0["sentence_A"])
    lvl = LEVEL[mapping[r0["entailment_judgment"]]]
    assert ex[f"{lvl}_scores"][ex[lvl].index(r0["sentence_B"])] == pytest.approx(float(r0["relatedness_score"]))


@needs_shared
def test_trecqa_answer_selection_groups_per_question(tmp_path):
    path = SHARED / "trecqa" / "trecqa-train.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = [(r["qtext"], r["atext"], 2 if r["label"] == "1" else 0) for r in rows]
    raw, merged, n_queries = _expected(pairs)
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "answer_selection"}],
                            dev_fraction=0.2), progress=False)
    src = stats["sources"]["trecqa-train.csv"]
    assert src["rows"] == len(rows)
    assert Counter(src["candidates_per_level"]) == raw
    train, dev = _written(tmp_path, "train"), _written(tmp_path, "dev")
    assert _output_levels(train) + _output_levels(dev) == merged
    assert len(train) + len(dev) == n_queries
    # split by query: no question in both splits, and the split is deterministic
    assert not {r["query"] for r in train} & {r["query"] for r in dev}
    assert 0.1 < len(dev) / n_queries < 0.3
    again = prepare(_recipe(tmp_path, [{"path": str(path), "format": "answer_selection"}],
                            dev_fraction=0.2), progress=False)
    assert again["splits"] == stats["splits"]


def _beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    docs = {"d1": ("Refunds", "Money back within 30 days."), "d2": ("", "Shipping takes a week."),
            "d3": ("Returns", "Return labels are free."), "d4": ("", "We are closed on Sunday.")}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, (t, x) in docs.items()), encoding="utf-8")
    (folder / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "how do I get a refund"}) + "\n"
        + json.dumps({"_id": "q2", "text": "when will my parcel arrive"}) + "\n", encoding="utf-8")
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq1\td4\t0\nq2\td2\t2\n", encoding="utf-8")
    return folder


def test_beir_qrels_grades_to_levels(tmp_path):
    folder = _beir(tmp_path / "beir")
    prepare(_recipe(tmp_path, [{"path": str(folder), "format": "qrels", "split": "train"}]), progress=False)
    out = {r["query"]: r for r in _written(tmp_path)}
    q1 = out["how do I get a refund"]
    assert q1["pos"] == ["Refunds Money back within 30 days."]
    assert q1["weak"] == ["Returns Return labels are free."]
    assert q1["neg"] == ["We are closed on Sunday."]
    assert out["when will my parcel arrive"]["pos"] == ["Shipping takes a week."]
    # an explicit grade map: grade 1 counts as positive
    prepare(_recipe(tmp_path, [{"path": str(folder), "format": "qrels", "split": "train",
                                "grade_map": {2: "pos", 1: "pos", 0: "neg"}}]), progress=False)
    q1 = {r["query"]: r for r in _written(tmp_path)}["how do I get a refund"]
    assert len(q1["pos"]) == 2 and not q1["weak"]


def test_mixed_sources_merge_by_query_and_conflicts_follow_the_rule(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"query": "q", "pos": ["x"], "neg": ["y"]}) + "\n", encoding="utf-8")
    b = tmp_path / "b.csv"
    b.write_text("q,y,4.5\nq,z,3.0\nq,x,4.8\n", encoding="utf-8")
    for rule, y_level in (("highest", "pos"), ("lowest", "neg")):
        stats = prepare(_recipe(tmp_path, [{"path": str(a), "split": "train"},
                                           {"path": str(b), "format": "sts", "split": "train"}],
                                conflict=rule), progress=False)
        (row,) = _written(tmp_path)
        assert "y" in row[y_level] and row["weak"] == ["z"] and "x" in row["pos"]
        assert stats["conflicts"] == {"count": 1, "rule": rule}
        assert stats["duplicates_removed"] == 1  # (q, x) given twice at the same level
        # 4 examples in (1 row of a, 3 of b), all of query q: one out, 3 joined to it
        assert sum(s["examples"] for s in stats["sources"].values()) == 4
        assert stats["splits"]["train"]["examples"] == 1 and stats["combined_same_query"] == 3


def test_examples_left_without_enough_candidates_are_counted_and_announced(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [
        {"query": "q1", "pos": ["x"]},                 # loses its only candidate to the conflict
        {"query": "q1", "neg": ["x"]},
        {"query": "q2", "pos": ["y"], "neg": ["z"]},   # kept
        {"query": "q3", "pos": ["w"]},                 # one candidate: below min_candidates 2
    ]) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    stats = prepare(_recipe(tmp_path, [{"path": str(a), "split": "train"}, {"path": str(empty), "split": "train"}],
                            conflict="drop", min_candidates=2), progress=False)
    assert [r["query"] for r in _written(tmp_path)] == ["q2"]
    assert stats["splits"]["train"]["dropped_too_few_candidates"] == 2
    assert stats["splits"]["dev"]["dropped_too_few_candidates"] == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "train: 2 of 3 examples have fewer than 2 candidate(s)" in err
    assert f"data source {empty} holds no rows" in err


def test_leakage_is_reported(tmp_path, capsys):
    a = tmp_path / "train.jsonl"
    a.write_text(json.dumps({"query": "q1", "pos": ["shared answer"]}) + "\n"
                 + json.dumps({"query": "q3", "pos": ["a pair"], "neg": ["q4"]}) + "\n", encoding="utf-8")
    b = tmp_path / "dev.jsonl"
    b.write_text(json.dumps({"query": "q2", "pos": ["shared answer"]}) + "\n"
                 + json.dumps({"query": "q1", "pos": ["other"]}) + "\n"
                 # the train pair (q3, "a pair") the other way round, and q4: a train candidate as a query
                 + json.dumps({"query": "a pair", "pos": ["q3"]}) + "\n"
                 + json.dumps({"query": "q4", "pos": ["new"]}) + "\n", encoding="utf-8")
    stats = prepare(_recipe(tmp_path, [{"path": str(a), "split": "train"}, {"path": str(b), "split": "dev"}]),
                    progress=False)
    leak = stats["leakage"]
    assert leak["queries_in_several_splits"] == 1  # q1
    assert leak["dev_test_pairs_in_train"] == 1  # ("a pair", "q3")
    assert leak["dev_test_queries_in_train"] == 3  # q1, "a pair", q4
    assert (leak["dev_test_candidates_in_train"], leak["dev_test_candidates"]) == (2, 4)  # "shared answer", q3
    err = " ".join(capsys.readouterr().err.split())
    assert "1 dev/test (query, candidate) pairs are also train pairs" in err
    # which query, where, what it does to the metrics and what would hold it out
    assert ("1 queries are in more than one split (the sources' `split` put them there; e.g. 'q1' in train and dev): "
            "the model trains on these queries, so the dev/test metrics on them are partly on training data") in err
    from hmcl_cli.data.prepare import print_stats

    print_stats(stats)  # what `hmcl prepare` shows: words, not the stats' dict
    out = " ".join(capsys.readouterr().out.split())
    assert ("leakage: queries in several splits 1, dev/test pairs also train pairs 1, "
            "dev/test queries that are train texts 3") in out
    assert "dev/test candidates that are also train texts: 2 of 4 (normal where" in out


def test_a_shared_document_collection_is_not_called_leakage(tmp_path, capsys):
    """Dev queries new, their answers drawn from the collection train uses: no warning, and the shared
    candidates are told apart from leaked pairs."""
    rows = [{"query": f"question {i}", "pos": [f"answer {i % 3}"], "neg": [f"answer {(i + 1) % 3}"]} for i in range(40)]
    a = tmp_path / "train.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]), encoding="utf-8")
    b = tmp_path / "dev.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[30:]), encoding="utf-8")
    stats = prepare(_recipe(tmp_path, [{"path": str(a), "split": "train"}, {"path": str(b), "split": "dev"}]),
                    progress=False)
    leak = stats["leakage"]
    assert leak == {"queries_in_several_splits": 0, "dev_test_pairs_in_train": 0, "drawn_dev_test_pairs_in_train": 0,
                    "dev_test_queries_in_train": 0,
                    "dev_test_candidates_in_train": 20, "dev_test_candidates": 20}
    assert "pairs are also train pairs" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# bad input: fail names file, line and reason; skip counts it
# ------------------------------------------------------------------------------------------

BAD_CASES = {
    # name: (file, content, source options, message part, line, stats reason, good examples)
    "unknown label": ("nli.tsv", "premise\thypothesis\tlabel\na\tb\tentailment\nc\td\tmaybe\n",
                      {"format": "nli"}, "unknown label 'maybe'", 3, "unknown label", 1),
    "empty text": ("sts.csv", "a,b,4.0\n,b,3.0\nc,d,1.0\n", {"format": "sts"}, "empty text in `query`", 2,
                   "empty text", 2),
    "score out of range": ("sts.csv", "a,b,4.0\nc,d,7.5\n", {"format": "sts", "score_range": [0, 5]},
                           "score 7.5 outside the declared range [0, 5]", 2, "score out of range", 1),
    "score not a number": ("sts.csv", "a,b,4.0\nc,d,high\ne,f,1\n", {"format": "sts"},
                           "score 'high' is not a number", 2, "bad score", 2),
    "broken CSV line (quote)": ("sts.csv", 'a,b,4.0\n"c,d,1.0\ne,f,2.0\n', {"format": "sts"},
                                "broken CSV line", 2, "broken CSV line", 1),
    "broken CSV line (fields)": ("sts.csv", "a,b,4.0\nc d 1.0\ne,f,2.0\n", {"format": "sts"},
                                 "broken line: 1 fields", 2, "broken CSV line", 2),
    "invalid JSON": ("g.jsonl", '{"query": "a", "pos": ["b"]}\n{"query": "c", "pos": [\n',
                     {"format": "graded"}, "invalid JSON", 2, "invalid JSON", 1),
    "not UTF-8": ("sts.csv", b"a,b,4.0\nc\xff,d,1.0\n", {"format": "sts"}, "not UTF-8", 2, "not UTF-8", 1),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_fails_with_location_or_is_counted_when_skipped(tmp_path, case):
    name, content, options, message, line, reason, good = BAD_CASES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    source = {"path": str(path), "split": "train", **options}
    with pytest.raises(DataError) as err:
        prepare(_recipe(tmp_path, [source]), progress=False)
    text = str(err.value)
    assert f"{path}:{line}" in text and message in text, text
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()  # nothing half-written

    stats = prepare(_recipe(tmp_path, [source], on_error="skip"), progress=False)
    st = stats["sources"][name]
    assert st["rejected"] == 1 and st["rejected_by_reason"] == {reason: 1}
    assert f"{path}:{line}" in st["first_rejections"][0]
    assert len(_written(tmp_path)) == good


def test_missing_file_and_missing_column(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"data source {missing} does not exist"):
        prepare(_recipe(tmp_path, [{"path": str(missing), "format": "sts"}]), progress=False)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"query": "a", "pos": ["b"]}) + "\n", encoding="utf-8")
    stats = prepare(_recipe(tmp_path, [{"path": str(missing), "format": "sts"}, {"path": str(ok), "split": "train"}],
                            on_error="skip"), progress=False)
    assert stats["sources"]["nope.csv"]["rejected_by_reason"] == {"missing file": 1}

    headed = tmp_path / "pairs.csv"
    headed.write_text("text_a,text_b,gold\nx,y,1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare(_recipe(tmp_path, [{"path": str(headed), "format": "pairs",
                                    "columns": {"query": "text_a", "candidate": "text_b", "label": "relevant"}}]),
                progress=False)
    assert str(headed) in str(err.value) and "'relevant'" in str(err.value) and "text_a, text_b, gold" in str(err.value)


def test_pairs_with_user_label_map_and_triplets(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("text_a,text_b,gold\nq,a,good\nq,b,ok\nq,c,bad\n", encoding="utf-8")
    trip = tmp_path / "trip.jsonl"
    trip.write_text(json.dumps({"anchor": "q", "positive": "d", "negative": "e"}) + "\n", encoding="utf-8")
    prepare(_recipe(tmp_path, [
        {"path": str(pairs), "format": "pairs", "split": "train",
         "columns": {"query": "text_a", "candidate": "text_b", "label": "gold"},
         "label_map": {"good": "pos", "ok": "weak", "bad": "neg"}},
        {"path": str(trip), "format": "triplets", "split": "train"}]), progress=False)
    (row,) = _written(tmp_path)
    assert row["pos"] == ["a", "d"] and row["weak"] == ["b"] and row["neg"] == ["c", "e"]


def test_parquet_source(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "sts.parquet"
    pq.write_table(pa.table({"sentence1": ["a", "c"], "sentence2": ["b", "d"], "score": [4.5, 0.5]}), path)
    prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "split": "train"}]), progress=False)
    rows = {r["query"]: r for r in _written(tmp_path)}
    assert rows["a"]["pos"] == ["b"] and rows["c"]["neg"] == ["d"]


@needs_shared
def test_sts_nli_recipe_prepares_train_and_dev_with_overridable_paths(tmp_path):
    recipe_file = ROOT / "recipes" / "sts-nli-en.yaml"
    recipe = load_recipe(recipe_file, [f"output_dir={tmp_path / 'run'}"])
    stats = prepare(recipe, progress=False)
    src = stats["sources"]
    assert src["stsb-train"]["examples_per_split"] == {"train": 2 * 5749}  # symmetric pairs
    assert src["sick-train"]["examples_per_split"] == {"train": 2 * 4500}
    assert src["stsb-dev"]["examples_per_split"] == {"dev": 1500}
    assert src["sick-trial"]["examples_per_split"] == {"dev": 500}
    # --set replaces one path: a 3-row STS file instead of STS-B train
    small = tmp_path / "small.csv"
    small.write_text("a,b,5\nc,d,3\ne,f,0\n", encoding="utf-8")
    recipe = load_recipe(recipe_file, [f"output_dir={tmp_path / 'run2'}", f"data.sources.0.path={small}"])
    stats = prepare(recipe, progress=False)
    assert stats["sources"]["stsb-train"]["rows"] == 3


def test_flagembedding_jsonl_as_is(tmp_path):
    path = tmp_path / "fe.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["a"], "neg": ["b", "c"], "pos_scores": [1.0],
                                "neg_scores": [0.2, 0.1], "prompt": "Represent: ", "type": "normal"}) + "\n",
                    encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(path), "split": "train"}]), progress=False)
    (row,) = _written(tmp_path)
    assert row["pos"] == ["a"] and row["neg"] == ["b", "c"] and row["weak"] == []
    assert row["neg_scores"] == [0.2, 0.1] and row["prompt"] == "Represent: "


def test_scores_survive_merging_with_a_source_without_scores_and_null_means_none(tmp_path):
    """One query from two sources, only one of them scored: the scores it has are kept (null for
    the candidate without one) instead of dropping the level's scores; null is read back as no score."""
    scored, plain = tmp_path / "scored.jsonl", tmp_path / "plain.jsonl"
    scored.write_text(json.dumps({"query": "q", "pos": ["a"], "neg": ["b", "c"], "pos_scores": [0.9],
                                  "neg_scores": [0.2, None]}) + "\n", encoding="utf-8")
    plain.write_text(json.dumps({"query": "q", "pos": ["d"], "neg": ["e"]}) + "\n", encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(scored), "split": "train"}, {"path": str(plain), "split": "train"}]),
            progress=False)
    (row,) = _written(tmp_path)
    assert dict(zip(row["pos"], row["pos_scores"])) == {"a": 0.9, "d": None}
    assert dict(zip(row["neg"], row["neg_scores"])) == {"b": 0.2, "c": None, "e": None}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["a"], "pos_scores": ["high"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1.*non-number 'high' \(use null for no score\)"):
        prepare(_recipe(tmp_path, [{"path": str(bad), "split": "train"}]), progress=False)


def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub dataset 'mteb/stsbenchmark-sts' cannot be read: HF_HUB_OFFLINE is set"):
        prepare(_recipe(tmp_path, [{"hub": "mteb/stsbenchmark-sts", "format": "sts"}]), progress=False)


def test_hub_source_without_network_fails_at_once(tmp_path, monkeypatch, hub_down):
    """No offline switch and no network: one quick probe says so, instead of the datasets client's
    retries (~25 s of back-off measured here before the probe)."""
    import time

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub's client was called"))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=f"hub dataset 'mteb/stsbenchmark-sts' cannot be read: {hub_down} cannot be "
                                        "reached: ConnectError"):
        prepare(_recipe(tmp_path, [{"hub": "mteb/stsbenchmark-sts", "format": "sts"}]), progress=False)
    assert time.perf_counter() - t0 < 5


def test_hub_source_uses_the_same_column_mapping(tmp_path, monkeypatch, hub_up):
    """The hub path streams rows from datasets.load_dataset; stub it to check the mapping."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"s1": "a", "s2": "b", "sim": 4.5}, {"s1": "c", "s2": "d", "sim": 1.0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    prepare(_recipe(tmp_path, [{"hub": "org/sts", "hub_split": "validation", "format": "sts", "split": "train",
                                "columns": {"query": "s1", "candidate": "s2", "score": "sim"}}]), progress=False)
    assert calls == [("org/sts", None, "validation", True)]
    rows = {r["query"]: r for r in _written(tmp_path)}
    assert rows["a"]["pos"] == ["b"] and rows["c"]["neg"] == ["d"]


def test_an_undecodable_line_reaches_the_csv_reader_without_nul(tmp_path):
    """The marker an undecodable line becomes passes through csv.reader; Python 3.10's csv refuses
    any line with NUL in it ("line contains NUL"), which turned every not-UTF-8 row there into a
    'broken CSV line' (measured on 3.10.13), so the marker must hold none."""
    from hmcl_cli.data.readers import _decoded_lines

    path = tmp_path / "x.csv"
    path.write_bytes(b"a,b\nc\xff,d\n")
    lines = list(_decoded_lines(path))
    assert lines[0] == "a,b\n" and lines[1] != "c\xff,d\n"  # the second is the marker
    assert all("\x00" not in line for line in lines), lines
    assert len(list(csv.reader(lines))) == 2


def test_labels_written_as_floats_read_as_their_integers(tmp_path, tiny_bert):
    """A CSV written from a float column (pandas writes 1.0 where a column had a gap): `1.0` and
    `0.0` are the labels 1 and 0, for pairs and answer selection alike; `1.5` is still unknown."""
    from conftest import write_recipe

    from hmcl_cli.data.prepare import load_graded, prepare
    from hmcl_cli.errors import DataError
    from hmcl_cli.recipe import load_recipe

    (tmp_path / "f.csv").write_text("question,answer,label\nhow do refunds work,five days,1.0\n"
                                    "how do refunds work,we ship to canada,0.0\nreset password,the login page,1\n"
                                    "reset password,sellers are paid,0.00\n")
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, data={"sources": [
        {"path": "f.csv", "format": "answer_selection", "split": "train"}]}))
    prepare(recipe, progress=False)
    got = {ex.query: ({t for t, c in ex.candidates.items() if c.level == 2}, {t for t, c in ex.candidates.items() if c.level == 0})
           for ex in load_graded(recipe.run_dir / "data" / "train.jsonl")}
    assert got == {"how do refunds work": ({"five days"}, {"we ship to canada"}),
                   "reset password": ({"the login page"}, {"sellers are paid"})}
    (tmp_path / "f.csv").write_text("question,answer,label\nq,a,1.5\n")
    with pytest.raises(DataError, match="unknown label '1.5'"):
        prepare(recipe, progress=False)


def test_sts_thresholds_follow_a_declared_score_range(tmp_path, capsys):
    """The default thresholds (4 and 2 on 0-5) sit at 80% and 40% of a declared score_range; the
    same pairs scored 0-5 and 0-1 grade alike. Given thresholds win, a level at a time."""
    five = tmp_path / "five.csv"
    five.write_text("".join(f"a{i},b{i},{i / 4:g}\n" for i in range(21)), encoding="utf-8")  # 0, 0.25, ... 5
    one = tmp_path / "one.csv"
    one.write_text("".join(f"a{i},b{i},{i / 20:g}\n" for i in range(21)), encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(five), "format": "sts", "split": "train"}]), progress=False)
    graded_five = _output_levels(_written(tmp_path))
    assert graded_five == Counter(pos=5, weak=8, neg=8)  # >= 4: 5 pairs; [2, 4): 8
    prepare(_recipe(tmp_path, [{"path": str(one), "format": "sts", "split": "train", "score_range": [0, 1]}]),
            progress=False)
    assert _output_levels(_written(tmp_path)) == graded_five
    prepare(_recipe(tmp_path, [{"path": str(one), "format": "sts", "split": "train", "score_range": [0, 1],
                                "thresholds": {"pos": 0.9}}]), progress=False)
    assert _output_levels(_written(tmp_path)) == Counter(pos=3, weak=10, neg=8)
    # thresholds given on another scale than the scores: a warning, the data as asked
    prepare(_recipe(tmp_path, [{"path": str(one), "format": "sts", "split": "train",
                                "thresholds": {"pos": 4, "weak": 3}}], min_candidates=1), progress=False)
    assert "all 21 pairs are graded neg" in capsys.readouterr().err


def test_a_semicolon_separated_csv_with_decimal_commas(tmp_path):
    """`delimiter: ';'` (a European Excel CSV): fields split at `;`, a quoted field keeps its `;`, a
    score `4,5` is 4.5; an eval task reads the same file alike."""
    from hmcl_cli.evaluation.runner import load_task
    from hmcl_cli.recipe import EvalTask

    f = tmp_path / "excel.csv"
    f.write_text('sentence1;sentence2;score\n"a; b";c;4,5\nd;e;1,25\nf;g;3\n', encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "sts", "split": "train", "delimiter": ";"}]), progress=False)
    rows = {r["query"]: r for r in _written(tmp_path)}
    assert rows["a; b"]["pos"] == ["c"] and rows["a; b"]["pos_scores"] == [4.5]
    assert rows["d"]["neg_scores"] == [1.25] and rows["f"]["weak_scores"] == [3.0]
    task = load_task(EvalTask(name="x", type="sts", path=str(f), delimiter=";"), lambda p: Path(p))
    assert sorted(task.pairs[2]) == [1.25, 3.0, 4.5] and "a; b" in task.pairs[0]


def test_triplets_take_no_one_or_several_negatives(tmp_path):
    """Triplets as sentence-transformers' data sets come: (anchor, positive) pairs alone,
    negative_1..negative_n columns (some rows with fewer), a JSON list of negatives, keys that
    differ between JSON lines, and a file without a header whose rows have any number of fields
    after the positive. No negative is dropped and none is made up."""
    def run(name, text):
        f = tmp_path / name
        f.write_text(text, encoding="utf-8")
        prepare(_recipe(tmp_path, [{"path": str(f), "format": "triplets", "split": "train"}]), progress=False)
        return {r["query"]: (r["pos"], r["neg"]) for r in _written(tmp_path)}

    assert run("pairs.csv", "anchor,positive\nq1,p1\nq2,p2\n") == {"q1": (["p1"], []), "q2": (["p2"], [])}
    assert run("many.csv", "query,positive,negative_1,negative_2,negative_3\nq1,p1,n1,n2,n3\nq2,p2,n4,,\n") == {
        "q1": (["p1"], ["n1", "n2", "n3"]), "q2": (["p2"], ["n4"])}
    lines = [{"anchor": "q0", "positive": "p0"}, {"anchor": "q1", "positive": "p1", "negative": ["n1", "n2"]},
             {"anchor": "q2", "positive": "p2", "neg": "n3", "negative_2": None, "negative_3": "n4"}]
    assert run("t.jsonl", "".join(json.dumps(x) + "\n" for x in lines)) == {
        "q0": (["p0"], []), "q1": (["p1"], ["n1", "n2"]), "q2": (["p2"], ["n3", "n4"])}
    assert run("bare.csv", "q1,p1,n1,n2\nq2,p2\nq3,p3,n5\n") == {
        "q1": (["p1"], ["n1", "n2"]), "q2": (["p2"], []), "q3": (["p3"], ["n5"])}


def test_common_column_names_are_recognised(tmp_path):
    """Quora's duplicate questions (question1, question2, is_duplicate) and text_a/text_b,
    sentence_1/sentence_2 headers need no `columns` mapping; an id column beside them is ignored."""
    f = tmp_path / "quora.csv"
    f.write_text("id,qid1,qid2,question1,question2,is_duplicate\n1,1,2,a?,b?,1\n2,3,4,c?,d?,0\n", encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "pairs", "split": "train"}]), progress=False)
    assert {r["query"]: (r["pos"], r["neg"]) for r in _written(tmp_path)} == {"a?": (["b?"], []), "c?": ([], ["d?"])}
    g = tmp_path / "ab.tsv"
    g.write_text("sentence_1\tsentence_2\tsimilarity_score\nx\ty\t4.5\nu\tv\t1\n", encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(g), "format": "sts", "split": "train"}]), progress=False)
    assert {r["query"]: (r["pos"], r["neg"]) for r in _written(tmp_path)} == {"x": (["y"], []), "u": ([], ["v"])}


def test_json_lines_need_not_share_their_optional_keys(tmp_path):
    """A score or prompt key missing from the first JSON line is still read on the lines that have
    it (the keys were bound from the first line, and later lines' score and prompt dropped)."""
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n"
                 + json.dumps({"sentence1": "c", "sentence2": "d", "label": 0, "score": 0.3, "prompt": "P: "}) + "\n",
                 encoding="utf-8")
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "pairs", "split": "train"}]), progress=False)
    rows = {r["query"]: r for r in _written(tmp_path)}
    assert rows["c"]["neg_scores"] == [0.3] and rows["c"]["prompt"] == "P: " and "prompt" not in rows["a"]


def test_mine_train_and_resume_stop_on_data_changed_since_prepare(tmp_path, tiny_bert, capsys):
    """The prepared data records what it was made from; `hmcl mine`, `hmcl train` and `hmcl run
    --resume` stop when the recipe names other data now (a setting or a source file changed),
    instead of using the old data without a word. A training-only setting (a source's weight)
    and an untouched file pass; data prepared before the record existed is not checked."""
    import os

    import pytest

    from conftest import write_recipe
    from hmcl_cli.errors import DataError
    from hmcl_cli.stages import check_prepared, run_all, run_mine, run_train

    path = write_recipe(tmp_path, tiny_bert)
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    stats = tmp_path / "run" / "data" / "stats.json"
    check_prepared(recipe)  # as prepared
    check_prepared(load_recipe(path, overrides=["data.sources.0.weight=2"]))  # sampling only
    os.utime(tmp_path / "train.jsonl")  # touched, same content: hashed, unchanged
    check_prepared(recipe)
    moved = tmp_path / "elsewhere"  # the same files at another path (a checkout on another machine)
    moved.mkdir()
    for name in ("train.jsonl", "dev.jsonl"):
        (moved / name).write_bytes((tmp_path / name).read_bytes())
    check_prepared(load_recipe(path, overrides=["data.sources.0.path=elsewhere/train.jsonl",
                                                "data.sources.1.path=elsewhere/dev.jsonl"]))
    for overrides, said in ((["data.dev_fraction=0.3"], "data.dev_fraction: 0.1 then, 0.3 now"),
                            (["seed=8"], "seed: 7 then, 8 now"),
                            (["data.sources.1.path=train.jsonl"], "data.sources.1: " + str(tmp_path / "train.jsonl"))):
        changed = load_recipe(path, overrides=overrides)
        for stage in (run_mine, run_train):
            with pytest.raises(DataError, match="was prepared from other data than the recipe names now") as e:
                stage(changed)
            assert said in str(e.value) and "hmcl prepare RECIPE" in e.value.hint
    from hmcl_cli.stages import run_eval

    capsys.readouterr()
    run_eval(load_recipe(path, overrides=["seed=8"]), in_run_dir=False)  # eval of the dev split: a warning
    assert "eval reads the prepared splits" in capsys.readouterr().err
    train = tmp_path / "train.jsonl"
    lines = train.read_text().splitlines(True)
    train.write_text("".join(lines[1:] + lines[:1]))  # same size, other order: other content
    with pytest.raises(DataError, match=r"data.sources.0: .*train.jsonl: its content changed \(same size\)") as e:
        run_all(recipe, resume=True)
    assert "without --resume" in e.value.hint
    record = json.loads(stats.read_text())
    del record["made_from"]
    stats.write_text(json.dumps(record))
    check_prepared(recipe)  # no record: not checked


def test_question_answer_pairs_read_as_triplets_and_as_pairs_get_a_hint(tmp_path):
    """A file of matching (question, answer) pairs with no label is the most common training file
    there is: read as triplets, the second text is the positive; read as labelled pairs, the error
    says how to read it."""
    f = tmp_path / "qa.csv"
    f.write_text("question,answer\nhow long is a refund?,five days\nwhere do you ship?,to 40 countries\n")
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "triplets", "split": "train"}]), progress=False)
    rows = _written(tmp_path)
    assert {(r["query"], tuple(r["pos"])) for r in rows} == {("how long is a refund?", ("five days",)),
                                                             ("where do you ship?", ("to 40 countries",))}
    with pytest.raises(DataError, match="missing a label column") as e:
        prepare(_recipe(tmp_path, [{"path": str(f), "format": "pairs", "split": "train"}]), progress=False)
    assert "`format: triplets`" in e.value.hint


def test_a_small_drawn_dev_split_is_announced(tmp_path, capsys):
    f = tmp_path / "qa.csv"
    f.write_text("question,answer\n" + "".join(f"question {i}?,answer {i}\n" for i in range(60)))
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "triplets"}], dev_fraction=0.1), progress=False)
    dev = len(_written(tmp_path, "dev"))
    err = " ".join(capsys.readouterr().err.split())
    assert dev < 20 and f"dev: {dev} examples of 60 queries" in err and "raise data.dev_fraction" in err
    prepare(_recipe(tmp_path, [{"path": str(f), "format": "triplets"}], dev_fraction=0.5), progress=False)
    assert len(_written(tmp_path, "dev")) >= 20 and "dev:" not in capsys.readouterr().err


def test_a_source_that_is_a_file_prepare_writes_is_refused(tmp_path):
    """`output_dir: .` beside a `data/train.jsonl` source: prepare overwrote the user's file with
    its graded output (a triplets file lost for good)."""
    (tmp_path / "data").mkdir()
    src = tmp_path / "data" / "train.jsonl"
    src.write_text(json.dumps({"anchor": "q", "positive": "p", "negative": "n"}) + "\n")
    before = src.read_text()
    recipe = load_recipe(data={"name": "x", "output_dir": str(tmp_path), "model": {"name_or_path": "unused"},
                               "data": {"sources": [{"path": str(src), "format": "triplets"}]}})
    with pytest.raises(DataError, match=r"data.sources.0.path .*train.jsonl is .*, a file prepare writes") as e:
        prepare(recipe, progress=False)
    assert "output_dir" in e.value.hint and src.read_text() == before


def test_a_folder_saved_by_datasets_is_a_source_with_its_splits_and_class_names(tmp_path):
    """A folder from `datasets`' save_to_disk (what a `datasets` pipeline leaves) was "a folder;
    format sts reads a file". It is read now: one dataset as it is, a dataset dict's split named by
    `hub_split` (two sources: train and dev), and a ClassLabel column by its names, so that the nli
    format's default labels apply whatever the order of the classes (a label map written with the
    numbers works too). So does a parquet file `datasets` wrote."""
    import datasets

    from hmcl_cli.errors import DataError

    rows = {"sentence1": ["a cat sits", "a man sings", "it rains", "kids play"],
            "sentence2": ["a cat is sitting", "a person sings", "stocks fell", "children play"],
            "score": [4.8, 3.0, 0.4, 4.5]}
    single = datasets.Dataset.from_dict(rows)
    single.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": single, "validation": single.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    prepare(_recipe(tmp_path, [{"path": str(tmp_path / "one"), "format": "sts", "split": "train"}]), progress=False)
    got = {r["query"]: r for r in _written(tmp_path)}
    assert got["a cat sits"]["pos"] == ["a cat is sitting"] and got["it rains"]["neg"] == ["stocks fell"]
    assert got["a man sings"]["weak_scores"] == [3.0]
    both = [{"path": str(tmp_path / "dd"), "format": "sts", "hub_split": s, "split": to}
            for s, to in (("train", "train"), ("validation", "dev"))]
    prepare(_recipe(tmp_path, both), progress=False)
    assert len(_written(tmp_path)) == 4 and [r["query"] for r in _written(tmp_path, "dev")] == ["a cat sits", "a man sings"]
    with pytest.raises(DataError, match=r"holds several splits \(its splits: train, validation\)") as err:
        prepare(_recipe(tmp_path, [{"path": str(tmp_path / "dd"), "format": "sts"}]), progress=False)
    assert "hub_split" in err.value.hint
    with pytest.raises(DataError, match="has no split 'test'"):
        prepare(_recipe(tmp_path, [{**both[0], "hub_split": "test"}]), progress=False)
    names = ["contradiction", "neutral", "entailment"]  # (the numbers alone would grade 0 as entailment)
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"premise": ["a dog runs", "a dog runs", "a dog runs"],
                                "hypothesis": ["an animal moves", "the dog is brown", "the dog sleeps"],
                                "label": [2, 1, 0]}, features=features).save_to_disk(str(tmp_path / "nli"))
    nli = {"path": str(tmp_path / "nli"), "format": "nli", "columns": {"query": "premise", "candidate": "hypothesis"},
           "split": "train"}
    prepare(_recipe(tmp_path, [nli]), progress=False)
    (row,) = _written(tmp_path)
    assert (row["pos"], row["weak"], row["neg"]) == (["an animal moves"], ["the dog is brown"], ["the dog sleeps"])
    prepare(_recipe(tmp_path, [{**nli, "label_map": {2: "pos", 1: "neg", 0: "neg"}}]), progress=False)
    (row,) = _written(tmp_path)
    assert row["pos"] == ["an animal moves"] and sorted(row["neg"]) == ["the dog is brown", "the dog sleeps"]
    # the same exported to parquet by `datasets`, which records the class names in the file
    datasets.load_from_disk(str(tmp_path / "nli")).to_parquet(str(tmp_path / "nli.parquet"))
    prepare(_recipe(tmp_path, [{**nli, "path": str(tmp_path / "nli.parquet")}]), progress=False)
    (row,) = _written(tmp_path)
    assert (row["pos"], row["weak"], row["neg"]) == (["an animal moves"], ["the dog is brown"], ["the dog sleeps"])


def test_an_sts_table_whose_score_column_is_named_label_reads_it(tmp_path):
    """GLUE's STS-B (sentence1, sentence2, label: its 0-5 score) stopped at "missing a score
    column"; an sts table without a score column reads its `label` column as the score."""
    (tmp_path / "glue.csv").write_text("sentence1,sentence2,label,idx\na cat sits,a cat is sitting,4.8,0\n"
                                       "it rains,stocks fell,0.4,1\na man sings,a person sings,3.0,2\n")
    prepare(_recipe(tmp_path, [{"path": str(tmp_path / "glue.csv"), "format": "sts", "split": "train"}]), progress=False)
    got = {r["query"]: r for r in _written(tmp_path)}
    assert got["a cat sits"]["pos_scores"] == [4.8] and got["it rains"]["neg_scores"] == [0.4]
    assert got["a man sings"]["weak_scores"] == [3.0]


def test_a_boolean_label_reads_as_1_and_0(tmp_path):
    """A parquet (or JSON) label column of booleans (is_duplicate: true/false), or its CSV (True,
    False), was "unknown label 'True' (known: 1, 0)" under the pairs format's default map."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question1": ["how do I reset my password", "how do I reset my password"],
                             "question2": ["I forgot my password, what now", "where is my parcel"],
                             "is_duplicate": [True, False]}), tmp_path / "qqp.parquet")
    prepare(_recipe(tmp_path, [{"path": str(tmp_path / "qqp.parquet"), "format": "pairs", "split": "train"}]),
            progress=False)
    (row,) = _written(tmp_path)
    assert row["pos"] == ["I forgot my password, what now"] and row["neg"] == ["where is my parcel"]
    # the same column in a CSV (pandas writes True/False): read alike; other words are still unknown
    (tmp_path / "qqp.csv").write_text("question1,question2,is_duplicate\nhow do I reset my password,I forgot my "
                                      "password,True\nhow do I reset my password,where is my parcel,false\n")
    prepare(_recipe(tmp_path, [{"path": str(tmp_path / "qqp.csv"), "format": "pairs", "split": "train"}]),
            progress=False)
    (row,) = _written(tmp_path)
    assert row["pos"] == ["I forgot my password"] and row["neg"] == ["where is my parcel"]
    (tmp_path / "qqp.csv").write_text("question1,question2,is_duplicate\nq,a,yes\n")
    with pytest.raises(DataError, match="unknown label 'yes'"):
        prepare(_recipe(tmp_path, [{"path": str(tmp_path / "qqp.csv"), "format": "pairs", "split": "train"}]),
                progress=False)


def test_nli_pairs_without_a_gold_label_are_left_out_and_counted(tmp_path, capsys):
    """SNLI's and MultiNLI's `-` (the Hub copies' -1: the annotators did not agree) stopped prepare
    with "unknown label '-'": such pairs carry no label, so they are left out whatever
    data.on_error says, counted in stats.json and the log. A label map that names `-` reads it;
    under another format `-` is still an unknown label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "snli.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "gold_label": y}) + "\n" for a, b, y in [
        ("a man plays", "a person plays", "entailment"), ("a man plays", "nobody plays", "contradiction"),
        ("a dog runs", "an animal runs", "-"), ("a dog runs", "a cat sleeps", "neutral")]))
    pq.write_table(pa.table({"premise": ["a girl sings", "a girl sings"], "hypothesis": ["she is silent", "a child sings"],
                             "label": [-1, 0]}), tmp_path / "hub.parquet")
    stats = prepare(_recipe(tmp_path, [{"path": str(tmp_path / "snli.jsonl"), "format": "nli", "split": "train"},
                                       {"path": str(tmp_path / "hub.parquet"), "format": "nli", "split": "train"}]),
                    progress=False)
    assert stats["sources"]["snli.jsonl"]["rejected_by_reason"] == {"no gold label": 1}
    assert stats["sources"]["hub.parquet"]["rejected_by_reason"] == {"no gold label": 1}
    assert stats["sources"]["snli.jsonl"]["first_rejections"] == [
        f"{tmp_path / 'snli.jsonl'}:3: no gold label ('-': the annotators did not agree)"]
    rows = {r["query"]: r for r in _written(tmp_path)}
    assert rows["a dog runs"]["weak"] == ["a cat sleeps"] and "an animal runs" not in json.dumps(rows)
    assert rows["a girl sings"]["pos"] == ["a child sings"] and "she is silent" not in json.dumps(rows)
    assert "prepare snli.jsonl: 1 pair(s) without a gold label" in " ".join(capsys.readouterr().out.split())
    mapped = {"entailment": "pos", "neutral": "weak", "contradiction": "neg", "-": "weak"}
    prepare(_recipe(tmp_path, [{"path": str(tmp_path / "snli.jsonl"), "format": "nli", "split": "train",
                                "label_map": mapped}]), progress=False)
    assert {r["query"]: r for r in _written(tmp_path)}["a dog runs"]["weak"] == ["an animal runs", "a cat sleeps"]
    (tmp_path / "pairs.csv").write_text("question,answer,label\na,b,-\n")
    with pytest.raises(DataError, match="unknown label '-'"):
        prepare(_recipe(tmp_path, [{"path": str(tmp_path / "pairs.csv"), "format": "pairs", "split": "train"}]),
                progress=False)


def test_a_source_path_may_be_a_pattern_of_shards(tmp_path):
    """A data set downloaded as shards (train-00000-of-00003.csv, ...) needed one source per file. A
    pattern reads the files it matches, by name, each with its own header; `max_rows` counts over
    them all; a pattern matching nothing is an error; a shard added later is a change of the data
    (training stops, as for an edited file). A file named `pairs[1].csv` is still that file."""
    from hmcl_cli.stages import check_prepared

    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [(f"query {i}", f"text {i}", 4.5 if i % 2 else 0.5) for i in range(6)]
    for k in range(3):
        (shards / f"train-{k:05d}-of-00003.csv").write_text(
            "sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows[2 * k:2 * k + 2]))
    (shards / "test-00000-of-00001.csv").write_text("sentence1,sentence2,score\nnot,this,1.0\n")
    source = {"path": str(shards / "train-*.csv"), "format": "sts", "split": "train"}
    recipe = _recipe(tmp_path, [source])
    stats = prepare(recipe, progress=False)
    assert sorted(r["query"] for r in _written(tmp_path)) == [a for a, _, _ in rows]
    assert stats["sources"]["train-*.csv"]["rows"] == 6
    prepare(_recipe(tmp_path, [{**source, "max_rows": 3}]), progress=False)
    assert sorted(r["query"] for r in _written(tmp_path)) == ["query 0", "query 1", "query 2"]
    with pytest.raises(DataError, match=r"train-\*.tsv matches no file"):
        prepare(_recipe(tmp_path, [{**source, "path": str(shards / "train-*.tsv")}]), progress=False)
    prepare(recipe, progress=False)
    check_prepared(recipe)  # nothing changed
    (shards / "train-00003-of-00004.csv").write_text("sentence1,sentence2,score\nquery 9,text 9,4.0\n")
    with pytest.raises(DataError, match="prepared from other data"):
        check_prepared(recipe)
    # a file whose name holds a pattern character is that file, not a pattern
    (tmp_path / "pairs[1].csv").write_text("sentence1,sentence2,score\nbracketed,file,4.5\n")
    prepare(_recipe(tmp_path, [{**source, "path": str(tmp_path / "pairs[1].csv")}]), progress=False)
    assert [r["query"] for r in _written(tmp_path)] == ["bracketed"]


def test_token_lengths_are_measured_over_all_sources_not_the_first_rows():
    """Prepared data run source by source: a long source after a short one must show in the
    lengths and the truncation warning even where only a sample of the texts is measured."""
    from conftest import build_tokenizer

    from hmcl_cli.data.prepare import token_length_stats, truncation_warning

    tok = build_tokenizer("bert")
    # 400 queries; candidates: 600 short ones, then 100 long ones among 200
    texts = {"query": ["refund"] * 400,
             "candidate": ["refund card", "ship"] * 300 + [" ".join(["refund"] * 80), "ship"] * 100}
    st = token_length_stats(tok, texts, {"query": 16, "candidate": 16}, limit=200)
    cand = st["candidate"]
    assert (cand["texts"], cand["all_texts"]) == (200, 800)
    # 100 of the 800 candidates are long: about 25 of 200 drawn, never 0
    assert 10 <= cand["over_max_length"] <= 45 and cand["max"] == 82
    said = truncation_warning("candidate", cand)
    assert "of 800 candidate texts" in said and "drawn at random" in said and "longer than 16 tokens" in said
    # every text measured when there are no more than the limit: exact counts, no "about"
    exact = token_length_stats(tok, texts, {"query": 16, "candidate": 16}, limit=1000)["candidate"]
    assert (exact["texts"], exact["over_max_length"]) == (800, 100)
    assert truncation_warning("candidate", exact).startswith("100 of 800 candidate texts are longer than 16")


def test_texts_whose_tokens_the_vocabulary_lacks_are_warned_about(tmp_path, capsys):
    """A model whose vocabulary lacks the data's script sees its unknown token where the text was
    (all-MiniLM-L6-v2 on STS-B's Chinese translation: 56% of the tokens): prepare says so."""
    from conftest import build_tokenizer

    from hmcl_cli.data.prepare import token_length_stats, unknown_tokens_warning

    tok = build_tokenizer("bert")  # a word-level vocabulary of the quickstart's sample
    known = token_length_stats(tok, {"query": ["size exchange"] * 50, "candidate": ["free exchanges"] * 50})
    assert known["query"]["unknown_tokens"] == 0 and unknown_tokens_warning(known, "m") is None
    mixed = token_length_stats(tok, {"query": ["size exchange"] * 50, "candidate": ["飞机 起飞 size"] * 50})
    assert mixed["candidate"]["unknown_tokens"] == 0.4  # [CLS] 飞机 起飞 size [SEP]: 2 of 5
    rare = token_length_stats(tok, {"query": ["size exchange"] * 40 + ["飞机 起飞"] + ["free"] * 40})["query"]
    assert rare["unknown_example"] == "飞机 起飞"  # the text with most of them
    said = unknown_tokens_warning(mixed, "my-model")
    assert said.startswith("40% of the candidate texts' tokens are my-model's unknown token [UNK]") and "飞机" in said
    data = tmp_path / "zh.jsonl"
    known_words = ["size", "exchange", "free", "refund", "card", "days", "order", "return"]
    data.write_text("".join(json.dumps({"query": f"{a} {b}", "pos": [f"飞机 起飞 {a}"]}) + "\n"
                            for a in known_words for b in known_words), encoding="utf-8")
    stats = prepare(_recipe(tmp_path, [{"path": str(data), "split": "train"}]), tokenizer=tok, progress=False)
    assert stats["token_lengths"]["candidate"]["unknown_tokens"] == 0.4 and stats["token_lengths"]["query"][
        "unknown_tokens"] == 0
    err = capsys.readouterr().err
    assert "40% of the candidate texts' tokens are unused's unknown token [UNK]" in err and "of the query" not in err


def test_dev_max_queries_caps_the_drawn_dev_split_and_the_others_train(tmp_path, capsys):
    """10% of a million queries is a 100,000-query dev split, encoded at every dev evaluation.
    `data.dev_max_queries` keeps the first of the drawn ones by the seeded hash that drew them (a
    smaller cap keeps a subset of a larger one's); the others train, whole, with their sources'
    counts. A `split: dev` source's queries are never moved."""
    from hmcl_cli.data.prepare import seeded_draw

    (tmp_path / "a.jsonl").write_text("".join(
        json.dumps({"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}", f"third {i}"]}) + "\n"
        for i in range(300)))
    (tmp_path / "given-dev.jsonl").write_text("".join(
        json.dumps({"query": f"held out {i}", "pos": [f"kept {i}"]}) + "\n" for i in range(4)))
    sources = [{"path": str(tmp_path / "a.jsonl"), "format": "graded"},
               {"path": str(tmp_path / "given-dev.jsonl"), "format": "graded", "split": "dev"}]
    prepare(_recipe(tmp_path, sources, dev_fraction=0.5), progress=False)
    uncapped = {r["query"] for r in _written(tmp_path, "dev")}
    drawn = uncapped - {f"held out {i}" for i in range(4)}
    assert len(drawn) > 100
    kept = {}
    for cap in (30, 60):
        stats = prepare(_recipe(tmp_path, sources, dev_fraction=0.5, dev_max_queries=cap), progress=False)
        dev, train = _written(tmp_path, "dev"), _written(tmp_path, "train")
        kept[cap] = {r["query"] for r in dev} - {f"held out {i}" for i in range(4)}
        assert len(kept[cap]) == cap and {f"held out {i}" for i in range(4)} <= {r["query"] for r in dev}
        assert kept[cap] == set(sorted(drawn, key=lambda q: seeded_draw(q, 42))[:cap])
        moved = [r for r in train if r["query"] in drawn - kept[cap]]
        assert len(moved) == len(drawn) - cap and all(len(r["neg"]) == 2 for r in moved)  # whole examples
        assert len(train) + len(kept[cap]) == 300
        assert stats["dev_capped"] == len(drawn) - cap
        assert stats["sources"]["a.jsonl"]["examples_per_split"] == {"train": 300 - cap, "dev": cap}
    assert kept[30] < kept[60]
    assert f"dev: {len(drawn) - 60} of {len(drawn)} queries drawn for dev train instead (data.dev_max_queries 60)" in \
        " ".join(capsys.readouterr().out.split())


def _rows_file(path: Path, rows: int, negatives: Optional[list[str]] = None) -> int:
    """A graded JSONL file of ``rows`` synthetic rows (8-word queries, 30-word texts; with
    ``negatives``, each row lists 10 drawn from them, as mined or corpus-drawn negatives
    repeat across rows); returns its size in bytes."""
    import random

    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(20000)}" for _ in range(n))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            neg = rng.sample(negatives, 10) if negatives else [text(30)]
            f.write(json.dumps({"query": f"q{i} " + text(7), "pos": [text(30)], "neg": neg}) + "\n")
    return path.stat().st_size


def _traced_peak(fn) -> tuple[int, object]:
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_prepare_and_training_hold_a_repeated_candidate_text_once(tmp_path):
    """Negatives drawn from a corpus repeat across rows (each row here lists 10 of 60 passages
    of ~1,500 characters). `hmcl prepare` and the training data loader keep each distinct text
    once: their memory follows the distinct texts, not the file (measured before: prepare's
    peak 1.24x the file, the loaded examples 1.02x; now 0.15x and 0.09x)."""
    import random

    from hmcl_cli.data.prepare import load_graded

    rng = random.Random(1)
    passages = [" ".join(f"p{rng.randrange(20000)}" for _ in range(250)) for _ in range(60)]
    size = _rows_file(tmp_path / "mined.jsonl", 600, passages)
    recipe = _recipe(tmp_path, [{"path": str(tmp_path / "mined.jsonl"), "format": "graded"}], dev_fraction=0.0)
    peak, _ = _traced_peak(lambda: prepare(recipe, progress=False))
    assert peak < 0.4 * size, (peak, size)
    peak, examples = _traced_peak(lambda: load_graded(tmp_path / "run" / "data" / "train.jsonl"))
    assert len(examples) == 600 and sum(len(ex.candidates) for ex in examples) == 600 * 11
    assert peak < 0.4 * size, (peak, size)
    # the same text is the same object wherever it is listed
    first = {t: t for ex in examples for t in ex.candidates}
    assert all(first[t] is t for ex in examples for t in ex.candidates)


def test_prepare_memory_is_a_small_multiple_of_its_data(tmp_path):
    """Every text distinct (20,000 triplet rows): prepare's peak was 4.36x the file (examples as
    dataclass objects with dicts, then every row again as a JSON-ready dict before writing) and is
    2.5x now (slotted examples, rows written as they are made; the bound fails with the rows
    held as dicts again)."""
    size = _rows_file(tmp_path / "triplets.jsonl", 20000)
    recipe = _recipe(tmp_path, [{"path": str(tmp_path / "triplets.jsonl"), "format": "graded"}])
    peak, stats = _traced_peak(lambda: prepare(recipe, progress=False))
    assert stats["splits"]["train"]["examples"] + stats["splits"]["dev"]["examples"] == 20000
    assert peak < 3.2 * size, (peak / size)


def _held_out_shares(tmp_path) -> tuple[set, set, set]:
    """The train and dev splits' unordered pairs, and the texts both splits hold."""
    def pairs(rows):
        return {frozenset((r["query"], t)) for r in rows for level in ("pos", "weak", "neg") for t in r[level]}

    def texts(rows):
        return {r["query"] for r in rows} | {t for r in rows for level in ("pos", "weak", "neg") for t in r[level]}

    train, dev = _written(tmp_path, "train"), _written(tmp_path, "dev")
    return pairs(train), pairs(dev), texts(train) & texts(dev)


def test_a_drawn_symmetric_source_keeps_both_directions_of_each_pair_and_its_group_in_one_split(tmp_path, capsys):
    """`symmetric: true` yields a -> b and b -> a from one row. Drawn by their queries, the two
    halves landed in different splits about as often as not (STS-B German train: 1,019 of 1,136 dev
    pairs were train pairs the other way round), so dev scored what training saw. Texts linked by
    pairs (a-b, b-c, ...) form a group drawn whole: no pair and no text is in two splits, and the
    dev share stays near data.dev_fraction."""
    rows = []
    for g in range(200):  # 200 chains of 3 texts in 2 rows, the second row listed later in the file
        rows.append(f"first {g},second {g},{g % 6}")
    for g in range(200):
        rows.append(f"third {g},second {g},{(g + 3) % 6}")
    path = tmp_path / "sts.csv"
    path.write_text("\n".join(rows) + "\n")
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}], dev_fraction=0.3),
                    progress=False)
    train, dev, shared_texts = _held_out_shares(tmp_path)
    assert not train & dev and not shared_texts
    assert 40 <= len(dev) // 2 <= 80  # ~60 of 200 groups of 2 pairs
    assert stats["leakage"]["dev_test_pairs_in_train"] == 0 and stats["leakage"]["dev_test_queries_in_train"] == 0
    assert "600 texts of symmetric pairs in 200 groups (largest 3 texts)" in " ".join(capsys.readouterr().out.split())
    assert stats["pair_groups"] == {"texts": 600, "groups": 200, "largest": 3}
    dev_queries = {r["query"] for r in _written(tmp_path, "dev")}
    for g in range(200):  # each chain whole, in one split
        assert len({f"first {g}", f"second {g}", f"third {g}"} & dev_queries) in (0, 3)
    # a source that is not symmetric is drawn by query as before; a source with a split is not drawn
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts"}], dev_fraction=0.3), progress=False)
    assert "texts of symmetric pairs" not in capsys.readouterr().out and "pair_groups" not in stats
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True, "split": "train"}]),
                    progress=False)
    assert "texts of symmetric pairs" not in capsys.readouterr().out and stats["splits"]["dev"]["examples"] == 0
    assert "pair_groups" not in stats


def test_the_dev_cap_moves_a_pair_group_whole(tmp_path, capsys):
    """`data.dev_max_queries` moves the last drawn dev queries by their draw to train; a pair
    group's queries share one draw and move together (or stay together), so the cap does not put
    a pair's two directions in two splits. A group can make it keep fewer than the cap, never more."""
    rows = [f"left {g},right {g},4" for g in range(150)] + [f"middle {g},right {g},1" for g in range(150)]
    path = tmp_path / "sts.csv"
    path.write_text("\n".join(rows) + "\n")
    for cap in (10, 25, 40):
        stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}],
                                dev_fraction=0.5, dev_max_queries=cap), progress=False)
        train, dev, shared_texts = _held_out_shares(tmp_path)
        assert not train & dev and not shared_texts
        kept = len(_written(tmp_path, "dev"))
        assert cap - 2 <= kept <= cap and kept % 3 == 0  # whole groups of 3 queries
        assert stats["dev_capped"] > 0
    # a group one of whose queries a `split: dev` source also holds stays in dev whole
    prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}], dev_fraction=0.5),
            progress=False)
    drawn = {r["query"] for r in _written(tmp_path, "dev")}
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}],
                            dev_fraction=0.5, dev_max_queries=10), progress=False)
    capped = {r["query"] for r in _written(tmp_path, "dev")}
    moved = next(g for g in range(150) if f"left {g}" in drawn - capped)
    (tmp_path / "given.jsonl").write_text(json.dumps({"query": f"middle {moved}", "pos": ["a dev answer"]}) + "\n")
    prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True},
                               {"path": str(tmp_path / "given.jsonl"), "format": "graded", "split": "dev"}],
                    dev_fraction=0.5, dev_max_queries=10), progress=False)
    dev_queries = {r["query"] for r in _written(tmp_path, "dev")}
    assert {f"left {moved}", f"middle {moved}", f"right {moved}"} <= dev_queries
    train, dev, _ = _held_out_shares(tmp_path)
    assert not train & dev


def test_one_large_pair_group_is_warned_about(tmp_path, capsys):
    """A chain that links most texts lands in one split whole: the split sizes then cannot follow
    data.dev_fraction, and prepare says so (and what gives a dev split of a chosen size)."""
    rows = [f"text {i},text {i + 1},3" for i in range(60)] + [f"alone {i},partner {i},3" for i in range(20)]
    path = tmp_path / "sts.csv"
    path.write_text("\n".join(rows) + "\n")
    prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}], dev_fraction=0.2),
            progress=False)
    said = capsys.readouterr()
    out = " ".join((said.out + said.err).split())
    assert "61 of the 101 texts of symmetric pairs (60%) are linked by their pairs into one group" in out
    chain = {f"text {i}" for i in range(61)}
    for split in ("train", "dev"):
        queries = {r["query"] for r in _written(tmp_path, split)}
        assert chain <= queries or not chain & queries


def test_a_pair_listed_both_ways_and_drawn_into_two_splits_is_said_to_be_the_draws_doing(tmp_path, capsys):
    """A pair file that lists each pair in both orders, split by data.dev_fraction without
    `symmetric`, draws each direction by its own query: the warning about dev pairs that train
    holds said to leave them out of "dev sources of your own", where there were none. It now says
    the draw put them there and what keeps them together; a given dev source keeps the old advice."""
    rows = []
    for i in range(200):
        rows += [f"text {i} a,text {i} b,{i % 6}", f"text {i} b,text {i} a,{i % 6}"]
    path = tmp_path / "both.csv"
    path.write_text("\n".join(rows) + "\n")
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts"}], dev_fraction=0.3), progress=False)
    leak = stats["leakage"]
    assert leak["dev_test_pairs_in_train"] > 20 and leak["drawn_dev_test_pairs_in_train"] == leak["dev_test_pairs_in_train"]
    said = " ".join(capsys.readouterr().err.split())
    assert f"{leak['dev_test_pairs_in_train']} dev/test (query, candidate) pairs are also train pairs" in said
    assert "All of them are in examples that data.dev_fraction drew" in said and "`symmetric: true`" in said
    assert "dev/test sources of your own" not in said
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "symmetric": True}], dev_fraction=0.3),
                    progress=False)
    assert stats["leakage"]["dev_test_pairs_in_train"] == 0
    capsys.readouterr()
    # pairs a `split: dev` source shares with train: the user's split, the old advice
    (tmp_path / "dev.csv").write_text("text 1 a,text 1 b,3\ntext 2 b,text 2 a,4\n")
    stats = prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "split": "train"},
                                       {"path": str(tmp_path / "dev.csv"), "format": "sts", "split": "dev"}]),
                    progress=False)
    assert stats["leakage"]["dev_test_pairs_in_train"] == 2 and stats["leakage"]["drawn_dev_test_pairs_in_train"] == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "dev/test sources of your own" in said and "data.dev_fraction drew" not in said
