import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hmcl_cli.data.prepare import load_graded, prepare
from hmcl_cli.mining import grade_candidates, mine, top_k_search
from hmcl_cli.recipe import MineConfig, load_recipe
from conftest import write_recipe


def test_exact_search_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    q, c = F.normalize(torch.randn(37, 16, generator=g), dim=-1), F.normalize(torch.randn(500, 16, generator=g), dim=-1)
    scores, idx = top_k_search(q, c, k=10, chunk=8)
    brute = np.argsort(-(q @ c.T).numpy(), axis=1)[:, :10]
    assert (idx == brute).all()
    assert np.allclose(scores, np.take_along_axis((q @ c.T).numpy(), brute, 1), atol=1e-6)


def test_exact_search_in_corpus_blocks_equals_brute_force():
    """The corpus in blocks (here 64 rows, 9 blocks; the last smaller than k) with a running top-k
    per query gives the one-block answer."""
    g = torch.Generator().manual_seed(3)
    q, c = F.normalize(torch.randn(37, 16, generator=g), dim=-1), F.normalize(torch.randn(520, 16, generator=g), dim=-1)
    sims = (q @ c.T).numpy()
    brute = np.argsort(-sims, axis=1)[:, :10]
    scores, idx = top_k_search(q, c, k=10, chunk=8, block_bytes=64 * 16 * 4)
    assert (idx == brute).all()
    assert np.allclose(scores, np.take_along_axis(sims, brute, 1), atol=1e-6)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    small = top_k_search(q, c[:7], k=10, block_bytes=16 * 4)  # fewer texts than k: k = corpus size
    assert small[1].shape == (37, 7) and (small[1] == np.argsort(-sims[:, :7], axis=1)).all()


def test_exact_search_bounds_its_similarities_whatever_the_width(monkeypatch):
    """A block of 1 GiB of narrow embeddings (32 dimensions) was 8M texts: a chunk of 4096 queries
    against it, 128 GiB of similarities. The block is cut so one chunk's similarities stay within
    ``sim_bytes``; the answer is the brute-force one."""
    g = torch.Generator().manual_seed(5)
    q, c = F.normalize(torch.randn(100, 8, generator=g), dim=-1), F.normalize(torch.randn(5000, 8, generator=g), dim=-1)
    widest, topk = [], torch.topk

    def watched(x, *a, **kw):
        widest.append(x.numel())
        return topk(x, *a, **kw)

    monkeypatch.setattr(torch, "topk", watched)
    scores, idx = top_k_search(q, c, k=10, chunk=50, sim_bytes=50 * 1000 * 4)
    assert max(widest) <= 50 * (1000 + 10)  # a chunk's similarities (or a merge of two top-k lists)
    sims = (q @ c.T).numpy()
    assert (idx == np.argsort(-sims, axis=1)[:, :10]).all()


def test_faiss_search_equals_brute_force_flat_and_ivf():
    import pytest

    pytest.importorskip("faiss")
    from hmcl_cli.mining import faiss_search

    g = torch.Generator().manual_seed(2)
    q, c = F.normalize(torch.randn(40, 16, generator=g), dim=-1), F.normalize(torch.randn(3000, 16, generator=g), dim=-1)
    brute = np.argsort(-(q @ c.T).numpy(), axis=1)[:, :10]
    scores, idx = faiss_search(q.numpy(), c.numpy(), k=10)
    assert (idx == brute).all()
    # IVF (large-corpus path, forced here): approximate, but the probes cover most of the true top-10
    _, idx_ivf = faiss_search(q.numpy(), c.numpy(), k=10, exact_below=100)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx_ivf, brute)])
    assert recall > 0.9


def test_margin_removes_near_duplicate_and_band_picks_paraphrase():
    cfg = MineConfig(range_min=0, range_max=10, relative_margin=0.05, weak_band=(0.85, 0.95), num_weak=1, num_negatives=2)
    pos = 0.8
    ranked = [(0, 0.80),   # the known positive itself
              (1, 0.79),   # near-duplicate of the positive: above (1 - 0.05) * 0.8 = 0.76
              (2, 0.72),   # paraphrase: 0.9 x positive, inside the weak band
              (3, 0.60), (4, 0.50), (5, 0.40), (6, 0.30)]
    weak, negs, removed, _, examined = grade_candidates(pos, ranked, known={0}, cfg=cfg, rng=np.random.default_rng(0))
    assert examined == 5  # ranks 0-9 less the known positive and the text taken as weak
    assert weak == [(2, 0.72)]
    assert [i for i, _ in negs] == [3, 4] and removed == 1
    assert 1 not in {i for i, _ in weak + negs}


