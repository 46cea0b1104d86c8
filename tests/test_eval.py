"""`hmcl eval` through mteb: numbers checked against independent numpy/scipy computations."""

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, needs_minilm, needs_shared

from hmcl_cli.errors import GateFailedError
from hmcl_cli.evaluation.runner import check_gates, enforce_gates, evaluate
from hmcl_cli.modeling.encoder import EmbeddingModel
from hmcl_cli.recipe import EvalTask

DOCS = {"d1": "refunds reach your card in five days", "d2": "request a refund from the order page",
        "d3": "we ship to canada and europe", "d4": "reset your password from the login page",
        "d5": "sellers are paid every monday", "d6": "express delivery takes two days",
        "d7": "how long does a refund take to reach my card"}  # unjudged, still retrievable
QUERIES = {"q1": "how long does a refund take", "q2": "how long does delivery take", "q3": "i forgot my password"}
QRELS = [("q1", "d1", 3), ("q1", "d2", 1), ("q1", "d5", 0), ("q2", "d6", 2), ("q2", "d3", 1), ("q3", "d4", 1)]


def _beir(folder):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in DOCS.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in QUERIES.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS))


def test_beir_ndcg_uses_graded_relevance_and_matches_independent_computation(tmp_path, tiny_bert):
    _beir(tmp_path / "beir")
    model = EmbeddingModel.load(str(tiny_bert))
    task = EvalTask(name="fixture", type="retrieval", path=str(tmp_path / "beir"))
    report = evaluate({"m": model}, [task], resolve=lambda p: __import__("pathlib").Path(p))
    got = report["results"]["fixture"]["m"]["ndcg@10"]
    # independent: every corpus document is retrievable; linear gains = the qrels grade
    judged = sorted(DOCS)
    e_docs = model.encode([DOCS[d] for d in judged]).numpy()
    scores = []
    for q in QUERIES:
        grades = {d: g for qq, d, g in QRELS if qq == q}
        sims = e_docs @ model.encode([QUERIES[q]], side="query").numpy()[0]
        ranking = [judged[i] for i in np.argsort(-sims)][:10]
        dcg = sum(grades.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranking))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(grades.values(), reverse=True)[:10]))
        scores.append(dcg / ideal)
    assert got == pytest.approx(float(np.mean(scores)), abs=1e-4)  # mteb reports 5 decimals
    assert report["results"]["fixture"]["m"]["mteb"]["ndcg_at_10"] == got


def test_beir_folder_in_another_encoding_scores_as_its_utf8_copy(tmp_path, tiny_bert):
    """The task's `encoding` reaches the corpus too (before, corpus.jsonl was read as UTF-8)."""
    _beir(tmp_path / "utf8")
    for f in ("corpus.jsonl", "queries.jsonl"):  # an accented document, then the whole folder in cp1252
        text = (tmp_path / "utf8" / f).read_text().replace("canada", "Montréal")
        (tmp_path / "utf8" / f).write_text(text, encoding="utf-8")
    import shutil

    shutil.copytree(tmp_path / "utf8", tmp_path / "cp1252")
    for f in ("corpus.jsonl", "queries.jsonl"):
        path = tmp_path / "cp1252" / f
        path.write_bytes(path.read_text(encoding="utf-8").replace("\\u00e9", "é").encode("cp1252"))
    assert b"\xe9" in (tmp_path / "cp1252" / "corpus.jsonl").read_bytes()
    model = EmbeddingModel.load(str(tiny_bert))
    tasks = [EvalTask(name="utf8", type="retrieval", path=str(tmp_path / "utf8")),
             EvalTask(name="cp1252", type="retrieval", path=str(tmp_path / "cp1252"), encoding="cp1252")]
    report = evaluate({"m": model}, tasks, resolve=lambda p: Path(p))
    assert report["results"]["cp1252"]["m"]["ndcg@10"] == report["results"]["utf8"]["m"]["ndcg@10"]


def _ndcg10(q_emb: dict, d_emb: dict, score) -> float:
    """nDCG@10 over the BEIR fixture with linear gains, every document retrievable, by ``score``."""
    docs = sorted(DOCS)
    out = []
    for q in QUERIES:
        grades = {d: g for qq, d, g in QRELS if qq == q}
        ranking = sorted(docs, key=lambda d: -score(q_emb[q], d_emb[d]))[:10]
        dcg = sum(grades.get(d, 0) / math.log2(r + 2) for r, d in enumerate(ranking))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(grades.values(), reverse=True)[:10]))
        out.append(dcg / ideal)
    return float(np.mean(out))


