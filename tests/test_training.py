"""Training loop behaviour: GradCache equivalence, exact resume, best model, LoRA."""


import json
import os
import numpy as np
import pytest
import torch

from hmcl_cli.data.prepare import prepare
from hmcl_cli.recipe import load_recipe
from hmcl_cli.stages import run_train
from hmcl_cli.training.trainer import HMCLTrainer
from conftest import assert_grads_close, make_trainer, write_recipe


def _trainer(tmp_path, model_dir, **sections):
    return make_trainer(tmp_path, model_dir, **sections)


def _grads(t):
    return [p.grad.clone() for p in t.trainable if p.grad is not None]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
@pytest.mark.parametrize("joined", [False, True])  # model.fused_projections (a GPU's auto; true on a CPU)
def test_grad_cache_gives_same_loss_and_gradients(tmp_path, fixture, joined, request):
    from hmcl_cli.modeling.fused_projections import fused_groups

    t = _trainer(tmp_path, request.getfixturevalue(fixture), model={"fused_projections": joined})
    # float64: the same computation, without fp32 rounding. In fp32 with torch 2.14 the token-type
    # embedding's gradient (one row summing every token's, with cancellation) came out 1.4e-5 of its
    # largest entry apart (6.8e-14 in float64), past assert_grads_close's fp32 allowance
    t.model.double()
    t.loss_fn.double()
    batch = next(iter(torch.utils.data.DataLoader(
        __import__("hmcl_cli.training.batching", fromlist=["StepBatches"]).StepBatches(
            t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0), batch_size=None)))
    loss_plain, _ = t._forward_backward(batch, 1.0)
    g_plain = _grads(t)
    t.optimizer.zero_grad(set_to_none=True)
    t.cfg.grad_cache_chunk = 3
    loss_gc, _ = t._forward_backward(batch, 1.0)
    g_gc = _grads(t)
    assert torch.allclose(loss_plain, loss_gc, atol=1e-6)
    assert_grads_close(g_plain, g_gc)
    groups = fused_groups(t.model.backbone)  # joined in the plain step and in each chunk's recomputation
    assert bool(groups) == joined and all(g.fused_calls > 1 and g.active for g in groups)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_equals_uninterrupted_run(tmp_path, tiny_bert, dropout):
    """Mid-epoch, with dropout too: its masks come from the global RNG, which the checkpoint keeps
    and nothing else may draw from (a resumed run's new data loader drew its workers' seed from
    it: the weights then differed by up to 3.5e-4 for all-MiniLM-L6-v2 on the quickstart)."""
    if dropout:
        from conftest import build_tiny_model

        tiny_bert = build_tiny_model(tmp_path / "dropout-bert", "bert", dropout=dropout)
    sections = {"train": {"max_steps": 6, "save_steps": 2, "eval_steps": 100, "keep_last": 5, "load_best_at_end": False}}
    full = load_recipe(write_recipe(tmp_path / "full", tiny_bert, **sections))
    prepare(full, progress=False)
    t_full = HMCLTrainer(full)
    t_full.setup()
    t_full.train()
    ref = {k: v.clone() for k, v in t_full.model.state_dict().items()}

    part = load_recipe(write_recipe(tmp_path / "part", tiny_bert, **sections), ["train.max_steps=6"])
    prepare(part, progress=False)
    t1 = HMCLTrainer(part)
    t1.setup()
    t1.total_steps = 4  # "interrupted" after 4 steps (the schedule still spans 6)
    t1.train()
    t2 = HMCLTrainer(part)
    t2.setup(resume=True)
    assert t2.step == 4
    t2.train()
    for k, v in t2.model.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-6), k


def test_resuming_with_other_training_settings_says_so(tmp_path, tiny_bert, capsys):
    """--resume with a setting that changes the training's course (learning rate, batch size, a
    loss weight) warns with what changed; the same settings, or a knob that computes the same steps
    another way (model.unpad, train.log_steps), do not."""
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    path = write_recipe(tmp_path, tiny_bert, train={"max_steps": 3, "save_steps": 3, "eval_steps": 3})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    t = HMCLTrainer(recipe)
    t.setup()
    t.train()
    for overrides, said in ((["model.unpad=false", "train.log_steps=1"], None),
                            (["train.learning_rate=0.01", "loss.ranking_weight=2"],
                             ("train.learning_rate: 0.001 then, 0.01 now", "loss.ranking_weight: 1.0 then, 2.0 now")),
                            (["train.batch_size=4"], ("train.batch_size: 8 then, 4 now",))):
        capsys.readouterr()
        again = HMCLTrainer(load_recipe(path, overrides))
        again.setup(resume=True)
        assert again.step == 3
        err = " ".join(capsys.readouterr().err.split())
        if said is None:
            assert "other settings" not in err, err
        else:
            assert "was trained with other settings than the recipe's now" in err and all(x in err for x in said), err


def test_dataloader_workers_train_the_same_weights(tmp_path, tiny_bert):
    """Batches collated in worker processes (train.num_workers) are the batches of the main
    process, and the workers leave the dropout masks alone: the same weights, across an epoch end."""
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "dropout-bert", "bert", dropout=0.1)
    weights = []
    for workers in (0, 2):
        recipe = load_recipe(write_recipe(tmp_path / f"w{workers}", model, train={
            "max_steps": 3, "batch_size": 128, "eval_steps": 100, "num_workers": workers, "load_best_at_end": False}))
        prepare(recipe, progress=False)
        t = HMCLTrainer(recipe)
        t.setup()
        assert t.plan.steps_per_epoch < t.total_steps  # the loader is made again for the second epoch
        t.train()
        weights.append({k: v.clone() for k, v in t.model.state_dict().items()})
    for k, v in weights[0].items():
        assert torch.allclose(v, weights[1][k], atol=1e-6), k