def test_mine_keeps_known_levels_and_is_rerunnable(tmp_path, tiny_bert):
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={"range_min": 0, "range_max": 30, "num_negatives": 2,
                                                               "relative_margin": None, "weak_band": [-1.0, 1.0]}))
    prepare(recipe, progress=False)
    before = {ex.query: {t: c.level for t, c in ex.candidates.items()} for ex in load_graded(recipe.run_dir / "data/train.jsonl")}
    report = mine(recipe)
    after = load_graded(recipe.run_dir / "data/train.jsonl")
    assert (recipe.run_dir / "data/train.unmined.jsonl").is_file()
    added = 0
    for ex in after:
        for text, level in before[ex.query].items():
            assert ex.candidates[text].level == level  # levels from the data never change
        added += len(ex.candidates) - len(before[ex.query])
    assert added == report["added"]["weak"] + report["added"]["neg"] > 0
    first = (recipe.run_dir / "data/train.jsonl").read_text()
    mine(recipe)  # re-run starts from the unmined file: same result
    assert (recipe.run_dir / "data/train.jsonl").read_text() == first
    assert json.loads((recipe.run_dir / "data/mining_report.json").read_text())["queries"] == len(before)


@pytest.mark.parametrize("scores", ["cosine", "relative", "none"])
def test_mined_candidate_scores_follow_the_option_and_labelled_scores_survive(tmp_path, tiny_bert, scores):
    """``mine.scores``: mined candidates carry the miner's cosine, that cosine on the data's scale
    (relative to the best positive) or no score (null in *_scores); in every case the data's own
    scores stay as they were."""
    recipe_path = write_recipe(tmp_path, tiny_bert, mine={"range_min": 0, "range_max": 30, "num_negatives": 2,
                                                        "num_weak": 0, "relative_margin": None, "scores": scores})
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for i, row in enumerate(rows):  # gold scores on every labelled candidate
        for level in ("pos", "weak", "neg"):
            row[f"{level}_scores"] = [round(0.1 + 0.01 * (i % 50) + 0.3 * ("neg", "weak", "pos").index(level), 4)
                                      for _ in row.get(level, [])]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(recipe_path)
    prepare(recipe, progress=False)
    gold = {ex.query: {t: c.score for t, c in ex.candidates.items()} for ex in load_graded(recipe.run_dir / "data/train.jsonl")}
    report = mine(recipe)
    assert report["added"]["neg"] > 0
    from hmcl_cli.modeling.encoder import EmbeddingModel

    model = EmbeddingModel.from_recipe(recipe.model, recipe.base_dir)

    def cos(query, text):  # an encoding of its own, one text at a time
        a, b = model.encode([query], side="query"), model.encode([text], side="doc")
        return float((a * b).sum())

    mined = 0
    for ex in load_graded(recipe.run_dir / "data/train.jsonl"):
        for text, cand in ex.candidates.items():
            if text in gold[ex.query]:
                assert cand.score == gold[ex.query][text]  # the data's own scores are kept
                continue
            mined += 1
            if scores == "none":
                assert cand.score is None
                continue
            c = cos(ex.query, text)
            if scores == "cosine":
                assert cand.score == pytest.approx(c, abs=1e-4)
            else:
                pos = {t: cos(ex.query, t) for t, x in ex.candidates.items() if x.level == 2}
                best = max(pos, key=pos.get)
                assert cand.score == pytest.approx(gold[ex.query][best] * c / pos[best], abs=1e-4)
    assert mined == report["added"]["neg"]
    if scores == "none":
        written = [json.loads(line) for line in (recipe.run_dir / "data/train.jsonl").read_text().splitlines()]
        assert any(None in r.get("neg_scores", []) and any(s is not None for s in r["neg_scores"]) for r in written)