@pytest.mark.parametrize("similarity", ["dot", "manhattan"])
def test_a_model_is_scored_with_its_own_similarity_function(tmp_path, tiny_bert, similarity):
    """A sentence-transformers model saved for dot product (no Normalize, similarity_fn_name dot, as
    msmarco-distilbert-base-tas-b) is ranked by dot product, not by cosine."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models

    folder = tmp_path / "st"
    st.SentenceTransformer(modules=[models.Transformer(str(tiny_bert)), models.Pooling(32, pooling_mode="mean")],
                           device="cpu", similarity_fn_name=similarity).save(str(folder))
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == similarity
    _beir(tmp_path / "beir")
    model = EmbeddingModel.load(str(folder))
    assert model.settings.similarity == similarity and not model.settings.normalize
    report = evaluate({"m": model}, [EvalTask(name="f", type="retrieval", path=str(tmp_path / "beir"))], resolve=Path)
    q = {k: model.encode([v], side="query").numpy()[0] for k, v in QUERIES.items()}
    d = {k: model.encode([v]).numpy()[0] for k, v in DOCS.items()}
    own = {"dot": lambda a, b: float(a @ b), "manhattan": lambda a, b: -float(np.abs(a - b).sum())}[similarity]
    cosine = _ndcg10(q, d, lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert report["results"]["f"]["m"]["ndcg@10"] == pytest.approx(_ndcg10(q, d, own), abs=1e-4)
    assert abs(_ndcg10(q, d, own) - cosine) > 1e-3  # the fixture tells the two apart


def test_two_models_side_by_side_and_gate(tmp_path, tiny_bert, tiny_qwen):
    _beir(tmp_path / "beir")
    task = EvalTask(name="fixture", type="retrieval", path=str(tmp_path / "beir"))
    report = evaluate({"a": EmbeddingModel.load(str(tiny_bert)), "b": EmbeddingModel.load(str(tiny_qwen))}, [task],
                      resolve=lambda p: __import__("pathlib").Path(p))
    a, b = (report["results"]["fixture"][m]["ndcg@10"] for m in ("a", "b"))
    assert report["models"] == ["a", "b"] and a != b
    hi, lo = ("a", "b") if a > b else ("b", "a")
    enforce_gates(check_gates(report, [f"fixture:ndcg@10>={lo}+0.0"], model=hi))  # passes
    with pytest.raises(GateFailedError, match="fixture:ndcg@10"):
        enforce_gates(check_gates(report, [f"fixture:ndcg@10>={hi}+0.001"], model=lo))


def _hmcl(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "hmcl_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}, timeout=900, cwd=cwd)


def _st_embed(texts):
    from sentence_transformers import SentenceTransformer

    from hmcl_cli.modeling.resolve import resolve_model

    st = SentenceTransformer(str(resolve_model("sentence-transformers/all-MiniLM-L6-v2")), device="cpu")
    return dict(zip(texts, st.encode(texts, batch_size=128, normalize_embeddings=True)))


@needs_minilm
@needs_shared
def test_stsb_dev_spearman_equals_scipy_offline(tmp_path):
    from scipy.stats import spearmanr

    # every third pair of the dev set (500 of 1,500: the same check in a third of the encoding time)
    rows = list(csv.reader(open(SHARED / "stsb" / "stsb-en-dev.csv", encoding="utf-8", newline="")))[::3]
    path = tmp_path / "stsb-dev-third.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    out = _hmcl("eval", "--model", "base=sentence-transformers/all-MiniLM-L6-v2", "--sts", f"stsb={path}",
                "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stdout + out.stderr
    got = json.loads((tmp_path / "r.json").read_text())["results"]["stsb"]["base"]
    emb = _st_embed(list({t for r in rows for t in r[:2]}))
    cos = [float(emb[a] @ emb[b]) for a, b, _ in rows]
    expected = spearmanr(cos, [float(r[2]) for r in rows]).statistic
    assert got["spearman"] == pytest.approx(expected, abs=1e-4)
    assert got["mteb"]["cosine_spearman"] == got["spearman"] and "cosine_pearson" in got["mteb"]
    assert 0.8 < got["spearman"] < 0.95


@needs_minilm
@needs_shared
def test_trecqa_dev_map_as_reranking_equals_numpy(tmp_path):
    from hmcl_cli.stages import model_loader
    from hmcl_cli.recipe import load_recipe

    # the dev set's first 30 questions with all their candidates (about half of it)
    with open(SHARED / "trecqa" / "trecqa-dev.csv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    questions = list(dict.fromkeys(r["qtext"] for r in rows))[:30]
    path = tmp_path / "trecqa-dev-30.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if r["qtext"] in questions)
    task = EvalTask(name="trecqa", type="reranking", format="answer_selection", path=str(path))
    recipe = load_recipe(data={"name": "e", "output_dir": ".", "model": {"name_or_path": "x"}})
    report = evaluate({"base": "sentence-transformers/all-MiniLM-L6-v2"}, [task], resolve=Path,
                      loader=model_loader(recipe))
    got = report["results"]["trecqa"]["base"]
    groups = defaultdict(dict)
    for r in csv.DictReader(open(path, encoding="utf-8", newline="")):
        groups[r["qtext"]][r["atext"]] = max(int(r["label"]), groups[r["qtext"]].get(r["atext"], 0))
    emb = _st_embed(list({t for q, c in groups.items() for t in [q, *c]}))
    aps = []
    for q, cands in groups.items():
        if not any(cands.values()):
            continue  # no correct answer: AP undefined (dropped, as classic MTEB reranking does)
        texts = list(cands)
        order = np.argsort(-np.array([emb[q] @ emb[t] for t in texts]), kind="stable")
        rel = np.array([cands[texts[i]] for i in order])
        hits = np.cumsum(rel)
        aps.append(float(np.sum(rel * hits / np.arange(1, len(rel) + 1)) / rel.sum()))
    assert got["map"] == pytest.approx(float(np.mean(aps)), abs=1e-4)
    assert "mrr@10" in got and "ndcg_at_10" in got["mteb"]


def test_two_models_in_one_cli_call_with_delta_and_gate(tmp_path, tiny_bert, tiny_qwen):
    _beir(tmp_path / "beir")
    args = ["eval", "--model", f"a={tiny_bert}", "--model", f"b={tiny_qwen}", "--retrieval", f"fx={tmp_path / 'beir'}",
            "--json", tmp_path / "r.json"]
    out = _hmcl(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "r.json").read_text())["results"]["fx"]
    a, b = res["a"]["ndcg@10"], res["b"]["ndcg@10"]
    assert a != b and res["b"]["delta_vs_a"] == pytest.approx(b - a)
    header = next(line for line in out.stdout.splitlines() if "task" in line and "metric" in line)
    assert " a " in header and " b " in header and "Δ vs a" in header
    row = next(line for line in out.stdout.splitlines() if line.strip("│ ").startswith("fx"))
    assert f"{a:.4f}" in row and f"{b:.4f}" in row and f"{b - a:+.4f}" in row
    # the gate is on the first model: the worse one cannot reach the better one (exit 6, row named)
    path = {"a": tiny_bert, "b": tiny_qwen}
    worse, better = ("a", "b") if a < b else ("b", "a")
    order = ["--model", f"{worse}={path[worse]}", "--model", f"{better}={path[better]}",
             "--retrieval", f"fx={tmp_path / 'beir'}"]
    failing = _hmcl("eval", *order, "--gate", f"fx:ndcg@10>={better}+0.0")
    assert failing.returncode == 6, failing.stdout + failing.stderr
    assert "1 of 1 quality gate(s) not met" in failing.stderr and f"fx:ndcg@10>={better}+0.0" in failing.stderr
    work = tmp_path / "cwd"
    work.mkdir()
    passing = _hmcl("eval", *order, "--gate", f"fx:ndcg@10>={better}-1", cwd=work)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert list(work.iterdir()) == []  # no --json, no recipe: nothing written where it ran
    assert f"gate pass: fx:ndcg@10>={better}-1" in passing.stdout


def test_results_to_standard_output_leave_it_to_the_json(tmp_path, tiny_bert):
    """`hmcl eval ... --json - | jq`: `-` wrote a file named "-", and /dev/stdout got the table and
    log lines before the JSON (and, as root, its link replaced by a file). Both now put the JSON
    alone on stdout, the table and log on stderr. (/proc/self/fd/1 is /dev/stdout's target: a
    regression there fails to write instead of replacing a device's link.)"""
    from conftest import STS_ROWS

    path = tmp_path / "pairs.csv"
    path.write_text("".join(f"{a},{b},{s}\n" for a, b, s in STS_ROWS))
    for target in ("-", "/proc/self/fd/1"):
        out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", f"pairs={path}", "--json", target, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert report["models"] == ["m"] and 0 <= abs(report["results"]["pairs"]["m"]["spearman"]) <= 1
        assert "spearman" in out.stderr and "eval results ->" in out.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


def test_plot_is_a_png_written_whole_or_to_standard_output(tmp_path, capsysbinary):
    """`--plot` (untested before) writes a PNG through a temporary name, or to stdout for `-`."""
    pytest.importorskip("matplotlib")
    from hmcl_cli.evaluation.runner import plot_report

    report = {"tasks": {"sts": {"type": "sts", "main": "spearman"}, "qa": {"type": "reranking", "main": "map"}},
              "models": ["base", "ft"], "results": {"sts": {"base": {"spearman": 0.81}, "ft": {"spearman": 0.84}},
                                                    "qa": {"base": {"map": 0.7}, "ft": {"error": "failed to load"}}}}
    plot_report(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]
    assert f"eval plot -> {tmp_path / 'chart.png'}" in " ".join(capsysbinary.readouterr().out.decode().split())
    plot_report(report, "-")
    assert capsysbinary.readouterr().out[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_eval_task_reads_a_folder_saved_by_datasets_at_its_split(tmp_path, tiny_bert):
    """`--sts FOLDER` of `datasets`' save_to_disk: one dataset as it is; a dataset dict at `--split`
    (default test), its splits named when the split is not there."""
    import datasets

    from conftest import STS_ROWS

    ds = datasets.Dataset.from_dict({"sentence1": [a for a, _, _ in STS_ROWS], "sentence2": [b for _, b, _ in STS_ROWS],
                                     "score": [s for *_, s in STS_ROWS]})
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "pairs.csv").write_text("".join(f"{a},{b},{s}\n" for a, b, s in STS_ROWS))
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", f"saved={tmp_path / 'dd'}", "--sts", f"csv={tmp_path / 'pairs.csv'}",
                "--split", "validation", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res["saved"]["m"]["spearman"] == pytest.approx(res["csv"]["m"]["spearman"])
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", f"saved={tmp_path / 'dd'}")
    assert out.returncode == 3 and "has no split 'test' (its splits: validation)" in out.stdout + out.stderr


def test_an_eval_task_may_be_a_pattern_of_shards(tmp_path, tiny_bert):
    """`--sts 'shards/part-*.csv'` (a test split in shards) scored as the shards' rows together, named
    after the pattern's stem; a recipe task's pattern too, and one matching nothing is named before
    anything runs."""
    from conftest import STS_ROWS, write_recipe

    (tmp_path / "shards").mkdir()
    half = len(STS_ROWS) // 2
    for k, rows in enumerate((STS_ROWS[:half], STS_ROWS[half:])):
        (tmp_path / "shards" / f"part-{k}.csv").write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    (tmp_path / "all.csv").write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in STS_ROWS))
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", "shards/part-*.csv", "--sts", "all.csv",
                "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(res) == {"part", "all"}
    assert res["part"]["m"]["spearman"] == pytest.approx(res["all"]["m"]["spearman"])
    recipe = write_recipe(tmp_path / "r", tiny_bert, eval={"tasks": [{"name": "t", "type": "sts", "path": "../shards/*.csv"}]})
    out = _hmcl("eval", recipe, "--model", f"m={tiny_bert}", "--json", tmp_path / "r2.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((tmp_path / "r2.json").read_text())["results"]["t"]["m"]["spearman"] == pytest.approx(
        res["all"]["m"]["spearman"])
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", "shards/other-*.csv", cwd=tmp_path)
    assert out.returncode == 3 and "shards/other-*.csv matches no file" in " ".join((out.stdout + out.stderr).split())


def test_offline_hub_task_is_reported_and_others_still_run(tmp_path, tiny_bert):
    """A hub task that cannot be fetched fails alone; the other tasks' results are written. (A
    missing local file is found before anything runs: test_bad_inputs' eval_missing_file.)"""
    _beir(tmp_path / "beir")
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--retrieval", f"fx={tmp_path / 'beir'}",
                "--mteb", "STSBenchmark", "--json", tmp_path / "r.json")
    assert out.returncode == 3  # data error: some evaluations failed, after the others ran
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert isinstance(res["fx"]["m"]["ndcg@10"], float)
    assert "cannot be downloaded: HF_HUB_OFFLINE is set" in res["STSBenchmark"]["m"]["error"]
    assert "1 evaluation(s) failed" in out.stderr and "the other results are in" in out.stderr


def test_cached_hub_task_without_network_reads_the_cache_at_once(tmp_path, tiny_bert):
    """A cached MTEB dataset, the Hub out of reach and no offline switch: read from the cache
    without the datasets client's retries (~25 s a model before), and the numbers are those of the
    same rows given as a local file."""
    from conftest import CLOSED_ENDPOINT, STS_ROWS, cache_mteb_sts

    cache = cache_mteb_sts(tmp_path / "datasets-cache")
    with open(tmp_path / "same.csv", "w", newline="") as f:
        csv.writer(f).writerows(STS_ROWS)
    t0 = time.perf_counter()
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--model", f"n={tiny_bert}", "--mteb", "STSBenchmark",
                "--sts", f"same={tmp_path / 'same.csv'}", "--json", tmp_path / "r.json",
                env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": CLOSED_ENDPOINT, "HF_DATASETS_CACHE": str(cache)})
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    for m in ("m", "n"):
        assert res["STSBenchmark"][m]["main_score"] == pytest.approx(res["same"][m]["spearman"], abs=1e-6)
        assert res["STSBenchmark"][m]["spearman"] == res["STSBenchmark"][m]["main_score"]  # hmcl's name too
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["STSBenchmark"]["main"] == "spearman"
    assert "│ STSBenchmark │ spearman │" in out.stdout  # the table's row
    assert "Retrying" not in out.stderr and "latest cached version" not in out.stderr
    assert out.stdout.count(f"STSBenchmark: reading the cached copy of mteb/stsbenchmark-sts ({CLOSED_ENDPOINT} "
                            "cannot be reached") == 2  # once for each model
    assert took < 40, took