def test_corrupt_checkpoint_is_skipped(tmp_path, tiny_bert):
    sections = {"train": {"max_steps": 4, "save_steps": 2, "eval_steps": 100, "keep_last": 5}}
    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, **sections))
    prepare(recipe, progress=False)
    t = HMCLTrainer(recipe)
    t.setup()
    t.train()
    (recipe.run_dir / "checkpoints" / "step-0000004" / "model.pt").write_bytes(b"garbage")
    t2 = HMCLTrainer(recipe)
    t2.setup(resume=True)
    assert t2.step == 2


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_gradient_checkpointing_recomputes_without_changing_loss_or_gradients(tmp_path, fixture, request):
    import warnings

    model = request.getfixturevalue(fixture)

    def step(folder, checkpointing):
        with warnings.catch_warnings():  # the deprecated transformers entry point warns
            warnings.simplefilter("error", FutureWarning)
            t = make_trainer(folder, model, model={"gradient_checkpointing": checkpointing},
                             train={"precision": "fp32"})
        batch = next(iter(torch.utils.data.DataLoader(
            __import__("hmcl_cli.training.batching", fromlist=["StepBatches"]).StepBatches(
                t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0), batch_size=None)))
        # training mode (transformers checkpoints only then); the same seed gives both runs the same
        # dropout masks, and the recompute restores the RNG state
        t.model.train()
        layer = next(m for m in t.model.backbone.modules() if type(m).__name__ in ("BertLayer", "Qwen3DecoderLayer"))
        calls = []  # a projection inside the block: it runs again when the block is recomputed
        next(m for m in layer.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(0)
        loss, _ = t._forward_backward(batch, 1.0)
        return len(calls), loss, _grads(t)

    calls_plain, loss_plain, g_plain = step(tmp_path / "plain", False)
    calls_ckpt, loss_ckpt, g_ckpt = step(tmp_path / "ckpt", True)
    assert calls_ckpt == 2 * calls_plain > 0  # each block ran again in the backward pass
    assert torch.allclose(loss_plain, loss_ckpt, atol=1e-6)
    assert len(g_plain) == len(g_ckpt) > 0
    for a, b in zip(g_plain, g_ckpt):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_llama"])
def test_lora_training_reduces_loss_and_saves_adapter(tmp_path, fixture, request):
    tiny_qwen = request.getfixturevalue(fixture)
    sections = {"model": {"lora": {"enabled": True, "r": 4, "alpha": 8}},
                "train": {"max_steps": 8, "learning_rate": 5e-3, "eval_steps": 100, "log_steps": 1}}
    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, **sections))
    prepare(recipe, progress=False)
    final = run_train(recipe)
    import json

    losses = [json.loads(line)["loss"] for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "modules.json").is_file()

    # export merged: loads in sentence-transformers, equals the unmerged model, differs from the base
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    from hmcl_cli.export.merged import export_merged
    from hmcl_cli.modeling.encoder import EmbeddingModel

    report = export_merged(final, tmp_path / "merged")
    assert report["mean_cosine"] >= 0.99999 and report["max_abs_diff_vs_base"] > 1e-4
    texts = ["refund please", "where is my package", "how do i become a seller on your marketplace"]
    base = EmbeddingModel.load(str(tiny_qwen))
    base_emb = base.encode(texts)
    unmerged = EmbeddingModel(PeftModel.from_pretrained(base.backbone, str(final / "adapter")), base.tokenizer, base.settings, base.head)
    st = torch.tensor(SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(texts))
    assert torch.allclose(st, unmerged.encode(texts), atol=1e-5)
    assert not torch.allclose(st, base_emb, atol=1e-4)


def test_all_negative_dataset_is_refused(tmp_path, tiny_bert):
    import json

    folder = tmp_path / "neg"
    recipe_path = write_recipe(folder, tiny_bert)
    rows = [{"query": f"question {i}", "neg": [f"answer {i}"]} for i in range(20)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(recipe_path)
    prepare(recipe, progress=False)
    from hmcl_cli.errors import DataError

    with pytest.raises(DataError, match="every candidate is a negative"):
        HMCLTrainer(recipe).setup()


def test_nonfinite_loss_stops_naming_the_step_after_saving(tmp_path, tiny_bert):
    from hmcl_cli.errors import TrainingDivergedError

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 8, "save_steps": 1, "eval_steps": 100, "log_steps": 4,
                                                   "keep_last": 5})
    forward, calls = t.loss_fn.forward, []

    def poisoned(batch):
        total, parts = forward(batch)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), parts

    t.loss_fn.forward = poisoned
    with pytest.raises(TrainingDivergedError) as err:
        t.train()
    msg = str(err.value)
    assert "NaN/inf at step 3" in msg and "last good checkpoint: step-0000002" in msg
    ckpts = t.recipe.run_dir / "checkpoints"
    assert (ckpts / "diverged" / "manifest.json").is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == ["diverged", "diverged-step-0000003", "step-0000001",
                                                       "step-0000002"]
    # --resume picks the last good checkpoint, not the diverged state
    t2 = HMCLTrainer(t.recipe)
    t2.setup(resume=True)
    assert t2.step == 2
    assert all(torch.isfinite(p).all() for p in t2.model.parameters())


