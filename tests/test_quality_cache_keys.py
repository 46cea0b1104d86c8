"""benchmarks/quality.py keys each cached hmcl run by the settings it trains with (what they change
from the cache's baseline), so a default that changes re-keys exactly the runs it changes."""

import argparse
import importlib.util

import pytest

from conftest import ROOT, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    base = dict(steps=160, batch_size=64, group_size=4, lr=2e-5, max_length=64, hmcl_set=[], grid=None,
                grid_rows="hmcl", st_negatives=1)
    return argparse.Namespace(**{**base, **kw})


def _changes(quality, row, sets, baseline=None):
    args = _args()
    baseline = quality.trained_with("hmcl-mined", [], args) if baseline is None else baseline
    return quality.setting_changes(quality.trained_with(row, sets, args), baseline)


def test_an_override_naming_the_default_keys_as_the_default(quality):
    from hmcl_cli.recipe import LossConfig, MineConfig

    weight = LossConfig().contrastive_weight
    assert _changes(quality, "hmcl-mined", []) == {}
    assert _changes(quality, "hmcl-mined", [f"loss.contrastive_weight={weight}",
                                            f"mine.scores={MineConfig().scores}"]) == {}
    # auto resolves to its number on this data: 2 (fewer than half of the anchors have a positive)
    assert quality.trained_with("hmcl", ["train.positive_repeats=auto"], _args())["train.positive_repeats"] == 2
    assert _changes(quality, "hmcl", ["train.positive_repeats=auto"]) == _changes(quality, "hmcl", ["train.positive_repeats=2"])
    assert _changes(quality, "hmcl", [f"loss.contrastive_weight={weight / 2}"]) == {"loss.contrastive_weight": weight / 2}


def test_a_changed_default_rekeys_only_the_runs_it_changes(quality):
    from hmcl_cli.recipe import LossConfig, MineConfig

    weight, scores = LossConfig().contrastive_weight, MineConfig().scores
    old_weight, old_scores = weight / 2, "cosine" if scores != "cosine" else "none"
    args = _args()
    # the baseline of a cache started when the defaults were old_weight and old_scores
    old = dict(quality.trained_with("hmcl-mined", [], args),
               **{"loss.contrastive_weight": old_weight, "mine.scores": old_scores})
    # every hmcl row trains with the new weight; only the mined row mines
    assert _changes(quality, "hmcl", [], old) == {"loss.contrastive_weight": weight}
    assert _changes(quality, "hmcl-mined", [], old) == {"loss.contrastive_weight": weight, "mine.scores": scores}
    # a run made under the old defaults is found by naming them
    assert _changes(quality, "hmcl-mined", [f"loss.contrastive_weight={old_weight}", f"mine.scores={old_scores}"],
                    old) == {}


def test_settings_that_cannot_change_a_run_are_not_keyed(quality):
    # mining settings do not touch a row that does not mine
    assert _changes(quality, "hmcl", ["mine.num_negatives=7"]) == {}
    assert _changes(quality, "hmcl-mined", ["mine.num_negatives=7"]) == {"mine.num_negatives": 7}
    # ranking_pairs acts only on pairs without a score: here, candidates mined with scores none
    assert _changes(quality, "hmcl", ["loss.ranking_pairs=all"]) == {}
    assert _changes(quality, "hmcl-mined", ["loss.ranking_pairs=all", "mine.scores=cosine"]) == {"mine.scores": "cosine"}
    assert _changes(quality, "hmcl-mined", ["loss.ranking_pairs=all"]) == {"loss.ranking_pairs": "all"}
    # logging and checkpoint cadence
    assert _changes(quality, "hmcl", ["train.log_steps=3"]) == {}
    # quality.py's own arguments are keyed through its setting, an override of one here
    assert _changes(quality, "hmcl", ["train.max_steps=160"]) == {}  # the steps it was given
    assert _changes(quality, "hmcl", ["train.max_steps=7", "train.learning_rate=1e-4"]) == {
        "train.max_steps": 7, "train.learning_rate": 1e-4}


def test_an_option_the_baseline_lacks_is_keyed_unless_neutral(quality, monkeypatch):
    args = _args()
    baseline = quality.trained_with("hmcl-mined", [], args)
    del baseline["loss.symmetric"]  # as if the option came after the cache was started
    assert _changes(quality, "hmcl", [], baseline) == {"loss.symmetric": False}
    monkeypatch.setitem(quality.NEUTRAL, "loss.symmetric", False)
    assert _changes(quality, "hmcl", [], baseline) == {}
    assert _changes(quality, "hmcl", ["loss.symmetric=true"], baseline) == {"loss.symmetric": True}


def test_job_keys(quality):
    common = {"steps": 160, "device": "cpu"}
    args = _args(hmcl_set=["loss.contrastive_weight=4"])
    baseline = quality.trained_with("hmcl-mined", [], args)
    jobs = quality.job_list(args, ["hmcl", "st-cosent-mnrl"], [1], common, baseline)
    plain = quality.job_list(_args(), ["hmcl", "st-cosent-mnrl"], [1], common, baseline)
    same = quality.job_list(_args(hmcl_set=["loss.contrastive_weight=4.0"]), ["hmcl"], [1], common, baseline)
    assert jobs[0]["key"] != plain[0]["key"] and jobs[0]["key"] == same[0]["key"]
    assert jobs[1]["key"] == plain[1]["key"]  # --hmcl-set does not touch the sentence-transformers rows
    assert jobs[0]["setting"]["changes"] == {"loss.contrastive_weight": 4.0}


def test_an_option_added_after_the_baseline_keys_only_where_it_changes_training(quality, monkeypatch):
    """train.one_forward and model.cudnn_attention came after the committed caches: on a CPU
    (two calls; no cuDNN kernels) their defaults find the old runs; one call, or the defaults on
    a GPU (sides joined, cuDNN attention off), are new keys."""
    args = _args()
    added = ("train.one_forward", "model.cudnn_attention")
    old = {k: v for k, v in quality.trained_with("hmcl-mined", [], args).items() if k not in added}
    monkeypatch.setattr(quality.torch.cuda, "is_available", lambda: False)
    assert quality.trained_with("hmcl-mined", [], args)["train.one_forward"] is False
    assert _changes(quality, "hmcl-mined", [], old) == {}
    assert _changes(quality, "hmcl-mined", ["train.one_forward=true"], old) == {"train.one_forward": True}
    monkeypatch.setattr(quality.torch.cuda, "is_available", lambda: True)
    assert _changes(quality, "hmcl-mined", [], old) == {"train.one_forward": "auto", "model.cudnn_attention": False}


@pytest.mark.parametrize("cache", ["quality-cpu-160.json", "quality-cpu-641.json"])
@pytest.mark.parametrize("row", ["hmcl", "hmcl-mined"])
def test_options_added_after_a_committed_cache_key_as_no_change_on_a_cpu(quality, monkeypatch, cache, row):
    """A recipe option the cache's baseline lacks must not count as a change on the CPU where its
    runs were made (else every cached hmcl run is orphaned and RESULTS' tables stop printing):
    register it in NEUTRAL with the value that trains as before, resolved as training resolves it.
    Defaults changed since (keys the baseline has) may show; new keys may not."""
    import json

    monkeypatch.setattr(quality.torch.cuda, "is_available", lambda: False)
    baseline = json.loads((ROOT / "benchmarks" / "results" / cache).read_text())[quality.BASELINE_KEY]
    changes = quality.setting_changes(quality.trained_with(row, [], _args()), baseline)
    assert not set(changes) - set(baseline), changes