def test_offline_mode_switches_both_clients_and_puts_them_back(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    from hmcl_cli.hub_access import offline_mode

    for where, name in ((constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                        (datasets.config, "HF_DATASETS_OFFLINE")):
        monkeypatch.setattr(where, name, False)
    before = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    with pytest.raises(RuntimeError):
        with offline_mode():
            assert constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
            raise RuntimeError
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE) == before
    assert before == (False, False, False)


def test_hub_task_without_network_fails_at_once_for_every_model(tmp_path, tiny_bert):
    """No offline switch and no network (the Hub's address a closed port): one quick probe, not
    the datasets client's retries with back-off for each model (~23 s a model, measured before)."""
    from conftest import CLOSED_ENDPOINT

    _beir(tmp_path / "beir")
    t0 = time.perf_counter()
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--model", f"n={tiny_bert}", "--mteb", "STSBenchmark",
                "--retrieval", f"fx={tmp_path / 'beir'}", "--json", tmp_path / "r.json",
                env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": CLOSED_ENDPOINT})
    took = time.perf_counter() - t0
    assert out.returncode == 3, out.stderr
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    for m in ("m", "n"):
        assert (f"needs the dataset 'mteb/stsbenchmark-sts', which is not in the local cache and cannot be "
                f"downloaded: {CLOSED_ENDPOINT} cannot be reached") in res["STSBenchmark"][m]["error"]
        assert isinstance(res["fx"][m]["ndcg@10"], float)
    assert "Retrying" not in out.stderr
    assert out.stdout.count("STSBenchmark / m, n: MTEB task 'STSBenchmark' needs the dataset") == 1  # one line
    assert took < 40, took  # the whole command, models loaded and the other task run: no back-off


def test_in_loop_spearman_is_per_source_then_averaged(tiny_bert):
    from scipy.stats import spearmanr

    from hmcl_cli.data.example import GradedExample, add_candidate
    from hmcl_cli.evaluation.graded import evaluate_graded

    model = EmbeddingModel.load(str(tiny_bert))
    rows = {"a": [("refund", "refunds reach your card", 4.5), ("refund", "we ship to canada", 1.0),
                  ("password", "reset your password", 4.8), ("password", "sellers are paid", 0.5)],
            "b": [("delivery", "express delivery takes two days", 40.0), ("delivery", "the order page", 10.0),
                  ("login", "the login page", 35.0), ("login", "refunds reach your card", 20.0)]}
    examples = []
    for src, pairs in rows.items():
        for q, c, score in pairs:
            ex = next((e for e in examples if e.query == q), None) or GradedExample(q, source=src)
            if ex not in examples:
                examples.append(ex)
            add_candidate(ex, c, 2 if score in (4.5, 4.8, 40.0, 35.0) else 0, score, "highest")
    got = evaluate_graded(model, examples)
    expected = {}
    for src, pairs in rows.items():
        cos = [float(model.encode([q], side="query").numpy()[0] @ model.encode([c]).numpy()[0]) for q, c, _ in pairs]
        expected[src] = spearmanr(cos, [s for _, _, s in pairs]).statistic
    assert got["spearman/a"] == pytest.approx(expected["a"], abs=1e-6)
    assert got["spearman/b"] == pytest.approx(expected["b"], abs=1e-6)
    assert got["spearman"] == pytest.approx((expected["a"] + expected["b"]) / 2, abs=1e-6)


def test_in_loop_dev_evaluation_memory_grows_with_the_split_not_its_square():
    """A dev split of 100,000 queries over 200,000 texts (10% of a million triplets, the default
    dev_fraction) asked for an 80 GB cosine matrix and stopped training as out of memory. Each
    query's best texts come from a top-k search a block at a time now, with the same metrics."""
    import tracemalloc
    from types import SimpleNamespace

    import torch

    from hmcl_cli.data.example import GradedExample, add_candidate
    from hmcl_cli.evaluation.graded import evaluate_graded
    from hmcl_cli.evaluation.metrics import ranked_retrieval_scores
    from hmcl_cli.mining import top_k_search

    n, dim = 3000, 8
    rng = np.random.default_rng(0)
    vectors = {}

    def encode(texts, side="doc", **_):
        return torch.tensor(np.stack([vectors.setdefault(t, rng.standard_normal(dim).astype(np.float32)) for t in texts]))

    model = SimpleNamespace(dim=dim, encode=encode, settings=SimpleNamespace(query_prompt=None))
    examples = []
    for i in range(n):
        ex = GradedExample(f"query {i}")
        add_candidate(ex, f"answer {i}", 2, None, "highest")
        add_candidate(ex, f"other {i}", 0, None, "highest")
        examples.append(ex)
    evaluate_graded(model, examples[:10])  # numpy and scipy set up outside the measurement
    tracemalloc.start()
    got = evaluate_graded(model, examples)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = n * 2 * n * 4  # the [3000, 6000] float32 cosines: 72 MB
    assert peak < whole / 3, (peak, whole)
    # the same numbers as the whole matrix gives
    q = np.stack([vectors[ex.query] for ex in examples])
    corpus = [t for ex in examples for t in ex.candidates]
    c = np.stack([vectors[t] for t in corpus])
    qrels = [{2 * i: 2.0} for i in range(n)]
    whole_matrix = ranked_retrieval_scores(np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :100], qrels)
    _, ranked = top_k_search(torch.from_numpy(q), torch.from_numpy(c), 100, chunk=7, block_bytes=1000 * dim * 4)
    assert ranked_retrieval_scores(ranked, qrels) == pytest.approx(whole_matrix, abs=1e-9)
    assert whole_matrix["queries"] == n and 0 < whole_matrix["recall@100"] < 1
    assert got["ndcg@10"] == pytest.approx(whole_matrix["ndcg@10"], abs=1e-9)
    assert got["recall@100"] == pytest.approx(whole_matrix["recall@100"], abs=1e-9)


def test_a_collapsed_model_earns_nothing_from_its_ties(recwarn):
    """A model that gives every text one embedding (training collapsed, a too high learning rate)
    ranks nothing. Ties were ranked in the file's order, positives first, so its dev_map and
    dev_rerank_mrr@10 were 1.0, and `metric_for_best: dev_map` would keep it as the best step; its
    Spearman printed scipy's ConstantInputWarning. Now ties rank lowest grade first: the worst
    ranking, computed here by hand, and Spearman is NaN, quietly."""
    from types import SimpleNamespace

    import torch

    from hmcl_cli.data.example import GradedExample, add_candidate
    from hmcl_cli.evaluation.graded import evaluate_graded

    def encode(texts, side="doc", **_):
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1)

    model = SimpleNamespace(dim=4, encode=encode, settings=SimpleNamespace(query_prompt=None))
    examples = []
    for i in range(30):
        ex = GradedExample(f"query {i}")
        add_candidate(ex, f"answer {i}", 2, None, "highest")  # listed first, as prepared files list them
        add_candidate(ex, f"close {i}", 1, None, "highest")
        for j in range(3):
            add_candidate(ex, f"other {i} {j}", 0, None, "highest")
        examples.append(ex)
    got = evaluate_graded(model, examples)
    # each query's positive ranked after its 4 other candidates: AP = RR = 1/5
    assert got["map"] == pytest.approx(0.2) and got["rerank_mrr@10"] == pytest.approx(0.2)
    # retrieval among the 150 texts: the 100 found tie, and the query's own two come last among them
    assert got["ndcg@10"] == 0.0 and got["mrr@10"] == 0.0
    assert math.isnan(got["spearman"])
    assert not [w for w in recwarn if "constant" in str(w.message).lower()]


W = {"q1": "how do refunds work", "q2": "reset my password", "q3": "where is my parcel",
     "a1": "refunds reach your card", "b1": "we ship to canada", "a2": "the login page", "a3": "express delivery"}
DEV_SHAPES = {
    # name: rows (query, candidate, level, score, source)
    "positives only": [("q1", "a1", 2, None, None), ("q2", "a2", 2, None, None)],
    "positive and negative": [("q1", "a1", 2, None, None), ("q1", "b1", 0, None, None), ("q2", "a2", 2, None, None)],
    "negatives only": [("q1", "a1", 0, None, None), ("q2", "a2", 0, None, None)],
    "weak and negative": [("q1", "a1", 1, None, None), ("q1", "b1", 0, None, None)],
    "two sources, one flat": [("q1", "a1", 2, 4.0, "s"), ("q1", "b1", 0, 1.0, "s"),
                              ("q2", "a2", 2, None, "t"), ("q3", "a3", 2, None, "t")],
}


@pytest.mark.parametrize("shape", list(DEV_SHAPES))
def test_undefined_dev_metrics_are_exactly_the_nan_ones(tiny_bert, shape):
    """What the trainer checks before training (metric names, which are undefined) agrees with
    what the dev evaluation then computes, for dev sets that lack one kind of candidate or another."""
    from hmcl_cli.data.example import GradedExample, add_candidate
    from hmcl_cli.evaluation.graded import evaluate_graded, metric_names, undefined_metrics

    examples: dict[str, GradedExample] = {}
    for q, c, level, score, src in DEV_SHAPES[shape]:
        add_candidate(examples.setdefault(q, GradedExample(W[q], source=src)), W[c], level, score, "highest")
    examples = list(examples.values())
    got = evaluate_graded(EmbeddingModel.load(str(tiny_bert)), examples)
    assert list(got) == metric_names(examples)
    nan = {k for k, v in got.items() if np.isnan(v)}
    assert set(undefined_metrics(examples)) == nan
    assert nan if shape != "positive and negative" else not nan