def test_batches_hold_one_source_each_and_cover_every_anchor(tmp_path, tiny_bert, monkeypatch):
    import json

    from hmcl_cli.training.batching import BatchPlan, TrainData

    monkeypatch.setattr(TrainData, "KEEP_TEXTS", True)  # (the source is read off each query's text)

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"query": f"question {i}", "pos": [f"answer {i}"]}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"query": f"refund {i}", "pos": [f"shipping {i}"]}) + "\n" for i in range(13)))
    t = _trainer(tmp_path, tiny_bert, data={"sources": [{"path": str(a), "split": "train"},
                                                        {"path": str(b), "split": "train"},
                                                        {"path": "dev.jsonl", "split": "dev"}]},
                 train={"batch_size": 4, "max_steps": 2})
    source_of = {i: t.data.queries[an.query][1].split()[0] for i, an in enumerate(t.data.anchors)}
    plan = BatchPlan(t.data, 4, seed=3)
    batches = plan.epoch_batches(0)
    assert all(len({source_of[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(33))
    assert len(batches) == plan.steps_per_epoch == 5 + 4
    mixed = BatchPlan(t.data, 4, seed=3, by_source=False).epoch_batches(0)
    assert any(len({source_of[i] for i in batch}) == 2 for batch in mixed)


def test_source_weights_up_and_down_sample_a_source(tmp_path, tiny_bert, capsys, monkeypatch):
    """data.sources[].weight: 2 lists each anchor of a source twice per epoch; 0.5 a random half
    of them, another half next epoch; the epoch's length is what the plan says; 1 everywhere is
    the unweighted plan, batch for batch."""
    import collections
    import json

    from hmcl_cli.training.batching import BatchPlan, TrainData

    monkeypatch.setattr(TrainData, "KEEP_TEXTS", True)  # (the source is read off each query's text)

    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_text("".join(json.dumps({"query": f"question {i}", "pos": [f"answer {i}"]}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"query": f"refund {i}", "pos": [f"shipping {i}"]}) + "\n" for i in range(12)))
    c.write_text("".join(json.dumps({"query": f"login {i}", "pos": [f"password {i}"]}) + "\n" for i in range(7)))
    t = _trainer(tmp_path, tiny_bert, data={"sources": [{"path": str(a), "split": "train", "weight": 2},
                                                        {"path": str(b), "split": "train", "weight": 0.5},
                                                        {"path": str(c), "split": "train"},
                                                        {"path": "dev.jsonl", "split": "dev", "weight": 3}]},
                 train={"batch_size": 4, "max_steps": 2, "positive_repeats": 1})
    out = capsys.readouterr()
    assert "sources per epoch (data.sources[].weight): a.jsonl 10 anchors x 2, b.jsonl 12 anchors x 0.5, " \
           "c.jsonl 7 anchors x 1 = 33 anchors per epoch" in out.out
    assert "data.sources.3.weight 3: no training example comes from source 'dev.jsonl'" in out.err
    source_of = {i: t.data.queries[an.query][1].split()[0] for i, an in enumerate(t.data.anchors)}
    halves = []
    for epoch in range(2):
        batches = t.plan.epoch_batches(epoch)
        assert len(batches) == t.plan.steps_per_epoch == 5 + 2 + 2
        counts = collections.Counter(i for batch in batches for i in batch)
        per = collections.defaultdict(collections.Counter)
        for i, src in source_of.items():
            per[src][counts[i]] += 1
        assert per["question"] == {2: 10} and per["login"] == {1: 7} and per["refund"] == {1: 6, 0: 6}
        assert all(len({source_of[i] for i in batch}) == 1 for batch in batches)
        halves.append({i for i in counts if source_of[i] == "refund"})
    assert halves[0] != halves[1]
    plain, ones = BatchPlan(t.data, 4, seed=3), BatchPlan(t.data, 4, seed=3, source_weights=[1.0, 1.0, 1.0])
    assert plain.epoch_batches(1) == ones.epoch_batches(1)


def test_positive_repeats_lists_anchors_with_a_positive_that_many_times(tmp_path, tiny_bert):
    import collections
    import json

    a = tmp_path / "a.jsonl"
    rows = [{"query": f"question {i}", "pos": [f"answer {i}"]} for i in range(6)]
    rows += [{"query": f"other {i}", "weak": [f"related {i}"], "neg": [f"far {i}"]} for i in range(10)]
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = _trainer(tmp_path, tiny_bert, data={"sources": [{"path": str(a), "split": "train"},
                                                        {"path": "dev.jsonl", "split": "dev"}]},
                 train={"batch_size": 4, "max_steps": 2, "positive_repeats": 3})
    counts = collections.Counter(i for b in t.plan.epoch_batches(0) for i in b)
    has_pos = {i: bool(an.pos) for i, an in enumerate(t.data.anchors)}
    assert sorted(has_pos.values()) == [False] * 10 + [True] * 6
    assert {i: counts[i] for i in has_pos} == {i: 3 if p else 1 for i, p in has_pos.items()}
    assert t.plan.steps_per_epoch == -(-(6 * 3 + 10) // 4)


def test_positive_repeats_auto_repeats_only_where_few_anchors_have_a_positive(tmp_path, tiny_bert, capsys):
    import collections
    import json

    def plan_counts(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        t = _trainer(tmp_path / name, tiny_bert, data={"sources": [{"path": str(path), "split": "train"},
                                                                   {"path": "dev.jsonl", "split": "dev"}]},
                     train={"batch_size": 4, "max_steps": 2})
        assert t.cfg.positive_repeats == "auto"
        counts = collections.Counter(i for b in t.plan.epoch_batches(0) for i in b)
        return t, {(bool(an.pos), counts[i]) for i, an in enumerate(t.data.anchors)}  # (has a positive, times)

    few = [{"query": f"question {i}", "pos": [f"answer {i}"]} for i in range(5)]
    few += [{"query": f"other {i}", "weak": [f"related {i}"], "neg": [f"far {i}"]} for i in range(6)]
    t, counts = plan_counts("few", few)  # 5 of 11 anchors have a positive: listed twice
    assert t.positive_repeats == 2 and counts == {(True, 2), (False, 1)}
    assert t.plan.steps_per_epoch == -(-(5 * 2 + 6) // 4)
    assert "train.positive_repeats auto: 2 (5 of 11" in capsys.readouterr().out
    most = few[:5] + [{"query": f"more {i}", "pos": [f"reply {i}"]} for i in range(1)] + few[5:10]
    t, counts = plan_counts("most", most)  # 6 of 11: once
    assert t.positive_repeats == 1 and counts == {(True, 1), (False, 1)}
    assert t.plan.steps_per_epoch == -(-11 // 4)


def test_training_data_lets_its_texts_go_once_tokenised(tmp_path, tiny_bert):
    """Training reads token ids; the texts as Python strings kept 0.9 GB resident in every process
    (899,842 anchors: 2.57 GB with them, 1.66 GB without). They are dropped once tokenised and
    hashed; their counts stay, and the trainer (which says them) trains on."""
    from hmcl_cli.data.prepare import load_graded
    from hmcl_cli.training import batching

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 1})
    examples = load_graded(t.run_dir / "data" / "train.jsonl")
    data = batching.TrainData(examples, t.model)
    assert data.queries is None and data.docs is None
    assert data.n_queries == len({ex.query for ex in examples}) == len(data.query_tokens)
    assert data.n_docs == len({c for ex in examples for c in ex.candidates}) == len(data.doc_tokens)
    assert t.data.docs is None and t.data.n_docs == data.n_docs
    t.train()
    assert t.step == 1


def test_token_cache_survives_two_writers_interleaved(tmp_path, tiny_bert, monkeypatch):
    """Every process of a multi-process run tokenizes and writes the same cache file; a second
    writer that saves and renames between the first one's save and rename must not break it
    (a shared temp name did: FileNotFoundError in a 2-process run)."""
    from hmcl_cli.data.prepare import load_graded
    from hmcl_cli.training import batching

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 1})
    examples = load_graded(t.run_dir / "data" / "train.jsonl")
    save, calls = batching.np.savez, []

    def interleaved_save(file, **arrays):
        save(file, **arrays)
        calls.append(file.name)
        if len(calls) == 1:  # the other process writes and renames now
            batching.TrainData(examples, t.model, tmp_path / "cache", data_key="k")

    monkeypatch.setattr(batching.np, "savez", interleaved_save)
    data = batching.TrainData(examples, t.model, tmp_path / "cache", data_key="k")
    assert len(calls) == 2 and calls[0] != calls[1]
    left = [p.name for p in (tmp_path / "cache").rglob("*")]
    assert len(left) == 1 and left[0].startswith("tokens-") and left[0].endswith(".npz")  # no temp file left

    def no_save(file, **arrays):
        raise AssertionError("the cache left behind was not read back")

    monkeypatch.setattr(batching.np, "savez", no_save)  # a third run reads the cache, writes nothing
    again = batching.TrainData(examples, t.model, tmp_path / "cache", data_key="k")
    assert again.query_tokens == data.query_tokens and again.doc_tokens == data.doc_tokens


@pytest.mark.parametrize("segmented", [False, True])
def test_token_cache_packs_and_unpacks_token_lists_as_they_were(segmented):
    """The cache holds flat arrays (a pickle of a million Python lists took 43 s to load, longer
    than tokenising them again); unpacked, they are the same lists, empty ones included."""
    from hmcl_cli.training.batching import TokenLists, pack_tokens, unpack_tokens

    if segmented:  # each text: a list of (ids, weight) segments
        tokens = [[([101, 7, 8, 102], 2), ([101, 9, 102], 1)], [([101, 5, 102], 1)], [([], 0)]]
    else:
        tokens = [[101, 7, 8, 102], [], [101, 50000, 102], [3]]
    arrays = pack_tokens(tokens, "d", segmented)
    assert arrays["d_ids"].dtype == np.int32 and all(a.ndim == 1 for a in arrays.values())
    unpacked = unpack_tokens(arrays, "d", segmented)
    if segmented:
        assert unpacked == [[(list(ids), w) for ids, w in segs] for segs in tokens]
    else:  # a TokenLists: each item a view of the flat ids
        assert isinstance(unpacked, TokenLists) and [x.tolist() for x in unpacked] == tokens
        assert unpacked.lengths().tolist() == [4, 0, 3, 1] and pack_tokens(unpacked, "d", False)["d_ids"] is unpacked.ids
    assert len(unpack_tokens(pack_tokens([], "q", segmented), "q", segmented)) == 0
    if not segmented:
        assert TokenLists.of([]).starts.shape == (0,) and TokenLists.of([]).lengths().shape == (0,)


def test_token_lists_join_chunks_and_pad_as_lists_do(tiny_bert):
    """Candidates are tokenised in chunks, each a TokenLists, joined; a batch of their views pads
    to the same tensors as the same ids given as lists."""
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.training.batching import TokenLists

    chunks = [[[5, 6, 7], [8]], [], [[9, 10], [], [11, 12, 13, 14]]]
    joined = TokenLists.joined([TokenLists.of(c) for c in chunks])
    flat = [ids for c in chunks for ids in c]
    assert len(joined) == 5 and [x.tolist() for x in joined] == flat
    model = EmbeddingModel.load(str(tiny_bert))
    for side in ("right", "left"):
        model.settings.padding_side = side
        views, lists = model.pad([joined[i] for i in (3, 0, 4)]), model.pad([flat[i] for i in (3, 0, 4)])
        assert all(torch.equal(views[k], lists[k]) for k in lists) and views.keys() == lists.keys()


@pytest.mark.parametrize("segmented", [False, True])
def test_queries_with_their_prompts_are_tokenised_in_chunks_in_their_order(tmp_path, tiny_bert, monkeypatch, segmented):
    """Queries are tokenised a chunk at a time (all at once, a million queries' Python token
    lists took gigabytes), grouped by prompt: each query still gets its own text's ids, with its
    own prompt, in its own place."""
    from hmcl_cli.data.example import parse_graded
    from hmcl_cli.training import batching

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 1},
                 model={"query_prompt": "query: ", **({"segments": {"length": 16}} if segmented else {})})
    prompts = [None, "question: ", None, "represent this: ", "question: ", None, None, "question: "]
    examples = [parse_graded({"query": f"refund number {i} " + "card " * i, "pos": [f"answer {i}"],
                              **({"prompt": p} if p else {})}) for i, p in enumerate(prompts)]
    monkeypatch.setattr(batching.TrainData, "TOKENIZE_CHUNK", 2)
    seen = []
    tokenize = batching.TrainData._tokenize_side
    monkeypatch.setattr(batching.TrainData, "_tokenize_side",
                        lambda self, model, texts, side: seen.append(len(texts)) or tokenize(self, model, texts, side))
    monkeypatch.setattr(batching.TrainData, "KEEP_TEXTS", True)  # (the texts are tokenised again below)
    data = batching.TrainData(examples, t.model)
    assert max(seen) == 2  # never more than a chunk at a time
    fresh = batching.TrainData.__new__(batching.TrainData)
    fresh.segments = data.segments
    for i, (ex, prompt) in enumerate(zip(examples, prompts)):
        t.model.settings.query_prompt = prompt or "query: "
        want = fresh._tokenize_side(t.model, [ex.query], "query")[0]
        got = data.query_tokens[i]
        assert (got == want) if segmented else (got.tolist() == list(want))
    t.model.settings.query_prompt = "query: "
    assert [list(d) for d in data.doc_tokens] == [list(x) for x in fresh._tokenize_side(t.model, data.docs, "doc")]