def test_relative_mined_score_needs_a_scored_positive():
    from hmcl_cli.mining import mined_score

    assert mined_score("relative", 0.6, 0.8, 0.9) == pytest.approx(0.675)
    assert mined_score("relative", 0.6, 0.8, None) is None  # no scale to put it on
    assert mined_score("relative", 0.6, -0.1, 0.9) is None  # a positive the miner scores at or below 0
    assert mined_score("cosine", 0.6, 0.8, None) == 0.6 and mined_score("none", 0.6, 0.8, 0.9) is None


def test_teacher_band_picks_weak_and_guards_negatives():
    from hmcl_cli.recipe import TeacherConfig

    cfg = MineConfig(range_min=0, range_max=10, relative_margin=0.05, num_weak=1, num_negatives=5,
                     teacher=TeacherConfig(model="x", band=(0.5, 0.8)))
    pos = 0.8
    ranked = [(0, 0.80), (1, 0.70), (2, 0.69), (3, 0.60), (4, 0.50), (5, 0.40), (6, 0.30)]
    # relative teacher scores: 1 is positive-like (above the band), 2 and 3 are in the band (2 taken
    # as weak: it ranks first; 3 is ambiguous), 4-6 are below it
    teacher = {1: 0.95, 2: 0.7, 3: 0.55, 4: 0.2, 5: 0.1, 6: 0.49}
    picks = grade_candidates(pos, ranked, known={0}, cfg=cfg, rng=np.random.default_rng(0), teacher=teacher)
    assert picks.weak == [(2, 0.69)]
    assert [i for i, _ in picks.negatives] == [4, 5, 6]
    assert picks.removed_by_teacher == 2  # 1 (positive-like) and 3 (in the band, not taken)
    # without the teacher the student's band decides: 1 becomes the weak-positive, 3 a negative
    plain = grade_candidates(pos, ranked, known={0}, cfg=cfg.model_copy(update={"teacher": None}),
                             rng=np.random.default_rng(0))
    assert plain.weak == [(1, 0.70)] and 3 in [i for i, _ in plain.negatives]