def test_cut_sizes_are_evaluated_from_the_same_encodings(tmp_path, tiny_bert, monkeypatch):
    """`--dim`/`eval.dims`: each model again with its embeddings cut to N dimensions and
    re-normalised, as `<label>@N`; the numbers equal a hand computation on cut embeddings, and no
    text is encoded twice."""
    from scipy.stats import spearmanr

    pairs = [("a cat sits on the mat", "a kitten on a rug", 4.5), ("stocks fell sharply", "rain is expected", 0.5),
             ("the dog runs", "a dog is running", 4.8), ("refunds take days", "we ship to canada", 1.0),
             ("reset your password", "the login page", 2.5), ("express delivery", "delivery takes two days", 3.5)]
    path = tmp_path / "sts.csv"
    path.write_text("".join(f"{a},{b},{s}\n" for a, b, s in pairs))
    model = EmbeddingModel.load(str(tiny_bert))
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda texts, **kw: calls.extend(texts) or encode(texts, **kw))
    task = EvalTask(name="sts", type="sts", path=str(path))
    report = evaluate({"m": model}, [task], resolve=Path, dims=[8, 4, model.dim])
    assert report["models"] == ["m", "m@8", "m@4"]  # the full size is not repeated
    assert sorted(calls) == sorted({t for a, b, _ in pairs for t in (a, b)})  # each text once
    full = {t: e for t, e in zip(calls, encode(calls, side="doc").numpy())}
    for d, label in ((None, "m"), (8, "m@8"), (4, "m@4")):
        cut = {t: e[:d] / np.linalg.norm(e[:d]) for t, e in full.items()}
        expected = spearmanr([float(cut[a] @ cut[b]) for a, b, _ in pairs], [s for *_, s in pairs]).statistic
        assert report["results"]["sts"][label]["spearman"] == pytest.approx(expected, abs=1e-5), label
    assert report["results"]["sts"]["m@4"]["spearman"] != pytest.approx(report["results"]["sts"]["m"]["spearman"])


def test_table_puts_cut_sizes_in_rows_with_deltas_at_the_same_size(capsys):
    from hmcl_cli.evaluation.runner import print_table

    res = {"base": 0.80, "base@64": 0.70, "ft": 0.85, "ft@64": 0.80}
    report = {"tasks": {"sts": {"type": "sts", "main": "spearman"}}, "models": list(res), "dims": [64],
              "cut": {"base@64": ["base", 64], "ft@64": ["ft", 64]},
              "results": {"sts": {k: {"spearman": v} for k, v in res.items()}}}
    print_table(report)
    rows = [line for line in capsys.readouterr().out.splitlines() if "sts" in line]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in rows]
    assert cells == [["sts", "spearman", "full", "0.8000", "0.8500", "+0.0500"],
                     ["sts", "spearman", "64", "0.7000", "0.8000", "+0.1000"]]


def test_table_cells_are_never_cut_short_in_a_log_or_on_a_narrow_terminal(capsys, monkeypatch):
    """In a CI log (no terminal) rich fitted the table to 80 columns and cut model names, task names
    and numbers with an ellipsis ("fine-tun…", "1406/2570/17…"), so a log could not say which column
    was which model. A log gets the table at its natural width; a narrow terminal wraps a cell."""
    import io

    from rich.console import Console

    from hmcl_cli import console as console_module
    from hmcl_cli.evaluation.runner import print_table

    models = ["base", "fine-tuned-on-the-support-data", "the-teams-previous-release-model"]
    report = {"tasks": {"support-dev-retrieval-with-a-long-name": {"type": "retrieval", "main": "ndcg@10"}},
              "models": models, "results": {"support-dev-retrieval-with-a-long-name": {
                  m: {"ndcg@10": v} for m, v in zip(models, (0.71234, 0.83456, 0.79012))}}}
    monkeypatch.delenv("COLUMNS", raising=False)
    print_table(report)
    out = capsys.readouterr().out
    assert "…" not in out
    for text in (*models, "support-dev-retrieval-with-a-long-name", "0.8346", "+0.1222", "+0.0778"):
        assert text in out, text
    assert max(len(line) for line in out.splitlines()) > 80
    narrow = Console(file=io.StringIO(), force_terminal=True, width=60, color_system=None)
    monkeypatch.setattr(console_module, "console", narrow)
    print_table(report)
    shown = narrow.file.getvalue()
    assert "…" not in shown
    for number in ("0.7123", "0.8346", "+0.1222", "0.7901", "+0.0778"):  # whole, on one line
        assert any(number in line for line in shown.splitlines()), number
    header = [line.split("┃")[4].strip() for line in shown.splitlines() if line.startswith("┃")]
    assert "".join(header) == "fine-tuned-on-the-support-data"  # wrapped in its column, whole


def test_gate_on_a_cut_size_compares_at_that_size():
    res = {"base": 0.80, "base@64": 0.70, "ft": 0.85, "ft@64": 0.74}
    report = {"tasks": {"sts": {"type": "sts", "main": "spearman"}}, "models": list(res), "dims": [64],
              "cut": {"base@64": ["base", 64], "ft@64": ["ft", 64]},
              "results": {"sts": {k: {"spearman": v} for k, v in res.items()}}}
    rows = check_gates(report, ["sts@64:spearman>=base+0.03", "sts@64:spearman>=base+0.05", "sts@64:spearman>=0.75",
                                "sts:spearman>=base+0.04"], model="ft")
    assert [(r["model"], r["passed"]) for r in rows] == [("ft@64", True), ("ft@64", False), ("ft@64", False), ("ft", True)]
    assert rows[0]["threshold"] == pytest.approx(0.73)  # base cut to 64, not the whole base
    from hmcl_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="not evaluated cut to 32 dimensions"):
        check_gates(report, ["sts@32:spearman>=0.5"], model="ft")


def test_a_model_trained_with_matryoshka_sizes_is_scored_at_them_by_default(tmp_path, tiny_bert):
    """The sizes are saved in hmcl_config.json; `eval.dims: auto` with no recipe sizes reads them,
    and every compared model (the plain one too) is scored cut to them."""
    from hmcl_cli.modeling.encoder import saved_matryoshka_dims
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_eval

    model = EmbeddingModel.load(str(tiny_bert))
    model.settings.matryoshka_dims = [8, 4]
    model.save(tmp_path / "run" / "model")
    assert saved_matryoshka_dims(tmp_path / "run") == [8, 4] == EmbeddingModel.load(str(tmp_path / "run" / "model")).settings.matryoshka_dims
    assert saved_matryoshka_dims(tiny_bert) == []
    path = tmp_path / "sts.csv"
    path.write_text("a cat sits,a kitten sits,4.5\nstocks fell,rain is expected,0.5\nthe dog runs,a dog runs,4.8\n")
    recipe = load_recipe(data={"name": "eval", "output_dir": str(tmp_path), "model": {"name_or_path": "none"}})
    tasks = [EvalTask(name="sts", type="sts", path=str(path))]
    report = run_eval(recipe, models={"plain": str(tiny_bert), "mrl": str(tmp_path / "run" / "model")}, tasks=tasks,
                      in_run_dir=False)
    assert report["models"] == ["plain", "plain@8", "plain@4", "mrl", "mrl@8", "mrl@4"]
    recipe.eval.dims = []  # an explicit empty list: no cut sizes
    assert run_eval(recipe, models={"mrl": str(tmp_path / "run" / "model")}, tasks=tasks, in_run_dir=False)["models"] == ["mrl"]


def test_plot_without_matplotlib_is_refused_before_evaluating(tmp_path, monkeypatch):
    import importlib.util

    from hmcl_cli.errors import HmclError
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    recipe = load_recipe(data={"name": "eval", "output_dir": str(tmp_path), "model": {"name_or_path": "none"}})
    loaded = []
    monkeypatch.setattr("hmcl_cli.stages.model_loader", lambda r: loaded.append)
    with pytest.raises(HmclError, match="--plot needs matplotlib") as err:
        run_eval(recipe, models={"m": "some/model"}, tasks=[EvalTask(name="x", type="sts", path=str(tmp_path / "x.csv"))],
                 plot=tmp_path / "p.png", in_run_dir=False)
    assert "pip install matplotlib" in err.value.hint and not loaded


def test_in_loop_reranking_metrics_equal_hmcl_eval_on_the_same_split(tmp_path, tiny_bert):
    """The trainer's dev_map / dev_rerank_mrr@10 are the numbers `hmcl eval` prints for the same
    split as a reranking task: a query whose candidates are all relevant counts (as in mteb), one
    without a relevant candidate is left out. Before, in-loop MAP left all-relevant queries out
    (TrecQA dev: 0.8382 in training, 0.8652 in the eval table, for one model)."""
    from hmcl_cli.data.example import GradedExample, add_candidate
    from hmcl_cli.evaluation.graded import evaluate_graded

    texts = ["refunds reach your card", "we ship to canada", "the login page", "express delivery",
             "sellers are paid on monday", "your parcel is on its way", "track the parcel online"]
    rows = {"how do refunds work": [(texts[0], 2), (texts[1], 0), (texts[4], 0), (texts[2], 2)],
            "where is my parcel": [(texts[5], 2), (texts[6], 2)],  # every candidate relevant
            "reset my password": [(texts[2], 0), (texts[3], 0)],  # none relevant
            "when are sellers paid": [(texts[3], 0), (texts[4], 2), (texts[1], 0)]}
    examples = []
    with open(tmp_path / "dev.jsonl", "w") as f:
        for q, cands in rows.items():
            ex = GradedExample(q)
            for t, level in cands:
                add_candidate(ex, t, level, None, "highest")
            examples.append(ex)
            f.write(json.dumps({"query": q, "pos": [t for t, lv in cands if lv == 2],
                                "neg": [t for t, lv in cands if lv == 0]}) + "\n")
    model = EmbeddingModel.load(str(tiny_bert))
    in_loop = evaluate_graded(model, examples)
    task = EvalTask(name="dev", type="reranking", path=str(tmp_path / "dev.jsonl"))
    table = evaluate({"m": model}, [task], resolve=Path)["results"]["dev"]["m"]
    assert in_loop["map"] == pytest.approx(table["map"], abs=1e-4)
    assert in_loop["rerank_mrr@10"] == pytest.approx(table["mrr@10"], abs=1e-4)
    # and by hand: 3 queries count (the all-relevant one with 1), the one without a positive not
    emb = {t: v for t, v in zip(texts + list(rows), model.encode(texts + list(rows)).numpy())}
    aps = []
    for q, cands in rows.items():
        rel = np.array([lv == 2 for _, lv in sorted(cands, key=lambda c: -float(emb[q] @ emb[c[0]]))])
        if rel.any():
            aps.append(float((np.cumsum(rel)[rel] / (np.flatnonzero(rel) + 1)).mean()))
    assert len(aps) == 3 and in_loop["map"] == pytest.approx(np.mean(aps), abs=1e-5)