def test_token_cache_with_segments_reads_back_what_it_wrote(tmp_path, tiny_bert, monkeypatch):
    from hmcl_cli.data.prepare import load_graded
    from hmcl_cli.training import batching

    t = _trainer(tmp_path, tiny_bert, model={"segments": {"length": 16, "overlap": 2}}, train={"max_steps": 1})
    examples = load_graded(t.run_dir / "data" / "train.jsonl")
    first = batching.TrainData(examples, t.model, tmp_path / "cache", data_key="k")
    assert any(len(segs) > 1 for segs in first.doc_tokens)  # texts split into several segments
    # read back from the cache, not tokenised again (a cache that fails to load is rebuilt silently)
    monkeypatch.setattr(batching.TrainData, "_tokenize_side", lambda *a: pytest.fail("tokenised again"))
    again = batching.TrainData(examples, t.model, tmp_path / "cache", data_key="k")
    assert again.query_tokens == first.query_tokens and again.doc_tokens == first.doc_tokens


def test_group_by_length_cuts_batches_from_length_sorted_windows(tmp_path, tiny_bert):
    import json

    from hmcl_cli.training.batching import BatchPlan

    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"query": " ".join(["word"] * (1 + i)), "pos": [f"answer {i}"]}) + "\n"
                         for i in range(24)))
    t = _trainer(tmp_path, tiny_bert, data={"sources": [{"path": str(a), "split": "train"},
                                                        {"path": "dev.jsonl", "split": "dev"}]},
                 train={"batch_size": 4, "max_steps": 2, "group_by_length": False})
    assert not t.plan.group_by_length

    def spans(plan):
        batches = plan.epoch_batches(0)
        assert sorted(i for b in batches for i in b) == list(range(24))
        return [(min(t.data.anchor_length(i) for i in b), max(t.data.anchor_length(i) for i in b)) for b in batches]

    # 24 anchors < one window of 16 batches: grouped batches are disjoint length ranges
    grouped = sorted(spans(BatchPlan(t.data, 4, seed=3, group_by_length=True)))
    assert all(hi < lo for (_, hi), (lo, _) in zip(grouped, grouped[1:]))
    plain = sorted(spans(t.plan))
    assert any(hi >= lo for (_, hi), (lo, _) in zip(plain, plain[1:]))


def test_bf16_checkpoint_trains_with_float32_weights(tmp_path, tiny_qwen):
    """Hub decoders are stored in bf16; full fine-tuning must not update bf16 weights (small
    updates round away), so `model.dtype: auto` loads trained weights in float32."""
    from transformers import AutoModel, AutoTokenizer

    bf16 = tmp_path / "bf16-model"
    AutoModel.from_pretrained(tiny_qwen).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(bf16)
    from hmcl_cli.training.trainer import HMCLTrainer

    recipe = load_recipe(write_recipe(tmp_path, bf16, train={"max_steps": 1}))
    prepare(recipe, progress=False)
    trainer = HMCLTrainer(recipe)
    trainer.setup()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    forced = load_recipe(write_recipe(tmp_path / "forced", bf16, model={"dtype": "bfloat16"}))
    prepare(forced, progress=False)
    t2 = HMCLTrainer(forced)
    t2.setup()
    assert {p.dtype for p in t2.model.parameters()} == {torch.bfloat16}


def test_training_start_says_what_the_ranking_term_does_with_unscored_pairs(tmp_path, tiny_bert, capsys):
    """The sample data is graded by level only: under `auto` every pair stays in the ranking term."""
    capsys.readouterr()
    t = _trainer(tmp_path, tiny_bert)
    out = " ".join(capsys.readouterr().out.split())
    n = sum(len(a.pos) + len(a.weak) + len(a.neg) for a in t.data.anchors)
    assert f"loss.ranking_pairs auto: {n} of {n} pairs have no score; 0 left to InfoNCE" in out
    assert f"{n} ordered by level" in out


@pytest.mark.parametrize("fixture,model_section", [("tiny_bert", {}), ("tiny_qwen", {}),
                                                   ("tiny_bert", {"segments": {"length": 24, "overlap": 2}})])