def _teacher_model(folder, tokenizer_from, kind):
    """A tiny random BERT teacher (other weights than the student): cross-encoder or embedder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, num_labels=1)
    model = BertForSequenceClassification(cfg) if kind == "cross-encoder" else BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _independent_teacher(folder, kind, query, texts):
    """The teacher's score of (query, text) computed one pair at a time, without hmcl's batching."""
    if kind == "cross-encoder":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        m = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            return [float(torch.sigmoid(m(**tok(query, t, return_tensors="pt")).logits[0, 0])) for t in texts]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")  # mean pooling, like hmcl's default for encoders
    q = st.encode([query], normalize_embeddings=True)
    d = st.encode(texts, normalize_embeddings=True)
    return [float(x) for x in (d @ q[0])]


import pytest  # noqa: E402


@pytest.mark.parametrize("kind", ["cross-encoder", "embedder"])
def test_mine_with_teacher_end_to_end(tmp_path, tiny_bert, kind):
    teacher_dir = _teacher_model(tmp_path / "teacher", tiny_bert, kind)
    mine_cfg = {"range_min": 0, "range_max": 12, "num_negatives": 3, "num_weak": 2, "relative_margin": None,
                "teacher": {"model": str(teacher_dir), "band": [0.0, 0.0]}}
    path = write_recipe(tmp_path, tiny_bert, mine=mine_cfg)
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    examples = load_graded(recipe.run_dir / "data/train.jsonl")
    # a band around the middle of the teacher's relative scores, from an independent computation on
    # the first query, so that weak, ambiguous and negative candidates all occur
    ex0 = examples[0]
    pos0 = [t for t, c in ex0.candidates.items() if c.level == 2]
    others = [t for t, c in ex0.candidates.items() if c.level != 2]
    s0 = _independent_teacher(teacher_dir, kind, ex0.query, pos0 + others)
    rel0 = np.array(s0[len(pos0):]) / max(s0[: len(pos0)])
    band = [float(np.quantile(rel0, 0.3)), float(np.quantile(rel0, 0.7))]
    recipe = load_recipe(path, overrides=[f"mine.teacher.band=[{band[0]}, {band[1]}]"])
    report = mine(recipe)
    assert report["teacher"]["queries_graded"] > 0
    after = load_graded(recipe.run_dir / "data/train.jsonl")
    before = {ex.query: ex for ex in examples}
    checked = {"weak": 0, "neg": 0}
    for ex in after[:12]:
        old = before[ex.query]
        new = {t: c.level for t, c in ex.candidates.items() if t not in old.candidates}
        if not new:
            continue
        pos = [t for t, c in old.candidates.items() if c.level == 2]
        scores = _independent_teacher(teacher_dir, kind, ex.query, pos + list(new))
        best = max(scores[: len(pos)])
        for (text, level), s in zip(new.items(), scores[len(pos):]):
            rel = s / best
            if level == 1:
                assert band[0] - 1e-3 <= rel <= band[1] + 1e-3, (text, rel, band)
                checked["weak"] += 1
            else:
                assert rel < band[0] + 1e-3, (text, rel, band)
                checked["neg"] += 1
    assert checked["weak"] > 0 and checked["neg"] > 0
    assert report["teacher"]["removed_as_positive_like_or_ambiguous"] > 0


def test_queries_that_are_corpus_texts_reuse_their_embeddings_when_sides_encode_alike(tmp_path, tiny_bert, monkeypatch):
    import hmcl_cli.mining as mining
    from hmcl_cli.data.example import Candidate, GradedExample
    from hmcl_cli.modeling.encoder import EmbeddingModel

    model = EmbeddingModel.load(str(tiny_bert))
    corpus = ["a cat sits on the mat", "the dog runs", "stocks fell sharply today", "rain is expected"]
    examples = [GradedExample("the dog runs", {"a cat sits on the mat": Candidate("a cat sits on the mat", 2)}),
                GradedExample("a cat sits on the mat", {"the dog runs": Candidate("the dog runs", 1)}),
                GradedExample("is it going to rain", {"rain is expected": Candidate("rain is expected", 2)})]
    position = {t: i for i, t in enumerate(corpus)}
    c = model.encode(corpus, side="doc").numpy()
    encoded = []
    real = mining.encode_queries
    monkeypatch.setattr(mining, "encode_queries", lambda m, qs, *a: encoded.extend(qs) or real(m, qs, *a))
    q = mining.query_embeddings(model, examples, position, c, 8)
    assert encoded == ["is it going to rain"]  # the two corpus texts were not encoded again
    fresh = model.encode([ex.query for ex in examples], side="query").numpy()
    assert np.allclose(q, fresh, atol=1e-5)
    model.settings.query_prompt = "query: "  # queries now encode differently: nothing is reused
    encoded.clear()
    q = mining.query_embeddings(model, examples, position, c, 8)
    assert encoded == [ex.query for ex in examples]
    assert np.allclose(q, model.encode([ex.query for ex in examples], side="query").numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["cross-encoder", "embedder"])
def test_teacher_max_length_is_held_to_the_teachers_positions(tmp_path, tiny_bert, kind, capsys):
    """mine.teacher.max_length (512 by default) past a teacher's 256 positions truncates to 256
    (before: the first long pair failed inside the model)."""
    from hmcl_cli.teacher import load_teacher

    teacher = load_teacher(MineConfig(teacher={"model": str(_teacher_model(tmp_path / "t", tiny_bert, kind)),
                                               "kind": kind}).teacher)
    captured = capsys.readouterr()
    assert "truncating to 256" in captured.out + captured.err
    long = "refund please " * 300
    scores = teacher.score(["how long does a refund take", long], [long, "refunds take five days"])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_mining_after_a_new_prepare_mines_the_new_data(tmp_path, tiny_bert):
    """prepare -> mine -> new data -> prepare -> mine (a scheduled `hmcl run` in a kept run
    directory): the second mine read the first one's train.unmined.jsonl, so it mined the old
    data and wrote it over the newly prepared train.jsonl. prepare now drops that file."""
    path = write_recipe(tmp_path, tiny_bert, mine={"range_min": 0, "range_max": 30, "num_negatives": 1,
                                                    "relative_margin": None})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    mine(recipe)
    train = tmp_path / "train.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines(True)
    new = [json.dumps({"query": "a question only the new data has", "pos": ["its answer"]}) + "\n"]
    train.write_text("".join(lines[:40] + new), encoding="utf-8")
    prepare(recipe, progress=False)
    assert not (recipe.run_dir / "data/train.unmined.jsonl").exists()
    mine(recipe)
    queries = {ex.query for ex in load_graded(recipe.run_dir / "data/train.jsonl")}
    assert "a question only the new data has" in queries
    assert queries == {ex.query for ex in load_graded(recipe.run_dir / "data/train.unmined.jsonl")}


def test_a_test_split_no_longer_made_is_not_left_behind(tmp_path, tiny_bert):
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, data={"sources": [{"path": "train.jsonl"}], "test_fraction": 0.2}))
    prepare(recipe, progress=False)
    assert (recipe.run_dir / "data/test.jsonl").is_file()
    prepare(load_recipe(write_recipe(tmp_path, tiny_bert)), progress=False)
    assert not (recipe.run_dir / "data/test.jsonl").exists()


def test_corpus_embeddings_are_not_reused_for_other_weights_or_settings(tmp_path, tiny_bert, capsys):
    """The mining cache was keyed by the model's name: a model folder trained again in place (the
    same path) or another pooling reused the old embeddings. It is keyed by a digest of the
    weights and every encoding setting now."""
    import shutil

    import torch

    from hmcl_cli.modeling.encoder import EmbeddingModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert, model_dir)
    recipe = load_recipe(write_recipe(tmp_path, model_dir, mine={"range_min": 0, "num_negatives": 1}))
    prepare(recipe, progress=False)
    mine(recipe)
    mine(recipe)
    assert "reused corpus embeddings" in capsys.readouterr().out  # same weights, same settings
    retrained = EmbeddingModel.load(str(model_dir))
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(0.01)
    retrained.save(model_dir)  # trained again, in place
    mine(recipe)
    assert "reused corpus embeddings" not in capsys.readouterr().out
    mine(load_recipe(write_recipe(tmp_path, model_dir, model={"pooling": "cls"}, mine={"range_min": 0, "num_negatives": 1})))
    assert "reused corpus embeddings" not in capsys.readouterr().out
    assert len(list((recipe.run_dir / "cache").glob("corpus-emb-*.npy"))) == 2  # three keys, the last two kept


def test_training_on_data_mined_with_other_settings_is_warned_about(tmp_path, tiny_bert, capsys):
    """`hmcl mine`, then a mine (or encoding model) setting edited, then `hmcl train`: training
    uses the candidates mined then; it says so. Not for the setting that only says whether `hmcl
    run` mines (mine.enabled), nor when nothing changed."""
    from hmcl_cli.stages import _check_mined

    path = write_recipe(tmp_path, tiny_bert, mine={"range_min": 0, "range_max": 30, "num_negatives": 1,
                                                    "relative_margin": None})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    mine(recipe)
    capsys.readouterr()
    _check_mined(recipe)
    _check_mined(load_recipe(path, overrides=["mine.enabled=true"]))
    assert "mined with other settings" not in capsys.readouterr().err
    for override, said in (("mine.num_negatives=3", "mine.num_negatives: 1 then, 3 now"),
                           ("model.max_length=32", "model.max_length: 48 then, 32 now")):
        _check_mined(load_recipe(path, overrides=[override]))
        err = " ".join(capsys.readouterr().err.split())
        assert "was mined with other settings or corpus files than the recipe's now" in err and said in err, err


def test_queries_mined_short_or_not_at_all_are_announced(tmp_path, tiny_bert, capsys):
    """`+N negatives over M queries` alone did not say that some queries got fewer than asked (a
    small corpus, ranks past range_min) or none (no positive to measure against)."""
    free = {"range_min": 0, "range_max": 30, "relative_margin": None}
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={**free, "num_negatives": 2}))
    prepare(recipe, progress=False)
    capsys.readouterr()
    report = mine(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert report["queries_short_of_negatives"] == 0 and "fewer than" not in err
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={**free, "num_negatives": 500}))
    report = mine(recipe)
    err = " ".join(capsys.readouterr().err.split())
    short = report["queries_short_of_negatives"]
    assert short == report["queries"] - report["queries_without_positive"] > 0
    assert f"{short} of {short} queries got fewer than mine.num_negatives 500 negatives" in err
    assert "a larger corpus (mine.corpus)" in err and "false-negative margin" not in err
    # advice a setting at its limit makes void is left out: range_min is 0 already; range_max 30 of 64 texts
    assert report["corpus"] > 30 and "a higher mine.range_max" in err and "range_min" not in err
    # short because the margin left out (nearly) every candidate: it says so, not "a larger corpus"
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={**free, "num_negatives": 2, "max_score": -1.0}))
    report = mine(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert report["added"]["neg"] == 0 and report["removed_by_margin"] > 0
    assert (f"the false-negative margin (mine.max_score -1: texts above -1) removed {report['removed_by_margin']} of "
            f"the {report['removed_by_margin']} candidates at ranks 0-30 of the top {min(100, report['corpus'])}") in err, err
    assert "a larger corpus" not in err
    # short because the teacher keeps every candidate from being a negative: its band says why
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={**free, "num_negatives": 2, "teacher": {
        "model": str(tiny_bert), "kind": "embedder", "band": [-1e9, 0.9]}}))
    report = mine(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert report["added"]["neg"] == 0 and report["teacher"]["removed_as_positive_like_or_ambiguous"] > 0
    assert ("in their windows (ranks 0-30 of the top" in err and "the teacher kept" in err
            and "mine.teacher.band's low end -1e+09" in err and "a higher band low end lets closer texts" in err), err
    graded = [json.loads(line) for line in (recipe.run_dir / "data/train.unmined.jsonl").read_text().splitlines()]
    for row in graded[:3]:
        row["pos"] = []  # three queries without a positive
    (recipe.run_dir / "data/train.unmined.jsonl").write_text("".join(json.dumps(r) + "\n" for r in graded))
    report = mine(recipe)
    assert report["queries_without_positive"] >= 3
    assert f"{report['queries_without_positive']} of {report['queries']} queries have no positive" in " ".join(
        capsys.readouterr().err.split())


def test_a_corpus_table_is_read_by_its_text_column_never_by_its_first(tmp_path):
    """A parquet corpus without a `text` column was read by its first column: with `doc_id, body`
    the ids were mined as documents, silently. A table's documents are its `text` column (after
    its `title`, as in a JSONL corpus), else its one column of strings; several are an error naming
    them. A folder saved by `datasets` reads alike, and so do CSV and TSV files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hmcl_cli.errors import DataError
    from hmcl_cli.mining import read_corpus

    docs = ["Refunds take five days.", "We ship worldwide."]
    pq.write_table(pa.table({"doc_id": ["d1", "d2"], "body": docs}), tmp_path / "ids.parquet")
    with pytest.raises(DataError, match=r"has no `text` column .*\(its columns: doc_id, body\)"):
        read_corpus(tmp_path / "ids.parquet")
    pq.write_table(pa.table({"n": [1, 2], "body": docs}), tmp_path / "body.parquet")
    assert read_corpus(tmp_path / "body.parquet") == docs
    pq.write_table(pa.table({"title": ["Refunds", None], "text": ["take five days.", docs[1]]}), tmp_path / "titled.parquet")
    assert read_corpus(tmp_path / "titled.parquet") == docs
    datasets.Dataset.from_dict({"doc_id": ["d1", "d2"], "text": docs}).save_to_disk(str(tmp_path / "saved"))
    assert read_corpus(tmp_path / "saved") == docs
    # a CSV/TSV corpus was read line by line: its header and ids became documents, quotes kept
    (tmp_path / "docs.csv").write_text('id,text\nd1,"Refunds take five days, usually."\nd2,We ship worldwide.\n')
    assert read_corpus(tmp_path / "docs.csv") == ["Refunds take five days, usually.", docs[1]]
    (tmp_path / "docs.tsv").write_text("title\ttext\nRefunds\ttake five days.\n\tWe ship worldwide.\n")
    assert read_corpus(tmp_path / "docs.tsv") == docs
    (tmp_path / "one.csv").write_text("".join(f"{d}\n" for d in docs))  # one column, no header
    assert read_corpus(tmp_path / "one.csv") == docs