NLI_ROWS = [("a man is playing a guitar", "a person plays an instrument", "ENTAILMENT"),
            ("a man is playing a guitar", "a man is cooking", "CONTRADICTION"),
            ("two dogs run in a field", "animals are outside", "ENTAILMENT"),
            ("two dogs run in a field", "the dogs are sleeping", "CONTRADICTION"),
            ("a woman slices an onion", "someone is in a kitchen", "NEUTRAL"),
            ("a woman slices an onion", "a woman is cutting a vegetable", "ENTAILMENT"),
            ("kids swim in a lake", "children are in the water", "ENTAILMENT"),
            ("kids swim in a lake", "the lake is frozen", "NEUTRAL")]


@pytest.mark.parametrize("how", ["label_map", "format nli", "neither"])
def test_pair_classification_of_nli_labelled_pairs_equals_sklearn(tmp_path, tiny_bert, how, capsys):
    """A pair-classification file labelled with NLI labels: the task's `label_map` (or `format:
    nli`, entailment 1) says which pairs are positive; AP as sklearn computes it on the cosines.
    With neither (`hmcl eval --pair-classification SICK_trial.txt`, which cannot give a map), NLI's
    label names are read as `format: nli` reads them, and the log says so: the task failed with
    "unknown label 'CONTRADICTION'" and a hint only a recipe could follow."""
    from sklearn.metrics import average_precision_score

    path = tmp_path / "sick.tsv"
    # first a pair without a gold label (SNLI's '-'): left out, before NLI's label names are met too
    unagreed = [("a dog sleeps", "an animal rests", "-")]
    path.write_text("sentence_A\tsentence_B\tentailment_judgment\n"
                    + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in unagreed + NLI_ROWS))
    columns = {"query": "sentence_A", "candidate": "sentence_B", "label": "entailment_judgment"}
    extra = ({"label_map": {"entailment": "pos", "neutral": "neg", "contradiction": "neg"}} if how == "label_map"
             else {"format": "nli"} if how == "format nli" else {})
    task = EvalTask(name="pc", type="pair_classification", path=str(path), columns=columns, **extra)
    model = EmbeddingModel.load(str(tiny_bert))
    got = evaluate({"m": model}, [task], resolve=Path)["results"]["pc"]["m"]
    a = model.encode([r[0] for r in NLI_ROWS]).numpy()
    b = model.encode([r[1] for r in NLI_ROWS]).numpy()
    labels = [int(r[2] == "ENTAILMENT") for r in NLI_ROWS]
    assert got["ap"] == pytest.approx(average_precision_score(labels, (a * b).sum(1)), abs=1e-4)
    out = " ".join(capsys.readouterr().out.split())
    assert ("its labels are NLI's: entailment read as the positive class (1)" in out) == (how == "neither")
    assert "task pc: 1 pair(s) without a gold label (SNLI's and MultiNLI's '-'" in out


def test_pair_classification_with_unmapped_labels_says_how_to_map_them(tmp_path, tiny_bert):
    path = tmp_path / "pairs.tsv"
    rows = [(a, b, "PARAPHRASE" if y == "ENTAILMENT" else "DIFFERENT") for a, b, y in NLI_ROWS]
    path.write_text("sentence_A\tsentence_B\tjudgment\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
    task = EvalTask(name="pc", type="pair_classification", path=str(path),
                    columns={"query": "sentence_A", "candidate": "sentence_B", "label": "judgment"})
    got = evaluate({"m": EmbeddingModel.load(str(tiny_bert))}, [task], resolve=Path)["results"]["pc"]["m"]
    assert "unknown label 'PARAPHRASE'" in got["error"] and "label_map" in got["error"]
    # -1/1 labels are no NLI labels: -1 is unknown, not a pair "without a gold label"
    path.write_text("s1\ts2\tlabel\na\tb\t-1\nc\td\t1\ne\tf\t0\n")
    task = EvalTask(name="pc", type="pair_classification", path=str(path))
    got = evaluate({"m": EmbeddingModel.load(str(tiny_bert))}, [task], resolve=Path)["results"]["pc"]["m"]
    assert "pairs.tsv:2: unknown label '-1' (known: 1, 0)" in got["error"], got


def _counting(model, monkeypatch, calls: list):
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda texts, **kw: calls.extend(texts) or encode(texts, **kw))
    return model


def test_a_model_evaluated_again_reuses_its_cached_embeddings(tmp_path, tiny_bert, tiny_qwen, monkeypatch):
    """eval.cache_embeddings: a second call encodes only texts the model has not seen (none here)
    and scores the same; another model, or the same weights with another encoding setting, encodes
    everything; the cache keeps this call's models' files and one more."""
    _beir(tmp_path / "beir")
    task = EvalTask(name="fixture", type="retrieval", path=str(tmp_path / "beir"))
    cache = tmp_path / "cache"

    def run(models: dict) -> tuple[dict, list]:
        calls: list = []
        loaded = {k: _counting(EmbeddingModel.load(str(v), **kw), monkeypatch, calls) for k, (v, kw) in models.items()}
        return evaluate(loaded, [task], resolve=Path, cache_dir=cache), calls

    first, calls = run({"base": (tiny_bert, {})})
    assert len(calls) == len(DOCS) + len(QUERIES) and len(list(cache.glob("evalemb-*.npz"))) == 1
    again, calls = run({"base": (tiny_bert, {})})
    assert calls == []  # every text from the cache file
    assert again["results"] == first["results"]
    _, calls = run({"base": (tiny_bert, {"query_prompt": "query: "})})  # another setting: queries differ
    assert len(calls) == len(DOCS) + len(QUERIES)
    _, calls = run({"other": (tiny_qwen, {})})
    assert len(calls) == len(DOCS) + len(QUERIES)
    assert len(list(cache.glob("evalemb-*.npz"))) == 2  # the most recent, and one more
    assert not list(cache.glob("*.tmp"))


def test_eval_cache_is_off_when_the_recipe_says_so_and_for_a_call_without_a_recipe(tmp_path, tiny_bert):
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_eval

    _beir(tmp_path / "beir")
    task = {"name": "fixture", "type": "retrieval", "path": str(tmp_path / "beir")}
    for cached, in_run_dir in ((True, True), (False, True), (True, False)):
        out = tmp_path / f"run-{cached}-{in_run_dir}"
        recipe = load_recipe(data={"name": "r", "output_dir": str(out), "model": {"name_or_path": str(tiny_bert)},
                                   "eval": {"tasks": [task], "cache_embeddings": cached}})
        run_eval(recipe, json_out=tmp_path / "r.json", in_run_dir=in_run_dir)
        files = list(out.rglob("evalemb-*.npz"))
        assert len(files) == (1 if cached and in_run_dir else 0), (cached, in_run_dir)
        # --json beside a recipe: the run's results are this eval's too (its model card reads them)
        assert (tmp_path / "r.json").is_file() and (out / "eval" / "results.json").is_file() == in_run_dir
        (tmp_path / "r.json").unlink()


def test_weights_digest_sees_a_change_its_sample_skips(tiny_bert):
    """The caches' key: a change to one value the strided sample skips (a small training update
    would touch every value; this is the hard case) still changes the digest; the same weights
    give the same digest."""
    import torch

    model = EmbeddingModel.load(str(tiny_bert))
    before = model.weights_digest()
    assert EmbeddingModel.load(str(tiny_bert)).weights_digest() == before
    weight = next(p for p in model.backbone.parameters() if p.numel() >= 256)
    with torch.no_grad():
        weight.view(-1)[1] += 1e-3  # the sample takes every (numel // 64)-th value: index 1 is not one
    assert model.weights_digest() != before