def test_one_forward_gives_same_loss_and_gradients_in_one_call(tmp_path, fixture, model_section, request):
    """train.one_forward: both sides in one forward call (the narrower padded further, on the
    right for BERT, on the left for Qwen) = one call per side."""
    from hmcl_cli.training.batching import StepBatches

    t = make_trainer(tmp_path, request.getfixturevalue(fixture), model=model_section,
                     loss={"classification_weight": 0.2, "ranking_weight": 1.0, "local_weight": 0.3 if model_section else 0.0})
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    assert batch["q_input_ids"].size(1) != batch["c_input_ids"].size(1)  # the sides' widths differ
    calls = []
    hook = t.model.backbone.register_forward_hook(lambda m, a, k: calls.append(1))
    out = {}
    for one in (False, True):
        t.cfg.one_forward = one
        calls.clear()
        loss, _ = t._forward_backward(batch, 1.0)
        out[one] = (loss.detach(), _grads(t), len(calls))
        t.optimizer.zero_grad(set_to_none=True)
    hook.remove()
    assert (out[False][2], out[True][2]) == (2, 1)
    assert torch.allclose(out[False][0], out[True][0], atol=1e-5)
    assert_grads_close(out[False][1], out[True][1])


def test_one_forward_auto_joins_only_on_a_gpu_where_padding_stays_small(tmp_path, tiny_bert):
    t = _trainer(tmp_path, tiny_bert)

    def batch(n_q, w_q, n_c, w_c):
        return {"q_input_ids": torch.zeros((n_q, w_q)), "c_input_ids": torch.zeros((n_c, w_c))}

    assert t.cfg.one_forward == "auto"
    assert not t._one_forward(batch(8, 16, 24, 16))  # CPU: never
    assert t._forward_calls() == ""  # and training says nothing about it
    t.device = torch.device("cuda")  # only its type is read
    assert "25% padded tokens" in t._forward_calls()
    assert t._one_forward(batch(8, 16, 24, 16))
    assert t._one_forward(batch(8, 16, 24, 24))  # 8 x 8 extra of 512: 12.5%
    assert not t._one_forward(batch(32, 16, 32, 64))  # 32 x 48 extra of 2560: 60%
    assert not t._one_forward(batch(8, 16, 0, 8))  # no candidates
    t.joins_unpadded = True  # unpadded by the flash varlen kernel: joining adds no padding
    assert t._one_forward(batch(32, 16, 32, 64)) and "adds no padding" in t._forward_calls()
    t.joins_unpadded = False
    t.sharded = True
    assert not t._one_forward(batch(8, 16, 24, 16))  # FSDP: every process must make the same calls
    t.cfg.one_forward = True
    assert t._one_forward(batch(32, 16, 32, 64))
    assert "one forward call per step" in t._forward_calls()


def test_adamw_takes_the_fused_kernel_where_torch_has_one_and_updates_as_the_per_tensor_path(tmp_path, tiny_bert):
    """hmcl's AdamW is PyTorch's fused kernel on the CPU too (torch >= 2.4; 6.5x faster on a
    MiniLM optimizer step here) with the update of the per-tensor path (``fused=False``)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    from hmcl_cli.training.trainer import adamw

    t = make_trainer(tmp_path, tiny_bert)
    assert t.optimizer.defaults["fused"] is ("cpu" in _get_fused_kernels_supported_devices())
    torch.manual_seed(0)
    start = [torch.randn(40, 30), torch.randn(30), torch.randn(())]
    weights = {kind: [w.clone().requires_grad_() for w in start] for kind in ("fused", "plain")}
    opts = {kind: adamw([{"params": ws[:2], "lr": 1e-3, "weight_decay": 0.01}, {"params": ws[2:], "lr": 1e-2,
                                                                              "weight_decay": 0.0}], fused=kind == "fused")
            for kind, ws in weights.items()}
    assert opts["plain"].defaults["fused"] is None
    for _ in range(20):
        grads = [torch.randn_like(w) for w in start]
        for kind, ws in weights.items():
            for w, g in zip(ws, grads):
                w.grad = g.clone()
            opts[kind].step()
    for a, b, w0 in zip(weights["fused"], weights["plain"], start):
        assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, w0)


def test_adamw_on_sharded_parameters_is_fused_and_updates_as_plain_tensors(tmp_path):
    """FSDP2's parameters are DTensors: hmcl's AdamW takes the fused kernel for them as well, with
    the update of plain tensors (a one-process group; the 2-process FSDP runs of
    tests/test_distributed.py equal one process with it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    from hmcl_cli.training.trainer import adamw

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this torch has no fused AdamW for the CPU")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        start = torch.randn(8, 4)
        sharded = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(start.clone())
        opts = [adamw([{"params": [p], "lr": 1e-2, "weight_decay": 0.01}]) for p in (sharded, plain)]
        assert all(o.defaults["fused"] for o in opts)
        for _ in range(5):
            g = torch.randn(8, 4)
            sharded.grad, plain.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]), g.clone()
            for o in opts:
                o.step()
        assert torch.allclose(sharded.full_tensor(), plain, atol=1e-6) and not torch.allclose(plain, start)
    finally:
        dist.destroy_process_group()


def test_progress_line_of_a_log_step_shows_that_steps_loss(tmp_path, tiny_bert, capsys):
    """In logs (no terminal) the progress line printed at a log step carries the loss logged at that
    step in metrics.jsonl, not the previous interval's."""
    import json
    import re

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 10, "log_steps": 5, "eval_steps": 100, "save_steps": 100})
    capsys.readouterr()
    t.train()
    out = capsys.readouterr().out
    logged = {r["step"]: r["loss"] for r in map(json.loads, (t.run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    shown = {int(m[1]): (float(m[2]), int(m[3]))
             for m in re.finditer(r"train: (\d+)/10 steps \(.*?\) loss ([\d.]+) \(step (\d+)\)", out)}
    assert 5 in shown and logged[5] != logged[10]
    assert shown[5] == (pytest.approx(logged[5], abs=1e-4), 5)
    assert shown[6] == (pytest.approx(logged[5], abs=1e-4), 5)  # between log steps: the last one's, saying so
    last = re.search(r"train: 10 steps in [\d.]+s loss ([\d.]+) \(step 10\)", out)
    assert float(last[1]) == pytest.approx(logged[10], abs=1e-4)


def test_start_line_says_how_many_candidates_the_data_fills(tmp_path, tiny_bert, capsys):
    """The sample's anchors each have 1 positive, 2 weak and 3 negatives: groups of 8 hold 6."""
    import numpy as np

    from hmcl_cli.training.batching import Anchor, AnchorTable, group_fill, sample_group

    anchors = [Anchor(0, [(1, None), (2, None)], [], []), Anchor(1, [], [(3, None)], [(4, None), (5, None)]),
               Anchor(2, [(6, None)], [(7, None)] * 5, [(8, None)] * 5)]
    rng = np.random.default_rng(0)
    for size in (1, 3, 8):  # what sample_group takes, counted
        assert group_fill(AnchorTable.of(anchors), size) == pytest.approx(  # (counted from the table's arrays)
            np.mean([len(sample_group(a, size, rng)) for a in anchors]))
    capsys.readouterr()
    t = _trainer(tmp_path, tiny_bert, train={"group_size": 8})
    out = " ".join(capsys.readouterr().out.split())
    assert group_fill(t.data.anchors, 8) == 6.0
    assert "up to 64 (8 anchors x 8 candidates x 1 process(es)); the data fills 6.0 of the 8 per anchor on average, so about 48" in out
    capsys.readouterr()
    _trainer(tmp_path / "full", tiny_bert)  # groups of 3: filled, nothing more said
    assert "the data fills" not in capsys.readouterr().out
    t = _trainer(tmp_path / "few", tiny_bert, train={"batch_size": 512})  # fewer anchors than a batch holds
    n = len(t.data.anchors)
    assert n < 512 and (f"up to {n * 3} ({n} anchors x 3 candidates x 1 process(es); the data has only {n} anchors)"
                        in " ".join(capsys.readouterr().out.split()))


def test_matryoshka_training_logs_its_term_and_saves_its_sizes(tmp_path, tiny_bert):
    import json

    from hmcl_cli.modeling.encoder import saved_matryoshka_dims

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, loss={"matryoshka_dims": [16, 8]},
                                      train={"max_steps": 2, "log_steps": 1, "eval_steps": 2}))
    prepare(recipe, progress=False)
    final = run_train(recipe)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["matryoshka"] > 0 and r["loss"] > r["matryoshka"] for r in steps)
    assert saved_matryoshka_dims(final) == [16, 8]
    from hmcl_cli.errors import RecipeError

    recipe = load_recipe(write_recipe(tmp_path / "wide", tiny_bert, loss={"matryoshka_dims": [4096]}))
    prepare(recipe, progress=False)
    with pytest.raises(RecipeError, match="smaller than the embedding size"):
        run_train(recipe)


