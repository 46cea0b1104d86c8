import json
import math

import numpy as np
import pytest

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
    assert got == pytest.approx(float(np.mean(scores)), abs=1e-6)


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