def test_eval_embeddings_over_the_cap_are_not_cached(tmp_path, tiny_bert, monkeypatch, capsys):
    """A large hub corpus must not fill the run directory: over the cap, no file, and the log says why."""
    from hmcl_cli.evaluation import mteb_bridge

    _beir(tmp_path / "beir")
    task = EvalTask(name="fixture", type="retrieval", path=str(tmp_path / "beir"))
    monkeypatch.setattr(mteb_bridge, "CACHE_MAX_BYTES", 100)
    evaluate({"base": EmbeddingModel.load(str(tiny_bert))}, [task], resolve=Path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    out = capsys.readouterr().out
    assert "eval base: embeddings not cached (" in out and " GiB cap)" in out


def test_eval_cache_file_holds_the_texts_of_the_last_call_that_encoded(tmp_path, tiny_bert, monkeypatch):
    """The file does not grow with every change of the tasks: a call that encodes new texts keeps
    only its own texts' embeddings, so texts no task asks for any more drop out."""
    _beir(tmp_path / "beir")
    sts = tmp_path / "sts.csv"
    sts.write_text("a cat sits,a kitten sits,4.5\nstocks fell,rain is expected,0.5\nthe dog runs,a dog running,4.8\n")
    retrieval = EvalTask(name="fixture", type="retrieval", path=str(tmp_path / "beir"))
    pairs = EvalTask(name="sts", type="sts", path=str(sts))

    def encoded(task) -> int:
        calls: list = []
        model = _counting(EmbeddingModel.load(str(tiny_bert)), monkeypatch, calls)
        evaluate({"base": model}, [task], resolve=Path, cache_dir=tmp_path / "cache")
        return len(calls)

    assert encoded(retrieval) == len(DOCS) + len(QUERIES)
    assert encoded(pairs) == 6  # new texts: the file now holds these alone
    assert encoded(pairs) == 0
    assert encoded(retrieval) == len(DOCS) + len(QUERIES)  # dropped from the file


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean", "manhattan"])
def test_pair_scores_take_a_single_embedding_as_one_row(kind):
    """mteb 2.10-2.20 (measured) score reranking candidates against one query embedding (a 1-D
    vector): it is one row, as sentence-transformers' similarity functions take it (it once failed
    every reranking task of those versions with 'Dimension out of range')."""
    from hmcl_cli.evaluation.mteb_bridge import pair_scores

    rng = np.random.default_rng(0)
    q, docs = rng.normal(size=8).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    one = pair_scores(q, docs, kind, every=True)
    assert tuple(one.shape) == (1, 5)
    assert np.allclose(one.numpy(), pair_scores(q[None], docs, kind, every=True).numpy())


def test_the_recipes_base_is_evaluated_with_the_recipes_model_settings(tmp_path, tiny_qwen):
    """The `base` row of a recipe's eval is the model training starts from: the recipe's pooling,
    instruction and lengths, so it equals the dev score logged at step 0. A model named with
    `eval.compare` is evaluated as saved."""
    from conftest import make_trainer

    from hmcl_cli.stages import run_eval

    model = {"name_or_path": str(tiny_qwen), "pooling": "last_token", "max_length": 40,
             "query_prompt": "Instruct: find the answer that resolves the question\nQuery: "}
    t = make_trainer(tmp_path, tiny_qwen, model=model, train={"max_steps": 2, "eval_steps": 2, "eval_at_start": True},
                     eval={"compare": {"plain": str(tiny_qwen)}})
    t.train()
    t.save_final()
    start = next(json.loads(line) for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["step"] == 0)
    report = run_eval(t.recipe)
    got = report["results"]["dev-retrieval"]
    assert got["base"]["ndcg@10"] == pytest.approx(start["dev_ndcg@10"], abs=1e-4)
    assert abs(got["plain"]["ndcg@10"] - got["base"]["ndcg@10"]) > 1e-3  # without the instruction: another embedder


def test_queries_without_a_relevant_candidate_are_left_out_and_said(tmp_path, tiny_bert, capsys):
    """A query with no positive has no MAP and no nDCG: MTEB's scoring leaves it out, and the metrics
    are over the other queries. That was silent (a dev file half without positives was scored on its
    other half without a word); the log says how many, per task. Reranking's MAP equals that of the
    file without the query."""
    rows = [{"query": "how do refunds work", "pos": ["refunds take five days"], "neg": ["we ship worldwide", "call us"]},
            {"query": "where is my parcel", "neg": ["track it online", "we ship worldwide"]},
            {"query": "reset password", "pos": ["use the login page"], "neg": ["account settings", "call us"]},
            {"query": "opening hours", "weak": ["we open at nine"], "neg": ["call us"]}]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "pos" in r))
    model = EmbeddingModel.load(str(tiny_bert))
    tasks = [EvalTask(name="rr", type="reranking", path=str(tmp_path / "all.jsonl")),
             EvalTask(name="ret", type="retrieval", path=str(tmp_path / "all.jsonl")),
             EvalTask(name="rr-judged", type="reranking", path=str(tmp_path / "judged.jsonl"))]
    got = evaluate({"m": model}, tasks, resolve=Path)["results"]
    out = " ".join(capsys.readouterr().out.split())
    assert "task rr: 2 of 4 queries have no relevant candidate (a positive) and are left out of its metrics" in out
    assert "task ret: 1 of 4 queries have no relevant candidate (a positive or weak-positive)" in out
    assert "task rr-judged:" not in out
    assert got["rr"]["m"]["map"] == pytest.approx(got["rr-judged"]["m"]["map"], abs=1e-9)


def test_graded_jsonl_retrieval_ranks_against_every_candidate_negatives_included(tmp_path, tiny_bert):
    """A graded JSONL retrieval task pools every candidate into the corpus: a hard negative that is
    no query's positive is a document to rank against (it was left out, which scored retrieval
    higher than training's dev metric of the same file). Checked against an independent nDCG@10
    (gains pos 2, weak 1) and against that dev metric."""
    from hmcl_cli.data.prepare import load_graded
    from hmcl_cli.evaluation.graded import evaluate_graded

    rows = [{"query": q, "pos": [p], "weak": [w], "neg": negs} for q, p, w, negs in [
        ("how long does a refund take", DOCS["d1"], DOCS["d2"], ["refunds are never paid", "your card was charged twice"]),
        ("how long does delivery take", DOCS["d6"], DOCS["d3"], ["delivery is free over fifty euros", "we ship by boat"]),
        ("i forgot my password", DOCS["d4"], DOCS["d5"], ["passwords must have eight letters", "the login page is down"]),
    ]]
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = EmbeddingModel.load(str(tiny_bert))
    got = evaluate({"m": model}, [EvalTask(name="dev", type="retrieval", path=str(path))], resolve=Path)
    got = got["results"]["dev"]["m"]["ndcg@10"]
    corpus = list(dict.fromkeys(t for r in rows for t in [*r["pos"], *r["weak"], *r["neg"]]))
    assert len(corpus) == 12
    docs = model.encode(corpus).numpy()
    scores = []
    for r in rows:
        gains = {r["pos"][0]: 2, r["weak"][0]: 1}
        sims = docs @ model.encode([r["query"]], side="query").numpy()[0]
        ranking = [corpus[i] for i in np.argsort(-sims)][:10]
        dcg = sum(gains.get(d, 0) / math.log2(k + 2) for k, d in enumerate(ranking))
        scores.append(dcg / (2 + 1 / math.log2(3)))
    assert got == pytest.approx(float(np.mean(scores)), abs=1e-4)
    assert got == pytest.approx(evaluate_graded(model, load_graded(path))["ndcg@10"], abs=1e-4)


def test_hub_tasks_main_metric_has_hmcls_name_where_there_is_one():
    import mteb

    from hmcl_cli.evaluation.mteb_bridge import hub_main_metric

    got = {n: hub_main_metric(mteb.get_task(n)) for n in ("STSBenchmark", "SciFact", "AskUbuntuDupQuestions",
                                                           "SprintDuplicateQuestions", "Banking77Classification")}
    assert got == {"STSBenchmark": "spearman", "SciFact": "ndcg@10", "AskUbuntuDupQuestions": "map",
                   "SprintDuplicateQuestions": "main_score",  # max_ap: no short name of hmcl's
                   "Banking77Classification": "main_score"}


def test_a_gate_that_would_judge_a_model_against_itself_fails(capsys):
    """A recipe's eval before any training has only the base: `task:map>=base` held it against
    itself and passed; it fails now, saying why. An absolute threshold still judges the base."""
    report = {"models": ["base"], "results": {"t": {"base": {"map": 0.8}}}}
    rows = check_gates(report, ["t:map>=base", "t:map>=0.5"], "base")
    assert [r["passed"] for r in rows] == [False, True]
    with pytest.raises(GateFailedError, match=r"1 of 2 quality gate\(s\) not met: t:map>=base \(it would compare base "
                                              "with itself"):
        enforce_gates(rows)
    assert "gate FAIL: t:map>=base (it would compare base with itself" in " ".join(capsys.readouterr().out.split())


def test_a_gate_judges_the_model_other_than_the_base_whichever_comes_first(capsys):
    """`hmcl eval --model base=BASE --model runs/x --gate 'dev:map>=base'` (the base named first)
    judged the base against itself and failed "no other model to judge was evaluated"; an absolute
    gate judged the base. Both judge runs/x now, and the table's Δ columns are against the base."""
    from hmcl_cli.evaluation.runner import print_table

    report = {"models": ["base", "x", "y"], "tasks": {"dev": {"type": "reranking", "main": "map"}},
              "results": {"dev": {"base": {"map": 0.8}, "x": {"map": 0.9}, "y": {"map": 0.7}}}}
    rows = check_gates(report, ["dev:map>=base", "dev:map>=0.85", "dev:map>=y+0.1", "dev:map>=x"])
    assert [(r["model"], r["passed"]) for r in rows] == [("x", True), ("x", True), ("x", True), ("base", False)]
    report["models"] = ["x", "base", "y"]  # `--model runs/x --model base=BASE --model y`
    print_table(report)
    out = capsys.readouterr().out
    header = [c.strip() for c in next(ln for ln in out.splitlines() if "metric" in ln).split("┃")[1:-1]]
    cells = [c.strip() for c in next(ln for ln in out.splitlines() if "dev" in ln).split("│")[1:-1]]
    assert header == ["task", "metric", "x", "Δ vs base", "base", "y", "Δ vs base"]
    assert cells == ["dev", "map", "0.9000", "+0.1000", "0.8000", "0.7000", "-0.1000"]