def test_eval_at_start_records_step_0_and_leaves_training_as_it_was(tmp_path, tiny_bert, capsys):
    """train.eval_at_start: step 0 in metrics.jsonl and the log (the model as loaded), the end
    compares the best step with it; the losses and the final weights are those of a run without it."""
    import json

    runs = {}
    for on in (True, False):
        t = _trainer(tmp_path / str(on), tiny_bert, train={"max_steps": 4, "log_steps": 1, "eval_steps": 2,
                                                            "eval_at_start": on})
        t.train()
        final = t.save_final()
        records = [json.loads(line) for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[on] = ([r["loss"] for r in records if "loss" in r], [r["step"] for r in records if "dev_ndcg@10" in r],
                    {k: v.clone() for k, v in t.model.state_dict().items()}, t, final)
    out = capsys.readouterr()
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][2][k], runs[False][2][k]) for k in runs[True][2])
    assert runs[True][1] == [0, 2, 4] and runs[False][1] == [2, 4]
    t = runs[True][3]
    assert "eval step 0 (before training): dev_ndcg@10" in out.out
    assert t.start_metric is not None and t.best_step in (2, 4)  # step 0 is not a candidate
    assert f"({t.start_metric:.4f} before training, {t.best_metric - t.start_metric:+.4f})" in out.out


def test_a_run_that_does_not_beat_its_start_is_warned_about(tmp_path, tiny_bert, capsys):
    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2, "learning_rate": 1e-12,
                                             "head_learning_rate": 1e-12})
    t.train()
    t.save_final()
    err = capsys.readouterr().err
    assert "training did not improve dev dev_ndcg@10" in " ".join(err.split())


def test_a_final_model_that_is_the_last_step_says_why(tmp_path, tiny_bert, capsys):
    """Without a dev split (or with load_best_at_end off) `model/` holds the last step; the log said
    only `final model -> runs/x/model`, as if a best step had been chosen."""
    t = _trainer(tmp_path / "nodev", tiny_bert, train={"max_steps": 2},
                 data={"sources": [{"path": "train.jsonl", "split": "train"}]})
    t.train()
    t.save_final()
    assert "final model: the last step's (2; no dev split to choose a step by)" in capsys.readouterr().out
    t = _trainer(tmp_path / "off", tiny_bert, train={"max_steps": 2, "load_best_at_end": False})
    t.train()
    t.save_final()
    assert "final model: the last step's (2; train.load_best_at_end is off)" in capsys.readouterr().out


def test_a_dev_set_at_its_maximum_before_training_is_named_as_the_cause(tmp_path, tiny_bert, capsys):
    """A dev set whose queries each find their positive first already before training (here one
    query, one candidate) cannot show a gain: the warning says that, not "lower the learning rate"."""
    import json

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "easy.jsonl").write_text(json.dumps({"query": "a question", "pos": ["its answer"]}) + "\n")
    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2},
                 data={"sources": [{"path": "train.jsonl", "split": "train"}, {"path": "easy.jsonl", "split": "dev"}]})
    t.train()
    t.save_final()
    err = " ".join(capsys.readouterr().err.split())
    assert t.start_metric == 1.0
    assert "dev dev_ndcg@10 was already 1.0000 before training, its maximum: this dev set cannot show a gain" in err
    assert "training did not improve" not in err


@pytest.mark.parametrize("segments", [None, {"length": 24}])
def test_training_with_the_prompt_left_out_of_the_pooling(tmp_path, tiny_bert, segments):
    """model.include_prompt false: every row of a step carries its prompt's length (a per-example
    prompt its own), the loss is each text's encode() embedding's, and one forward call and
    GradCache give the plain step's loss and gradients."""
    import json

    from hmcl_cli.training.batching import StepBatches

    model = {"include_prompt": False, "query_prompt": "query: ", "doc_prompt": "passage: ",
             **({"segments": segments} if segments else {})}
    t = make_trainer(tmp_path, tiny_bert, model=model, train={"batch_size": 6, "max_steps": 2})
    train = t.run_dir / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["prompt"] = "Represent this customer question: "  # a per-example prompt of its own
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = HMCLTrainer(t.recipe)
    t.setup()
    skip = {p: t.model.prompt_skip("query", p) for p in ("query: ", "Represent this customer question: ")}
    assert skip["query: "] == len(t.model.tokenizer("query: ")["input_ids"]) - 1 < skip["Represent this customer question: "]
    assert sorted(set(t.data.query_skip.tolist())) == sorted(skip.values())
    batch = StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0]
    assert set(batch["q_pool_skip"].tolist()) <= set(skip.values())
    assert batch["c_pool_skip"].tolist() == [t.model.prompt_skip("doc")] * batch["c_input_ids"].size(0)
    out = {}
    for mode in ("plain", "one", "chunks"):
        t.cfg.one_forward, t.cfg.grad_cache_chunk = mode == "one", (3 if mode == "chunks" else None)
        loss, _ = t._forward_backward(batch, 1.0)
        out[mode] = (loss.detach(), _grads(t))
        t.optimizer.zero_grad(set_to_none=True)
    for mode in ("one", "chunks"):
        assert torch.allclose(out["plain"][0], out[mode][0], atol=1e-5)
        assert_grads_close(out["plain"][1], out[mode][1])
    # without the skips (the prompt pooled too) the loss is another
    plain_batch = {k: v for k, v in batch.items() if not k.endswith("pool_skip")}
    t.cfg.one_forward, t.cfg.grad_cache_chunk = False, None
    loss, _ = t._forward_backward(plain_batch, 1.0)
    assert not torch.allclose(loss.detach(), out["plain"][0], atol=1e-4)