def test_training_unmined_data_of_a_recipe_that_mines_is_warned_about(tmp_path, tiny_bert, capsys):
    """`hmcl prepare` then `hmcl train` (the mine step forgotten, or `hmcl prepare` run again after
    it, which removes the mined data) trained without the hard negatives the recipe asks for, and
    said nothing."""
    from hmcl_cli.stages import _check_mined

    path = write_recipe(tmp_path, tiny_bert, mine={"enabled": True, "range_min": 0, "range_max": 30,
                                                    "num_negatives": 1, "relative_margin": None})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    capsys.readouterr()
    _check_mined(recipe)
    assert "the recipe enables mine, but the training data" in " ".join(capsys.readouterr().err.split())
    _check_mined(load_recipe(path, overrides=["mine.enabled=false"]))  # a recipe that does not mine: no word
    mine(recipe)
    capsys.readouterr()
    _check_mined(recipe)
    assert "not mined" not in capsys.readouterr().err


def test_mine_corpus_entries_may_be_patterns(tmp_path, tiny_bert):
    """`mine.corpus: [docs/part-*.csv]` (a corpus in shards) was "does not exist"; a pattern adds
    the files it matches, and one matching nothing is named before mining."""
    from hmcl_cli.stages import missing_inputs

    docs = tmp_path / "docs"
    docs.mkdir()
    for k in range(2):
        (docs / f"part-{k}.csv").write_text("text\n" + "".join(f"extra document {k}-{i}\n" for i in range(5)))
    free = {"range_min": 0, "range_max": 30, "relative_margin": None, "num_negatives": 1}
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={**free, "enabled": True, "corpus": ["docs/part-*.csv"]}))
    prepare(recipe, progress=False)
    alone = load_recipe(write_recipe(tmp_path / "alone", tiny_bert, mine={**free, "enabled": True}))
    prepare(alone, progress=False)
    assert not missing_inputs(recipe)
    mine(recipe)
    mine(alone)
    report = json.loads((recipe.run_dir / "data" / "mining_report.json").read_text())
    without = json.loads((alone.run_dir / "data" / "mining_report.json").read_text())
    assert report["corpus"] == without["corpus"] + 10
    missing = missing_inputs(load_recipe(write_recipe(tmp_path, tiny_bert, mine={"enabled": True, "corpus": ["docs/x-*.csv"]})))
    assert [line for _, line in missing] == ["mine.corpus.0: docs/x-*.csv matches no file"]