def test_a_gate_above_the_metrics_maximum_says_it_cannot_be_met(capsys):
    """`ndcg@10>=base+0.01` with the base at 0.9904 needs 1.0004: no model can pass it, and the
    failure says so instead of "not good enough to ship"."""
    report = {"models": ["fine-tuned", "base"],
              "results": {"t": {"base": {"ndcg@10": 0.9904}, "fine-tuned": {"ndcg@10": 0.9904}}}}
    rows = check_gates(report, ["t:ndcg@10>=base+0.01", "t:ndcg@10>=base+0.005"])
    assert [r.get("unreachable", False) for r in rows] == [True, False] and not any(r["passed"] for r in rows)
    with pytest.raises(GateFailedError) as e:
        enforce_gates(rows)
    assert "more than ndcg@10 can be (at most 1)" in str(e.value) and "lower the margin" in e.value.hint
    assert "needs 1.0004, more than ndcg@10 can be" in " ".join(capsys.readouterr().out.split())
    one = check_gates(report, ["t:ndcg@10>=base+0.005"])
    with pytest.raises(GateFailedError) as e:
        enforce_gates(one)
    assert e.value.hint == "the model was not good enough to ship; see the table above"


def test_gate_problems_are_found_before_anything_runs():
    from hmcl_cli.evaluation.gates import gate_problems

    tasks = {"stsb": "sts", "dev": "retrieval", "hub": None}
    models = ["base", "fine-tuned"]
    ok = ["stsb:spearman>=base+0.005", "stsb:cosine_spearman>=0.8", "dev:ndcg@10>=base-0.01", "dev:main_score>0.1",
          "dev:ndcg_at_10>=base", "hub:anything_mteb_says>=0.5", "hub:spearman>=base", "dev@64:ndcg@10>=base",
          "dev:ndcg@10>=base-0.01", "dev:ndcg@10>=1", "stsb:cosine_spearman>=1.5"]
    assert gate_problems(ok, tasks, models, dims=[64]) == []
    bad = {"dev:spearman>=base": "'spearman' is not a metric of a retrieval task",
           "dev:ndgc@10>=base": "did you mean 'ndcg@10'",
           "stsb:spearman>=fine_tuned": "no model named 'fine_tuned' — did you mean 'fine-tuned'?",
           "stbs:spearman>=0.8": "no task named 'stbs' — did you mean 'stsb'?",
           "dev@32:ndcg@10>=base": "not evaluated cut to 32 dimensions",
           "stsb spearman good": "is not of the form",
           "dev:ndcg@10>=1.02": "no model can pass it: ndcg@10 is at most 1",
           "stsb:spearman>1": "no model can pass it"}
    for gate, said in bad.items():
        (problem,) = gate_problems([gate], tasks, models, dims=[64])
        assert said in problem, (gate, problem)


def test_a_recipe_compares_with_a_run_directory_and_an_onnx_export(tmp_path, tiny_bert, hub_down):
    """`eval.compare` names a run directory (its trained model) or an ONNX export folder, written
    relative to the recipe without `./`: neither is taken for a hub id to download, and each
    scores as the model it holds."""
    import pytest

    pytest.importorskip("onnxruntime")
    from conftest import make_trainer

    from hmcl_cli.export.onnx import export_onnx
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import hub_needs, missing_inputs, run_eval

    t = make_trainer(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2})
    t.train()
    t.save_final()
    export_onnx(t.run_dir / "model", tmp_path / "onnx")
    recipe = load_recipe(tmp_path / "recipe.yaml", overrides=["eval.compare.prev=run", "eval.compare.graph=onnx"])
    assert missing_inputs(recipe) == [] and hub_needs(recipe) == []
    got = run_eval(recipe)["results"]["dev-retrieval"]
    assert got["prev"]["ndcg@10"] == got["fine-tuned"]["ndcg@10"]
    assert got["graph"]["ndcg@10"] == pytest.approx(got["fine-tuned"]["ndcg@10"], abs=2e-5)


def test_a_table_of_pairs_or_triplets_is_a_reranking_task_without_a_format(tmp_path):
    """`hmcl eval --reranking pairs.csv` (the CLI has no format flag): a table whose columns name a
    label reads as labelled pairs (TrecQA's qtext/label/atext: the base MAP equals the trecqa
    recipe's answer_selection reading, 0.8346), one naming a positive as triplets; graded JSON lines
    stay graded, even one whose `pos` and `neg` are single strings, and sentence-transformers' JSON lines
    (anchor, positive, negative) are triplets (they failed as graded rows with unknown fields)."""
    from pathlib import Path

    from hmcl_cli.evaluation.runner import load_task
    from hmcl_cli.recipe import EvalTask

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("question1,question2,is_duplicate\na?,b?,1\na?,c?,0\n", encoding="utf-8")
    triplets = tmp_path / "t.csv"
    triplets.write_text("anchor,positive,negative\nq,p,n\n", encoding="utf-8")
    graded = tmp_path / "g.jsonl"
    graded.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n", encoding="utf-8")
    st_lines = tmp_path / "st.jsonl"
    st_lines.write_text(json.dumps({"anchor": "q", "positive": "p", "negative": "n"}) + "\n", encoding="utf-8")
    one_pos = tmp_path / "one.jsonl"
    one_pos.write_text(json.dumps({"query": "q", "pos": "p", "neg": "n"}) + "\n", encoding="utf-8")
    for path, fmt in ((pairs, "pairs"), (triplets, "triplets"), (graded, "graded"), (st_lines, "triplets"),
                      (one_pos, "graded")):
        data = load_task(EvalTask(name="x", type="reranking", path=str(path)), lambda p: Path(p))
        assert data.fmt == fmt
        (ex,) = data.examples
        assert {c.level for c in ex.candidates.values()} == {0, 2}