def test_resuming_a_finished_run_keeps_its_best_model(tmp_path, tiny_bert, monkeypatch):
    """`--resume` on a run that already finished (a CI job re-run after a later stage failed) kept
    the last step's weights as the final model, replacing the best one; it keeps the best now,
    and a longer resumed run replaces it only with a better step. <run>/final.json says which."""
    import json

    from safetensors.torch import load_file

    scores = iter([0.5, 0.9, 0.6, 0.4])  # before training, steps 2 (best), 4, 6
    monkeypatch.setattr(HMCLTrainer, "evaluate", lambda self: {"dev_ndcg@10": next(scores)})
    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 6, "eval_steps": 2, "save_steps": 2})
    t.train()
    final = t.save_final()
    best = load_file(str(final / "model.safetensors"))
    assert json.loads((t.run_dir / "final.json").read_text())["step"] == 2

    def weights():
        return load_file(str(t.run_dir / "model" / "model.safetensors"))

    again = HMCLTrainer(t.recipe)
    again.setup(resume=True)
    again.train()
    again.save_final()
    assert all(torch.equal(best[k], v) for k, v in weights().items())  # before: step 6's weights
    # resumed with more steps: a better step 8 replaces it, a worse one would not
    scores = iter([0.95])
    longer = HMCLTrainer(load_recipe_with(t.recipe, "train.max_steps=8"))
    longer.setup(resume=True)
    longer.train()
    longer.save_final()
    assert json.loads((t.run_dir / "final.json").read_text())["step"] == 8
    assert not all(torch.equal(best[k], v) for k, v in weights().items())


def load_recipe_with(recipe, *overrides):
    from hmcl_cli.recipe import load_recipe

    return load_recipe(recipe._source, list(overrides))


def test_a_training_that_does_not_resume_starts_from_nothing(tmp_path, tiny_bert, capsys):
    """Before, a second `hmcl train` (no --resume) in the same run directory left the first one's
    checkpoints there; keep_last pruned the new ones by name (step-0000002 < step-0000008) and a
    later --resume continued the first training. Now its checkpoints and best model go, and its
    metrics.jsonl is kept as metrics.previous.jsonl."""
    import json

    first = _trainer(tmp_path, tiny_bert, train={"max_steps": 8, "save_steps": 4, "eval_steps": 4})
    first.train()
    first.save_final()
    assert sorted(p.name for p in first.ckpt_dir.iterdir()) == ["step-0000004", "step-0000008"]
    second = HMCLTrainer(load_recipe_with(first.recipe, "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2"))
    second.setup()
    assert "removed the checkpoints of an earlier training here (step-0000004, step-0000008)" in capsys.readouterr().out
    second.train()
    assert sorted(p.name for p in second.ckpt_dir.iterdir()) == ["step-0000002", "step-0000004"]
    steps = [json.loads(line)["step"] for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and steps.count(4) >= 1 and 8 not in steps
    assert 8 in [json.loads(line)["step"] for line in (second.run_dir / "metrics.previous.jsonl").read_text().splitlines()]
    third = HMCLTrainer(second.recipe)
    third.setup(resume=True)
    assert third.step == 4  # this training's last checkpoint, not the first one's step 8
    before = (second.run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    third.train()  # resumed at its end: says so, and neither trains nor evaluates again
    out = capsys.readouterr().out
    assert "train: finished before (4 of 4 steps in the checkpoint); nothing to train" in out
    assert "train: 4 steps in" not in out and (second.run_dir / "metrics.jsonl").read_text() == before


def test_resume_refuses_a_checkpoint_trained_on_other_data(tmp_path, tiny_bert):
    from hmcl_cli.errors import DataError

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 4, "save_steps": 2})
    t.train()
    train = t.run_dir / "data" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(True)[:-1]))  # prepared (or mined) again since
    again = HMCLTrainer(t.recipe)
    with pytest.raises(DataError, match="checkpoint step-0000004 was trained on other data"):
        again.setup(resume=True)


def test_an_interrupted_run_says_to_resume_the_run(tmp_path, tiny_bert, capsys, monkeypatch):
    """Stopped in training under `hmcl run`, the hint names `hmcl run --resume` (which keeps the
    prepared data), not `hmcl train`."""
    from conftest import write_recipe
    from test_bad_inputs import cli

    from hmcl_cli.errors import InterruptedRun
    from hmcl_cli.training import trainer

    def stopped(self):
        raise InterruptedRun("training stopped by signal 2 at step 1; checkpoint saved",
                             hint="continue with `hmcl train RECIPE --resume` (with the same --set options)")

    monkeypatch.setattr(trainer.HMCLTrainer, "train", stopped)
    code, out, err = cli(capsys, monkeypatch, "run", write_recipe(tmp_path, tiny_bert))
    flat = " ".join(err.split())
    assert code == 130 and "continue with `hmcl run RECIPE --resume` (with the same --set options)" in flat, err
    assert "hmcl train RECIPE" not in flat


def test_run_resume_does_not_prepare_or_mine_again(tmp_path, tiny_bert, capsys, monkeypatch):
    """`hmcl run --resume` (a CI job re-run after a crash) goes on from where the run stopped: the
    data it prepared and mined stays as it was, so its checkpoints' data check holds (mining again
    where encoding is not bit-exact need not give the same bytes)."""
    from conftest import write_recipe
    from test_bad_inputs import cli

    recipe = write_recipe(tmp_path, tiny_bert, mine={"enabled": True, "range_min": 0, "num_negatives": 1},
                          train={"max_steps": 4, "save_steps": 2, "eval_steps": 2})
    code, out, err = cli(capsys, monkeypatch, "run", recipe)
    assert code == 0, err
    train = tmp_path / "run" / "data" / "train.jsonl"
    mined = train.read_text()
    code, out, err = cli(capsys, monkeypatch, "run", recipe, "--resume")
    assert code == 0, err
    assert "resume: prepare finished before" in out and "resume: mine finished before" in out
    assert "resumed from" in out and train.read_text() == mined