def test_training_on_data_mined_from_a_corpus_edited_since_is_warned_about(tmp_path, tiny_bert, capsys):
    """`hmcl mine` with a `mine.corpus` file, the file edited (or a shard added), then `hmcl train`:
    the mined candidates come from the old corpus; training says so, naming the file. Touching
    the file without changing it, or moving the run's checkout, is no change."""
    import os

    from hmcl_cli.stages import _check_mined

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "part-0.csv").write_text("text\n" + "".join(f"extra document {i}\n" for i in range(5)))
    (tmp_path / "more.jsonl").write_text('{"text": "a document of its own"}\n')
    free = {"range_min": 0, "range_max": 30, "relative_margin": None, "num_negatives": 1}
    path = write_recipe(tmp_path, tiny_bert, mine={**free, "corpus": ["docs/part-*.csv", "more.jsonl"]})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    mine(recipe)
    capsys.readouterr()
    _check_mined(recipe)
    os.utime(tmp_path / "more.jsonl", ns=(1, 1))  # touched: same content
    _check_mined(recipe)
    assert "mined" not in capsys.readouterr().err
    (tmp_path / "more.jsonl").write_text('{"text": "a document of its own"}\n'.replace("own", "OWN"))
    _check_mined(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert "was mined with other settings or corpus files than the recipe's now" in err
    assert f"mine.corpus.1: {tmp_path / 'more.jsonl'}: its content changed (same size)" in err, err
    (docs / "part-1.csv").write_text("text\nanother document\n")
    _check_mined(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert "mine.corpus.0: 1 file(s) read then, 2 now" in err, err


def test_faiss_ivf_short_answers_mine_no_text_that_was_not_found(tmp_path, tiny_bert, monkeypatch):
    """faiss's IVF index (corpora over 200,000 texts) answers index -1, score -3.4e38, where the
    lists it probed hold fewer than top_k texts. -1 read as a corpus position is the last text:
    it was mined as a negative of many queries with that score."""
    pytest.importorskip("faiss")
    from hmcl_cli import mining

    real = mining.faiss_search
    answers = []

    def ivf(q, c, k):  # the large-corpus path on this small corpus
        out = real(q, c, k, exact_below=10)
        answers.append(out[1])
        return out

    monkeypatch.setattr(mining, "faiss_search", ivf)
    words = ["refund", "card", "ship", "order", "late", "parcel", "bank", "fee", "help", "account"]
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text("".join(" ".join(rng.choice(words, 6)) + f" {i}\n" for i in range(3000)))
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={
        "search": "faiss", "corpus": [str(tmp_path / "corpus.txt")], "top_k": 1000, "range_min": 0,
        "range_max": 1000, "num_negatives": 1000, "num_weak": 0, "relative_margin": None, "scores": "cosine"}))
    prepare(recipe, progress=False)
    report = mine(recipe)
    assert (answers[0] < 0).any()  # the search did come back short
    assert report["added"]["neg"] > 0
    for ex in load_graded(recipe.run_dir / "data/train.jsonl"):
        assert all(c.score is None or -1.001 <= c.score <= 1.001 for c in ex.candidates.values()), ex.query