def test_models_without_labels_get_distinct_names_and_a_label_twice_is_an_error():
    """`--model runs/a/model --model runs/b/model` were both labelled `model`: one replaced the
    other in the evaluation, silently."""
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.evaluation.runner import labelled_models

    assert labelled_models(["runs/a/model", "runs/b/model"]) == {"a": "runs/a/model", "b": "runs/b/model"}
    assert labelled_models(["x/ckpt", "y/ckpt", "base=org/m"]) == {"x/ckpt": "x/ckpt", "y/ckpt": "y/ckpt", "base": "org/m"}
    assert labelled_models(["runs/quickstart", "sentence-transformers/all-MiniLM-L6-v2"]) == {
        "quickstart": "runs/quickstart", "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
    assert list(labelled_models(["base=x", "q/base"])) == ["base", "q/base"]
    assert len(labelled_models(["a/m", "a/m"])) == 2
    with pytest.raises(RecipeError, match="--model: the name 'a' is given twice"):
        labelled_models(["a=x", "a=y"])


def test_task_flags_of_files_with_one_stem_get_distinct_names():
    """`--sts x/dev.csv --sts y/dev.csv --sts z/dev.csv` were named `dev`, `dev-sts` and `dev-sts`:
    the third's results replaced the second's, unseen."""
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.evaluation.runner import task_names

    assert task_names([("sts", None, "x/dev.csv"), ("sts", None, "y/dev.csv"), ("sts", None, "x/dev.csv")]) == [
        "x/dev", "y/dev", "x/dev'"]
    assert task_names([("sts", None, "/a/b/dev.csv"), ("pair_classification", None, "/a/b/dev.csv")]) == [
        "dev-sts", "dev-pair_classification"]
    assert task_names([("sts", None, "dev.csv"), ("reranking", None, "dev.jsonl.gz")]) == ["dev.csv", "dev.jsonl.gz"]
    assert task_names([("sts", "dev", "a.csv"), ("reranking", None, "q/dev.jsonl"), ("sts", None, "b.csv.gz")]) == [
        "dev", "q/dev", "b"]
    with pytest.raises(RecipeError, match="--sts/--reranking: the name 'd' is given twice"):
        task_names([("sts", "d", "a.csv"), ("reranking", "d", "b.jsonl")])


def test_models_named_beside_a_recipe_join_its_models(tmp_path, tiny_bert, tiny_qwen):
    """`hmcl eval RECIPE --model other=X` evaluated X alone: the recipe's base and trained model
    left the table and the recipe's own gate (`>=base+...`) failed with "no model named 'base'"."""
    from conftest import write_recipe

    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_eval

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert), ["eval.gate=[dev-retrieval:ndcg@10>=base-1]"])
    prepare(recipe, progress=False)
    report = run_eval(recipe, more_models={"other": str(tiny_qwen)})
    assert report["models"] == ["base", "other"] and report["gates"][0]["model"] == "other"
    assert report["results"]["dev-retrieval"]["other"]["delta_vs_base"] == pytest.approx(
        report["results"]["dev-retrieval"]["other"]["ndcg@10"] - report["results"]["dev-retrieval"]["base"]["ndcg@10"])
    # on the command line: models and task files beside the recipe's; a file may not take a recipe task's name
    sts = tmp_path / "extra.csv"
    sts.write_text("a cat,a kitten,4.5\na dog,a car,0.5\nrain,snow,2.5\nsun,light,3.0\n")
    out = _hmcl("eval", recipe._source, "--set", "eval.gate=[dev-retrieval:ndcg@10>=base-1]",
                "--model", f"other={tiny_qwen}", "--sts", sts, "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stdout + out.stderr
    both = json.loads((tmp_path / "r.json").read_text())
    assert list(both["results"]) == ["dev-retrieval", "extra"] and both["models"] == ["base", "other"]
    clash = _hmcl("eval", recipe._source, "--sts", f"dev-retrieval={sts}")
    assert clash.returncode == 2 and "'dev-retrieval' names a task of the recipe" in clash.stderr


def test_a_graded_table_as_a_ranking_task_keeps_its_lists_of_texts(tmp_path):
    """A parquet file of graded rows (query, pos: [...], neg: [...]) given as `--reranking` was taken
    for triplets (it has a `pos` column) and each positive list was scored as one text,
    "['refunds take five days']". It reads as graded now; a list where one text belongs is an error,
    and a triplets table's `positive` list gives several positives. A null list is an empty one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hmcl_cli.evaluation.runner import load_task
    from hmcl_cli.recipe import EvalTask

    pq.write_table(pa.table({"query": ["how long does a refund take", "do you ship abroad"],
                             "pos": [["refunds take five days"], ["we ship worldwide"]],
                             "weak": [None, ["we deliver to 40 countries"]],  # (null: none)
                             "neg": [["we ship worldwide", "call us"], ["refunds take five days"]]}), tmp_path / "g.parquet")
    expected = {"how long does a refund take": {"refunds take five days": 2, "we ship worldwide": 0, "call us": 0},
                "do you ship abroad": {"we ship worldwide": 2, "we deliver to 40 countries": 1, "refunds take five days": 0}}
    for kind in ("reranking", "retrieval"):
        data = load_task(EvalTask(name="g", type=kind, path=str(tmp_path / "g.parquet")), Path)
        assert data.fmt == "graded"
        assert {e.query: {t: c.level for t, c in e.candidates.items()} for e in data.examples} == expected
    triplets = load_task(EvalTask(name="g", type="reranking", path=str(tmp_path / "g.parquet"), format="triplets",
                                  columns={"positive": "pos", "negative": "neg"}), Path)
    assert {e.query: {t: c.level for t, c in e.candidates.items() if c.level != 1} for e in triplets.examples} == {
        q: {t: level for t, level in c.items() if level != 1} for q, c in expected.items()}
    pq.write_table(pa.table({"query": [["two", "queries"]], "positive": ["a text"]}), tmp_path / "bad.parquet")
    from hmcl_cli.errors import DataError

    with pytest.raises(DataError, match=r"bad.parquet:1: `query` holds a list, not a text"):
        load_task(EvalTask(name="b", type="reranking", path=str(tmp_path / "bad.parquet")), Path)


def test_max_queries_samples_the_queries_and_keeps_every_document(tmp_path, tiny_bert):
    """`max_queries`: the same queries every call (first by a seeded hash of their text), a
    retrieval corpus with every document of the file (the queries left out keep theirs), and the
    flag form for `hmcl eval`'s task flags, refused where no ranking task takes it."""
    from datasets import Dataset

    from hmcl_cli.evaluation.mteb_bridge import _retrieval_split
    from hmcl_cli.evaluation.runner import load_task

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]}) + "\n"
                            for i in range(50)))
    split = {}
    for kind in ("retrieval", "reranking"):
        data = load_task(EvalTask(name="qa", type=kind, path=str(path), max_queries=10), Path)
        split[kind] = _retrieval_split(data, Dataset)
    assert len(split["retrieval"]["queries"]) == 10 and len(split["retrieval"]["corpus"]) == 100
    assert list(split["retrieval"]["queries"]["text"]) == list(split["reranking"]["queries"]["text"])
    again = _retrieval_split(load_task(EvalTask(name="qa", type="retrieval", path=str(path), max_queries=10), Path), Dataset)
    assert list(again["queries"]["text"]) == list(split["retrieval"]["queries"]["text"])
    assert len(split["reranking"]["corpus"]) == 20  # each query's own candidates
    whole = _retrieval_split(load_task(EvalTask(name="qa", type="retrieval", path=str(path)), Path), Dataset)
    assert len(whole["queries"]) == 50 and len(whole["corpus"]) == 100
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--retrieval", path, "--max-queries", "10",
                "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["results"]["qa"]["m"]["mteb"]["main_score"] >= 0
    assert "qa: 10 of 50 queries (max_queries)" in out.stdout
    sts = tmp_path / "pairs.csv"
    sts.write_text("a cat,a kitten,4.5\na dog,a car,0.5\n")
    out = _hmcl("eval", "--model", f"m={tiny_bert}", "--sts", sts, "--max-queries", "10")
    assert out.returncode == 2 and "applies to --retrieval and --reranking tasks" in " ".join(out.stderr.split())
    with pytest.raises(Exception, match="max_queries is for retrieval and reranking tasks, not sts"):
        EvalTask(name="s", type="sts", path="x.csv", max_queries=3)


def test_a_retrieval_search_too_big_for_host_memory_is_refused_before_mteb_runs(tmp_path, monkeypatch):
    """100,000 queries over 200,000 documents: mteb's search took the machine's memory and the
    system killed `hmcl eval` without a word. It stops with the task, the sizes, the memory and
    a max_queries that fits, before any model is loaded."""
    from datasets import Dataset

    from hmcl_cli.errors import DataError
    from hmcl_cli.evaluation import mteb_bridge
    from hmcl_cli.evaluation.runner import load_task

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"query": f"question {i}", "pos": [f"answer {i}"]}) + "\n" for i in range(200)))
    task = EvalTask(name="qa", type="retrieval", path=str(path))
    need = mteb_bridge.search_memory(200, 200)
    monkeypatch.setattr("hmcl_cli.environment.available_memory", lambda: need // 4)
    with pytest.raises(DataError) as e:
        mteb_bridge._retrieval_split(load_task(task, Path), Dataset)
    said = str(e.value) + " " + (e.value.hint or "")
    assert "task 'qa': mteb's retrieval search of 200 queries over 200 documents needs about" in said
    assert "`max_queries: 35` on the task in eval.tasks (`--max-queries 35`" in said  # 200 x 1/4 x 0.7
    monkeypatch.setattr("hmcl_cli.environment.available_memory", lambda: need)
    assert len(mteb_bridge._retrieval_split(load_task(task, Path), Dataset)["queries"]) == 200
    monkeypatch.setattr("hmcl_cli.environment.available_memory", lambda: None)  # unknown: not checked
    assert len(mteb_bridge._retrieval_split(load_task(task, Path), Dataset)["queries"]) == 200


@pytest.mark.parametrize("corpus", [300, 40])
def test_retrieval_metrics_of_all_queries_at_once_equal_the_per_query_definitions(corpus):
    """The in-loop retrieval metrics are computed for every query at once; they equal nDCG,
    recall, MRR@10 and MAP@100 computed query by query (graded gains, queries without judged
    documents left out, a corpus smaller than 100)."""
    from hmcl_cli.evaluation.metrics import (average_precision, ndcg_at_k, ranked_retrieval_scores, recall_at_k,
                                             reciprocal_rank)

    rng = np.random.default_rng(7)
    ranked = np.stack([rng.permutation(corpus)[:100] for _ in range(60)])
    qrels = [{} if i % 7 == 3 else {int(d): float(rng.choice([1, 2])) for d in rng.choice(corpus, rng.integers(1, 6), replace=False)}
             for i in range(60)]
    want: dict[str, list] = defaultdict(list)
    for row, judged in zip(ranked, qrels):
        if not judged:
            continue
        grades = np.array([judged.get(int(d), 0.0) for d in row])
        rel = grades > 0
        for k in (10, 100):
            want[f"ndcg@{k}"].append(ndcg_at_k(grades[:k], list(judged.values()), k))
            want[f"recall@{k}"].append(recall_at_k(rel, len(judged), k))
        want["mrr@10"].append(reciprocal_rank(rel, 10))
        want["map@100"].append(average_precision(rel[:100], len(judged)))
    got = ranked_retrieval_scores(ranked, qrels)
    assert got["queries"] == sum(1 for j in qrels if j) == len(want["mrr@10"])
    for name, values in want.items():
        assert got[name] == pytest.approx(float(np.mean(values)), abs=1e-12), name
    assert 0 < got["ndcg@10"] < 1 and 0 < got["map@100"] < 1
    assert ranked_retrieval_scores(ranked, [{}] * 60) == {"queries": 0}


def test_an_eval_task_key_its_file_format_does_not_read_is_refused(tmp_path):
    """An eval task's `score_range`, `label_map` or `columns` go to the reader of its file's format,
    known when the file is read (a reranking task's table may read as pairs or triplets): one that
    format does not read is an error naming the task, the file and the key, not dropped (nor an
    internal error from the reader's settings)."""
    from hmcl_cli.errors import RecipeError
    from hmcl_cli.evaluation.runner import load_task
    from hmcl_cli.recipe import EvalTask

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["a"], "neg": ["b"]}) + "\n")
    with pytest.raises(RecipeError) as refused:
        load_task(EvalTask(name="r", type="reranking", path=str(path), score_range=(0, 5), label_map={"1": "pos"}),
                  Path)
    said = " ".join(str(refused.value).split())
    assert f"eval task 'r' (reranking), {path}: format graded" in said
    assert "does not read `score_range` and `label_map`" in said
    assert len(load_task(EvalTask(name="r", type="reranking", path=str(path)), Path).examples) == 1
    sts = tmp_path / "s.csv"
    sts.write_text("a,b,4.5\nc,d,1.0\n")
    with pytest.raises(RecipeError, match="format sts .* does not read `label_map`"):
        load_task(EvalTask(name="s", type="sts", path=str(sts), label_map={"1": "pos"}), Path)
    assert len(load_task(EvalTask(name="s", type="sts", path=str(sts), score_range=(0, 5)), Path).pairs[0]) == 2