def test_metric_for_best_auto_is_spearman_on_scored_dev_data_and_ndcg_otherwise(tmp_path, tiny_bert, capsys):
    """A recipe of STS pairs left `train.metric_for_best` at nDCG@10 and kept the step that
    retrieved best, not the one that scored the pairs' similarity best (German STS-B: the final
    model's Spearman 0.7465 where a later step reached 0.7510). `auto` picks Spearman where the dev
    data are sts pairs, and says so; other data keep nDCG@10, scored ones too (a retrieval set's
    relevance grades are scores: the first version of `auto` chose Spearman for BEIR qrels)."""
    from conftest import STS_ROWS

    t = _trainer(tmp_path / "graded", tiny_bert)
    assert t.best_key == "dev_ndcg@10"
    assert "metric_for_best auto: dev_ndcg@10 (the dev data are not sts pairs)" in capsys.readouterr().out
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "pairs.csv").write_text("".join(f"{a},{b},{s}\n" for a, b, s in STS_ROWS))
    source = {"path": "pairs.csv", "format": "sts", "score_range": [0, 5]}
    t = _trainer(sts, tiny_bert, data={"sources": [{**source, "split": "train"}, {**source, "split": "dev"}]},
                 eval={"tasks": [{"name": "dev", "type": "sts", "path": "pairs.csv"}]},
                 train={"max_steps": 2, "eval_steps": 2, "save_steps": 2})
    assert t.best_key == "dev_spearman"
    assert "metric_for_best auto: dev_spearman (the dev data are sts pairs, graded by their scores)" in \
        capsys.readouterr().out
    t.train()
    t.save_final()
    assert json.loads((t.run_dir / "final.json").read_text())["metric"] == "dev_spearman"
    # relevance grades as scores on every pair (qrels, or graded rows with scores): still ranking data
    scored = tmp_path / "scored"
    scored.mkdir()
    rows = [{"query": a, "pos": [b], "neg": [c], "pos_scores": [1], "neg_scores": [0]}
            for (a, b, _), (_, c, _) in zip(STS_ROWS, STS_ROWS[1:] + STS_ROWS[:1])]
    (scored / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = _trainer(scored, tiny_bert, data={"sources": [{"path": "rows.jsonl", "split": s} for s in ("train", "dev")]})
    assert t.best_key == "dev_ndcg@10"
    # a metric named in the recipe is kept as it is
    t = _trainer(tmp_path / "named", tiny_bert, data={"sources": [{**source, "path": str(sts / "pairs.csv"), "split": s}
                                                                   for s in ("train", "dev")]},
                 train={"metric_for_best": "dev_mrr@10"})
    assert t.best_key == "dev_mrr@10"


def test_the_model_card_shows_the_eval_and_recipe_of_the_model_it_ships(tmp_path, tiny_bert, capsys):
    """`hmcl train` again (another --set), then `hmcl export` without `hmcl eval`: the card showed
    the earlier model's scores (0.7465, for a model whose dev Spearman was 0.7111) and the export call's
    recipe as "what it was trained with". The card now takes eval/results.json only where it scored
    the model folder as it is, and the recipe the model was trained with (kept in the folder). Its
    data table counted stats.json, written before `hmcl mine` added candidates; it counts the
    prepared files as training read them."""
    from hmcl_cli.stages import run_eval, run_export

    path = write_recipe(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
                        eval={"include_base": False})
    recipe = load_recipe(path)
    prepare(recipe, progress=False)
    run_train(recipe)
    run_eval(recipe)
    run_export(recipe, formats=["merged"])
    card = recipe.run_dir / "export" / "merged" / "README.md"
    assert "## Evaluation" in card.read_text() and "max_steps: 2" in card.read_text()
    capsys.readouterr()
    run_train(load_recipe(path, overrides=["train.max_steps=3"]))
    run_export(recipe, formats=["merged"])  # (this call's recipe says 2 steps)
    text = card.read_text()
    assert "## Evaluation" not in text and "max_steps: 3" in text and "max_steps: 2" not in text
    assert "the model card leaves out" in capsys.readouterr().err
    run_eval(recipe)
    run_export(recipe, formats=["merged"])
    assert "## Evaluation" in card.read_text()
    # the model folder copied without its file times (a CI job's downloaded artifact): the same model
    for f in (recipe.run_dir / "model").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes())
            os.utime(f, ns=(10**18, 10**18))
    capsys.readouterr()
    run_export(recipe, formats=["merged"])
    assert "## Evaluation" in card.read_text() and "the model card leaves out" not in capsys.readouterr().err
    # the training data table counts what training read: mined candidates too (stats.json is before mining)
    data = recipe.run_dir / "data"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    (data / "train.unmined.jsonl").write_text((data / "train.jsonl").read_text())
    for row in rows:
        row["neg"] = row["neg"] + [f"a mined negative for {row['query']}"]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = json.loads((data / "stats.json").read_text())["splits"]["train"]
    run_export(recipe, formats=["merged"])
    text = card.read_text()
    neg = sum(len(r["neg"]) for r in rows)
    assert neg == stats["neg"] + len(rows)
    assert f"| train | {len(rows)} | {stats['pos']} | {stats['weak']} | {neg} |" in text
    assert "includes the hard negatives and weak-positives `hmcl mine` added" in text


@pytest.mark.parametrize("minutes,steps", [(None, [8]), (0.75, [4, 8]), (0.5, [2, 4, 6, 8])])
def test_save_minutes_checkpoints_by_time_between_save_steps(tmp_path, tiny_bert, monkeypatch, minutes, steps):
    """train.save_minutes: a checkpoint at the first log step that far past the last one (a clock
    that moves 20 s a step; log steps 2, 4, 6, 8; save_steps past the end), counted from the last
    checkpoint (45 s: at step 4, not again at step 6)."""
    from hmcl_cli.training import trainer as trainer_module

    t = _trainer(tmp_path, tiny_bert, train={"max_steps": 8, "log_steps": 2, "save_steps": 100, "eval_steps": 100,
                                             "keep_last": 10, "save_minutes": minutes})
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: t.step * 20.0)
    t.train()
    assert sorted(int(p.name[5:]) for p in (t.run_dir / "checkpoints").glob("step-*")) == steps


def test_the_anchor_table_gives_back_each_anchor_as_built():
    """TrainData keeps its anchors as arrays (AnchorTable): each reads back as the Anchor it was,
    its candidates per level in their order, a score or None, its source; and what the trainer
    counts from the arrays (positives, sizes, unscored pairs, batches per source) is what the
    anchors say."""
    from hmcl_cli.training.batching import Anchor, AnchorTable, BatchPlan, with_positive

    anchors = [Anchor(3, [(10, 4.5), (11, None)], [(12, 2.25)], [(13, None), (14, 0.0)], 1),
               Anchor(0, [], [], [(13, 1.0)], 0), Anchor(7, [], [(2, None)], [], 2), Anchor(2, [(0, 3)], [], [], 0)]
    table = AnchorTable.of(anchors)
    assert len(table) == 4 and list(table) == anchors and table[-1] == anchors[-1]
    assert table[3].pos == [(0, 3.0)]  # (an int score reads back as a float)
    with pytest.raises(IndexError):
        table[4]
    assert with_positive(table) == 2
    assert [a.tolist() for a in table.sizes()] == [[2, 0, 0, 1], [1, 0, 1, 0], [2, 1, 0, 0]]
    # (pairs, unscored, unscored of anchors whose every positive is scored): the first anchor's
    # second positive has no score, so its 2 unscored pairs are not left out
    assert table.unscored_counts() == (8, 3, 0)
    scored_positive = Anchor(5, [(1, 1.0)], [(2, None)], [(3, None)], 0)  # its 2 unscored pairs: left out
    assert AnchorTable.of(anchors + [scored_positive]).unscored_counts() == (11, 5, 2)
    assert AnchorTable.of([]).unscored_counts() == (0, 0, 0)

    class Data:  # what BatchPlan reads of TrainData
        def __init__(self, anchors):
            self.anchors = anchors

        def anchor_length(self, i):
            return 5

    plan = BatchPlan(Data(table), 2, 0)  # a group per source, in the order met
    assert plan.groups == [[0], [1, 3], [2]] and plan.drawn == [[], [], []]
    # anchors with a positive twice; source 1 twice over; half of source 2's drawn each epoch
    plan = BatchPlan(Data(table), 2, 0, positive_repeats=2, source_weights=[1.0, 2.0, 0.5])
    assert plan.groups == [[0, 0, 0, 0], [1, 3, 3], []] and plan.drawn == [[], [], [([2], 0, 1)]]