def test_mining_holds_one_query_s_ranking_at_a_time(tmp_path, tiny_bert):
    """Every query's top_k (index, score) pairs were made as Python tuples before any query was
    mined (with every row as a dict: +1.5 GB RSS at 100,000 queries, top_k 100); each query's are
    made as it is mined now.
    64 queries x top_k 3000: mine's traced peak was 25.6 MB, 3.4 MB now."""
    import tracemalloc

    words = ["refund", "card", "ship", "order", "late", "parcel", "bank", "fee", "help", "account"]
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text("".join(" ".join(rng.choice(words, 6)) + f" {i}\n" for i in range(3000)))
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={"corpus": [str(tmp_path / "corpus.txt")], "top_k": 3000}))
    prepare(recipe, progress=False)
    tracemalloc.start()
    try:
        report = mine(recipe)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["queries"] == 64 and report["corpus"] > 3000
    assert peak < 10e6, peak


def test_mining_stopped_while_writing_leaves_the_training_file_as_it_was(tmp_path, tiny_bert, monkeypatch):
    """The prepared file was renamed to train.unmined.jsonl before the mined one was written: a
    stop while writing left no train.jsonl. It is renamed once the mined file is whole."""
    from hmcl_cli.data import example

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, mine={"range_min": 0, "range_max": 30, "num_negatives": 2,
                                                               "relative_margin": None}))
    prepare(recipe, progress=False)
    data = recipe.run_dir / "data"
    prepared = (data / "train.jsonl").read_bytes()
    real, calls = example.GradedExample.to_json, []

    def stopped(self):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(example.GradedExample, "to_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        mine(recipe)
    assert (data / "train.jsonl").read_bytes() == prepared
    assert not (data / "train.unmined.jsonl").exists()
    assert not any(p.name.endswith(".tmp") for p in data.iterdir())
    monkeypatch.setattr(example.GradedExample, "to_json", real)
    report = mine(recipe)  # and again, whole
    assert (data / "train.unmined.jsonl").read_bytes() == prepared and report["added"]["neg"] > 0


def test_prompts_given_to_a_cross_encoder_teacher_are_refused(tmp_path, tiny_bert):
    """`mine.teacher.query_prompt`/`doc_prompt` are an embedder's: a cross-encoder teacher scored
    the pairs without them, and without a word. With `kind: cross-encoder` the recipe is refused
    when it loads; with `kind: auto` when the teacher loads and turns out to be one."""
    from pydantic import ValidationError

    from hmcl_cli.errors import RecipeError
    from hmcl_cli.teacher import load_teacher

    with pytest.raises(ValidationError, match="`query_prompt` is for an embedder teacher"):
        MineConfig(teacher={"model": "m", "kind": "cross-encoder", "query_prompt": "query: "})
    folder = str(_teacher_model(tmp_path / "t", tiny_bert, "cross-encoder"))
    with pytest.raises(RecipeError, match="is a cross-encoder .*`query_prompt` and `doc_prompt` are for an embedder"):
        load_teacher(MineConfig(teacher={"model": folder, "query_prompt": "q: ", "doc_prompt": "d: "}).teacher)
    assert load_teacher(MineConfig(teacher={"model": folder}).teacher).batch_size == 64
    embedder = str(_teacher_model(tmp_path / "e", tiny_bert, "embedder"))
    assert load_teacher(MineConfig(teacher={"model": embedder, "query_prompt": "q: "}).teacher) is not None
