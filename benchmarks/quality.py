"""Quality: HMCL and its ablations vs the strongest sentence-transformers recipes, same data.

    python benchmarks/quality.py --seeds 1,2,3                       # the full table (GPU)
    python benchmarks/quality.py --seeds 1 --max-steps 60 --rows hmcl,st-cosent-mnrl   # CPU smoke

Data (../shared/data), identical for every row: STS-B train + SICK train (10,249 pairs). Levels:
STS-B score >= 4 positive, 2-4 weak-positive, < 2 negative; SICK by its NLI label (entailment
positive, neutral weak, contradiction negative). Scores: STS-B 0-5 and SICK relatedness 1-5,
divided by 5, for the score-based losses.

Rows (all start from all-MiniLM-L6-v2; same steps, batch size, learning rate, warm-up, seeds
and precision — bf16 autocast on GPU, fp32 on CPU; the final model is evaluated, no
checkpoint selection):

* ``hmcl`` — the full HMCL objective with the recipe defaults (``--hmcl-set`` overrides);
* ablations: ``hmcl-contrastive`` (classification and ranking off), ``hmcl-no-weak`` (weak
  pairs relabelled negative), ``hmcl-no-classification``, ``hmcl-no-ranking``;
* ``hmcl-mined``: the ``hmcl`` row after ``hmcl mine`` added three hard negatives (its default)
  per anchor that has a positive, with the ranks of ``st-cosent-mnrl-hn`` (10-50, relative margin
  0.05, the top picks); ``--hmcl-set mine.KEY=V`` overrides one of those
  (``mine.num_negatives=1`` for that row's count, ``--st-negatives 3`` for the reverse);
* sentence-transformers' trainer: ``st-cosent`` and ``st-angle`` (on the scores), ``st-mnrl``
  (on the positive pairs, no-duplicates batches), ``st-cosent-mnrl`` (round-robin of the two),
  ``st-cosent-mnrl-hn`` (the MNRL half gets one hard negative per pair from
  ``mine_hard_negatives``: ranks 10-50, relative margin 0.05; ``--st-negatives`` more).

Every model is scored with hmcl's evaluation (through mteb): STS-B dev and SICK trial
(Spearman on relatedness), TrecQA dev (MAP); STS-B de/zh dev too when ``--multilingual-model``
is given. Results are cached per (row, seed, settings) in ``--cache`` so the table can be built
over several runs (the GPU allows 10 minutes per call); mean and std over seeds are printed as
a Markdown table. An hmcl row's key holds the settings it trains with that differ from the
cache's baseline (the defaults when the cache was started), so a run cached before a default
changed still stands for what it trained and an override naming today's default finds the
default's runs; ``--table-only --all-cached`` lists every cached run by those differences.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

HMCL_ROWS = {
    "hmcl": {},
    "hmcl-contrastive": {"loss.classification_weight": 0.0, "loss.ranking_weight": 0.0},
    "hmcl-no-weak": {"_weak_as_negative": True},
    "hmcl-no-classification": {"loss.classification_weight": 0.0},
    "hmcl-no-ranking": {"loss.ranking_weight": 0.0},
    "hmcl-mined": {"_mine": True},
}
# hard negatives hmcl-mined mines per anchor with a positive (hmcl mine's default; until
# 2026-12-03 it mined 1, and those cached rows say so in their key)
MINED_NEGATIVES = 3
ST_ROWS = ["st-cosent", "st-angle", "st-mnrl", "st-cosent-mnrl", "st-cosent-mnrl-hn"]
TASKS = ["stsb-dev", "sick-trial", "trecqa-dev"]


# ----------------------------------------------------------------------------- data
def raw_pairs() -> list[tuple[str, str, float, str]]:
    """(sentence1, sentence2, score 0-1, level) for STS-B train + SICK train."""
    out = []
    with open(SHARED / "stsb" / "stsb-en-train.csv", encoding="utf-8", newline="") as f:
        for a, b, s in csv.reader(f):
            s = float(s)
            out.append((a, b, s / 5, "pos" if s >= 4 else "weak" if s >= 2 else "neg"))
    nli = {"ENTAILMENT": "pos", "NEUTRAL": "weak", "CONTRADICTION": "neg"}
    with open(SHARED / "sick" / "SICK_train.txt", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            out.append((r["sentence_A"], r["sentence_B"], float(r["relatedness_score"]) / 5,
                        nli[r["entailment_judgment"]]))
    return out


def graded_rows(pairs, weak_as_negative: bool) -> list[dict]:
    """hmcl's graded examples: each pair in both directions, merged per anchor sentence."""
    by_query: dict[str, dict] = {}
    for a, b, score, level in pairs:
        if weak_as_negative and level == "weak":
            level = "neg"
        for q, c in ((a, b), (b, a)):
            row = by_query.setdefault(q, {"query": q, "pos": [], "weak": [], "neg": [],
                                          "pos_scores": [], "weak_scores": [], "neg_scores": []})
            if c not in row["pos"] + row["weak"] + row["neg"] and c != q:
                row[level].append(c)
                row[f"{level}_scores"].append(score)
    return [r for r in by_query.values() if r["pos"] + r["weak"] + r["neg"]]


def eval_tasks() -> list:
    from hmcl_cli.recipe import EvalTask

    tasks = [
        EvalTask(name="stsb-dev", type="sts", path=str(SHARED / "stsb" / "stsb-en-dev.csv"), score_range=(0, 5)),
        EvalTask(name="sick-trial", type="sts", path=str(SHARED / "sick" / "SICK_trial.txt"), score_range=(1, 5),
                 columns={"query": "sentence_A", "candidate": "sentence_B", "score": "relatedness_score"}),
        EvalTask(name="trecqa-dev", type="reranking", format="answer_selection",
                 path=str(SHARED / "trecqa" / "trecqa-dev.csv")),
    ]
    return tasks


def evaluate_model(model_or_path, extra_multilingual: bool) -> dict:
    from hmcl_cli.evaluation.runner import evaluate
    from hmcl_cli.recipe import EvalTask

    tasks = eval_tasks()
    if extra_multilingual:
        for lang in ("de", "zh"):
            tasks.append(EvalTask(name=f"stsb-{lang}-dev", type="sts", score_range=(0, 5),
                                  path=str(SHARED / "stsb-multi" / f"stsb-{lang}-dev.csv")))
    report = evaluate({"m": model_or_path}, tasks, lambda p: Path(p), 256,
                      loader=lambda name, label=None: __import__("hmcl_cli.modeling.encoder", fromlist=["x"]).EmbeddingModel.load(name))
    out = {}
    for t in tasks:
        r = report["results"][t.name]["m"]
        if "error" in r:
            raise RuntimeError(f"{t.name}: {r['error']}")
        out[t.name] = r["map"] if t.type == "reranking" else r["spearman"]
    return out


# ----------------------------------------------------------------------------- trainers
def hmcl_recipe(row: str, seed: int, args, base: str, tmp: Path):
    """The recipe the hmcl row ``row`` trains with (``--hmcl-set`` in ``args.hmcl_set``); its
    training data goes to ``tmp / "train.jsonl"`` (written by ``train_hmcl``)."""
    from hmcl_cli.recipe import load_recipe

    settings = {k: v for k, v in HMCL_ROWS[row].items() if not k.startswith("_")}
    # the mined row mines like st-cosent-mnrl-hn (ranks 10-50, relative margin 0.05, the top
    # picks) but MINED_NEGATIVES per anchor with a positive; --hmcl-set comes later and wins
    like_st = [f"mine.num_negatives={MINED_NEGATIVES}", "mine.num_weak=0", "mine.range_min=10", "mine.range_max=50",
               "mine.relative_margin=0.05", "mine.sampling=top"] if HMCL_ROWS[row].get("_mine") else []
    overrides = [f"{k}={v}" for k, v in settings.items()] + like_st + list(args.hmcl_set)
    return load_recipe(data={
        "name": row, "seed": seed, "output_dir": str(tmp / "run"),
        "model": {"name_or_path": base, "max_length": args.max_length},
        "data": {"sources": [{"path": str(tmp / "train.jsonl"), "split": "train"}], "dev_fraction": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size,
                  "learning_rate": args.lr, "warmup_ratio": 0.1, "log_steps": max(1, args.steps // 10),
                  "save_steps": 10 ** 9, "eval_steps": 10 ** 9, "load_best_at_end": False},
        "export": {"formats": []}}, overrides=overrides)


def train_hmcl(row: str, seed: int, args, base: str, tmp: Path) -> Path:
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.training.trainer import HMCLTrainer

    weak_neg, mined = HMCL_ROWS[row].get("_weak_as_negative", False), HMCL_ROWS[row].get("_mine", False)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in graded_rows(raw_pairs(), weak_neg)))
    recipe = hmcl_recipe(row, seed, args, base, tmp)
    prepare(recipe, progress=False)
    if mined:
        from hmcl_cli.mining import mine

        mine(recipe)
    trainer = HMCLTrainer(recipe)
    trainer.setup()
    trainer.train()
    return trainer.save_final()


def train_st(row: str, seed: int, args, base: str, tmp: Path) -> Path:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import AnglELoss, CoSENTLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import (BatchSamplers, MultiDatasetBatchSamplers,
                                                                          SentenceTransformerTrainingArguments)

    torch.manual_seed(seed)
    model = SentenceTransformer(base)
    model.max_seq_length = args.max_length
    pairs = raw_pairs()
    scored = Dataset.from_dict({"sentence1": [a for a, _, _, _ in pairs], "sentence2": [b for _, b, _, _ in pairs],
                                "score": [s for _, _, s, _ in pairs]})
    positives = Dataset.from_dict({"anchor": [a for a, _, _, lvl in pairs if lvl == "pos"],
                                   "positive": [b for _, b, _, lvl in pairs if lvl == "pos"]})
    if row == "st-cosent-mnrl-hn":
        from sentence_transformers.util import mine_hard_negatives

        corpus = list(dict.fromkeys([a for a, _, _, _ in pairs] + [b for _, b, _, _ in pairs]))
        n = args.st_negatives  # more than one: (anchor, positive, negative_1..n) rows for MNRL
        positives = mine_hard_negatives(positives, model, corpus=corpus, range_min=10, range_max=50,
                                        relative_margin=0.05, num_negatives=n, sampling_strategy="top",
                                        batch_size=256, output_format="triplet" if n == 1 else "n-tuple",
                                        verbose=False)
    cosent, mnrl = CoSENTLoss(model), MultipleNegativesRankingLoss(model)
    train = {"st-cosent": scored, "st-angle": scored, "st-mnrl": positives}.get(row)
    loss = {"st-cosent": cosent, "st-angle": AnglELoss(model), "st-mnrl": mnrl}.get(row)
    if train is None:  # the round-robin rows
        train, loss = {"scores": scored, "positives": positives}, {"scores": cosent, "positives": mnrl}
    cuda = torch.cuda.is_available()
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "st"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_ratio=0.1, seed=seed, data_seed=seed, bf16=cuda, use_cpu=not cuda,
        batch_sampler=BatchSamplers.NO_DUPLICATES, multi_dataset_batch_sampler=MultiDatasetBatchSamplers.ROUND_ROBIN,
        save_strategy="no", report_to="none", logging_steps=max(1, args.steps // 10), disable_tqdm=True)
    SentenceTransformerTrainer(model=model, args=targs, train_dataset=train, loss=loss).train()
    model.save(str(tmp / "model"))
    return tmp / "model"


# ----------------------------------------------------------------------------- driver
def job_list(args, rows: list[str], seeds: list[int], common: dict, baseline: dict) -> list[dict]:
    """Every (row, seed, overrides) to run, with its cache key and table label."""
    variants = [[]] + [[o for o in v.split(",") if o] for v in (args.grid.split(";") if args.grid else [])]
    jobs = []
    for row in rows:
        for variant in (variants if row in args.grid_rows.split(",") else [[]]):
            sets = list(args.hmcl_set) + variant if row in HMCL_ROWS else []
            setting = dict(common)
            if row in HMCL_ROWS:
                setting["changes"] = setting_changes(trained_with(row, sets, args), baseline)
            label = row + (f" [{' '.join(sets)}]" if sets else "")
            if row == "st-cosent-mnrl-hn" and args.st_negatives != 1:  # (1: the key of earlier runs)
                setting["st_negatives"] = args.st_negatives
                label += f" [{args.st_negatives} negatives]"
            digest = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
            for seed in seeds:
                jobs.append({"row": row, "seed": seed, "sets": sets, "setting": setting, "label": label,
                             "key": f"{row}|{seed}|{digest}"})
    return jobs


# --------------------------------------------------------------- what a cached hmcl row stands for
# An hmcl row is cached under the settings it trains with that differ from the cache's baseline
# (BASELINE_KEY: every setting of the ``hmcl-mined`` row when the cache was started). A default
# that changes later re-keys exactly the rows whose training it changes, and an override that
# names a setting's current value keys as the default does.
BASELINE_KEY = "hmcl-baseline"
# what cannot change the trained model (quality.py's own arguments are keyed through ``common``)
NOT_KEYED = {"train.log_steps", "train.eval_steps", "train.save_steps", "train.save_minutes", "train.keep_last", "train.trackers",
             "data.sources",
             "train.eval_at_start",  # a dev evaluation before step 0 (tests/test_training.py: the same losses)
             "model.unpad",  # the same computation (tests/test_unpad.py: equal losses and gradients; dropout masks aside)
             "eval.cache_embeddings",  # the same embeddings, kept between calls (tests/test_eval.py)
             "model.encode_graphs",  # the same forward replayed (tests/test_encode_graphs.py: equal embeddings)
             "model.fused_norms",  # the same norms (tests/test_fused_norms.py: float32 bit-identical on a CPU)
             "model.fused_rotary",  # the same rotation (tests/test_fused_rotary.py: bit-identical, float32 and bf16)
             "model.fused_projections"}  # the same products (tests/test_fused_projections.py: equal to float32 rounding)
# options added after a cache's baseline was written, with the value that trains as before
NEUTRAL: dict = {"train.one_forward": False,  # one forward call per side, as every step did before
                 "model.cudnn_attention": True,  # SDPA's cuDNN kernels allowed, as before the option
                 "loss.matryoshka_dims": [], "loss.matryoshka_weights": None,  # no matryoshka sizes
                 "mine.encoding": "utf-8",  # mine.corpus files read as UTF-8, as before the option
                 "data.dev_max_queries": None,  # every drawn dev query kept, as before the option
                 "model.include_prompt": "auto"}  # the model's own pooling (MiniLM: prompt included), as before


def trained_with(row: str, sets: list[str], args) -> dict:
    """The settings of hmcl row ``row`` with overrides ``sets`` that shape its model, flat
    (``section.key``), resolved as training resolves them: ``train.positive_repeats: auto`` becomes
    its number on this data; ``train.one_forward: auto`` false on a CPU (where it never joins the
    sides); ``model.cudnn_attention`` as before the option on a CPU (no cuDNN kernels there); ``mine.*`` only for the mined row; ``loss.ranking_pairs`` only where some pair lacks a
    score (on this data: candidates mined with ``mine.scores: none``)."""
    from hmcl_cli.training.batching import resolve_positive_repeats
    from hmcl_cli.training.memory import one_forward_mode

    recipe = hmcl_recipe(row, 0, argparse.Namespace(**{**vars(args), "hmcl_set": sets}), "-", Path("-"))
    dump = recipe.model_dump(mode="json")
    mined = bool(HMCL_ROWS[row].get("_mine"))
    flat = {f"{section}.{k}": v for section in ("model", "data", "train", "loss", *(["mine"] if mined else []))
            for k, v in dump[section].items()}
    # quality.py's arguments are in ``common``: keyed here only where a --hmcl-set overrides them
    from_args = {"model.name_or_path": "-", "model.max_length": args.max_length, "train.max_steps": args.steps,
                 "train.batch_size": args.batch_size, "train.group_size": args.group_size,
                 "train.learning_rate": args.lr}
    flat = {k: v for k, v in flat.items() if k not in NOT_KEYED and from_args.get(k, object()) != v}
    flat["train.positive_repeats"] = resolve_positive_repeats(flat["train.positive_repeats"], _anchors())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if one_forward_mode(flat.get("train.one_forward"), device, sharded=False) == "never":
        flat["train.one_forward"] = False
    if device == "cpu":  # a CPU has no cuDNN attention: the option changes nothing there
        flat["model.cudnn_attention"] = True
    if not (mined and flat["mine.scores"] == "none"):
        del flat["loss.ranking_pairs"]
    return flat


@functools.lru_cache(maxsize=1)
def _anchors():
    """The training anchors, as far as ``resolve_positive_repeats`` looks at them (their
    positives: mining adds none, and relabelling weak pairs negative neither)."""
    from hmcl_cli.training.batching import AnchorTableBuilder

    build = AnchorTableBuilder()
    for r in graded_rows(raw_pairs(), False):
        build.add(0, [(0, None)] * len(r["pos"]), [], [])
    return build.table()


def setting_changes(settings: dict, baseline: dict) -> dict:
    """What ``settings`` (``trained_with``) changes from ``baseline``: a setting the baseline lacks
    counts unless it holds its NEUTRAL value."""
    missing = object()
    return {k: v for k, v in settings.items() if baseline.get(k, NEUTRAL.get(k, missing)) != v}


def expected_seconds(cache: dict, row: str, setting: dict) -> float:
    """How long a run of ``row`` with ``setting`` takes: the slowest timed run of that row with the
    same steps, batch and device, else of any row (0 when none is timed yet)."""
    same = ("steps", "batch_size", "group_size", "max_length", "device")
    timed = [r for k, r in cache.items() if not k.startswith("base") and "seconds" in r
             and all(r["setting"].get(f) == setting.get(f) for f in same)]
    return max((r["seconds"] for r in timed if r["row"] == row), default=max((r["seconds"] for r in timed), default=0.0))


def base_key(common: dict) -> str:
    return f"base|{common['model']}|{common['device']}"


def _save(cache: dict, path: Path) -> None:
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(cache, indent=1))
    tmp_path.replace(path)


def run_parallel(args, cache: dict, cache_path: Path) -> None:
    """Run the missing jobs in ``--jobs`` worker processes (one GPU is shared: a MiniLM run leaves
    most of it idle), each with its own cache file, then merge them."""
    import subprocess

    argv = sys.argv[1:]
    procs, shards = [], []
    for i in range(args.jobs):
        shard = cache_path.with_name(f"{cache_path.stem}.shard{i}.json")
        _save(cache, shard)
        shards.append(shard)
        cmd = [sys.executable, __file__, *argv, "--jobs", "1", "--shard", f"{i}/{args.jobs}", "--cache", str(shard),
               "--no-table"]
        procs.append(subprocess.Popen(cmd))
    try:
        codes = [p.wait() for p in procs]
    finally:  # on Ctrl-C or a time limit too: keep every run a worker finished
        for shard in shards:
            if shard.is_file():
                cache.update(json.loads(shard.read_text()))
                shard.unlink()
        _save(cache, cache_path)
    if any(codes):
        print(f"worker exit codes {codes}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join([*HMCL_ROWS, *ST_ROWS]))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=float, default=4.0, help="sets the steps: epochs x pairs / batch size")
    ap.add_argument("--max-steps", type=int, default=None, help="fixed step count instead of --epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=4, help="hmcl candidates per anchor")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--hmcl-set", action="append", default=[], help="recipe override for the hmcl rows")
    ap.add_argument("--grid", default=None,
                    help="extra variants of the --grid-rows rows: separated by ';', overrides in one variant by ','")
    ap.add_argument("--grid-rows", default="hmcl", help="the hmcl rows --grid varies (e.g. hmcl,hmcl-mined)")
    ap.add_argument("--st-negatives", type=int, default=1,
                    help="hard negatives per pair for st-cosent-mnrl-hn (the issue's anchor: 1)")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--multilingual-model", default=None, help="also score STS-B de/zh dev with this base")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "quality-cache.json"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run that would end past this many seconds (judged by the runs of the same "
                         "setting already timed, in this process or the cache)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes sharing the device")
    ap.add_argument("--keep-models", default=None,
                    help="copy each trained model into this folder (as ROW-sSEED-DIGEST) instead of discarding it")
    ap.add_argument("--table-only", action="store_true", help="print the table of what the cache holds; train nothing")
    ap.add_argument("--all-cached", action="store_true",
                    help="with --table-only: every cached run, labelled by what it changes from the cache's baseline")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from hmcl_cli.modeling.resolve import resolve_model

    base = str(resolve_model(args.model))
    n_pairs = len(raw_pairs())
    args.steps = args.max_steps or math.ceil(args.epochs * n_pairs / args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {k: getattr(args, k) for k in ("steps", "batch_size", "group_size", "lr", "max_length", "model")}
    common["device"] = device
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if BASELINE_KEY not in cache:
        cache[BASELINE_KEY] = trained_with("hmcl-mined", [], args)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    from hmcl_cli.errors import HmclError

    try:
        jobs = job_list(args, rows, seeds, common, cache[BASELINE_KEY])
    except HmclError as err:  # a bad --hmcl-set or --grid entry, before anything trains
        sys.exit(f"quality.py: {err}")
    start = time.time()
    if base_key(common) not in cache:  # the untrained model, scored on this device
        cache[base_key(common)] = {"scores": evaluate_model(base, False)}
        _save(cache, cache_path)
    if args.table_only:
        pass
    elif args.jobs > 1:
        run_parallel(args, cache, cache_path)
    else:
        mine = jobs
        if args.shard:
            i, n = (int(x) for x in args.shard.split("/"))
            mine = list({j["key"]: j for j in jobs if j["key"] not in cache}.values())[i::n]
        for job in mine:
            if job["key"] in cache:
                continue
            expect = expected_seconds(cache, job["row"], job["setting"])
            if args.budget_s and time.time() - start + expect > args.budget_s:
                print(f"budget: {job['label']} seed {job['seed']} would end past {args.budget_s:.0f} s "
                      f"(runs take ~{expect:.0f} s); rerun to continue", flush=True)
                break
            t0 = time.time()
            run_args = argparse.Namespace(**{**vars(args), "hmcl_set": job["sets"]})
            with tempfile.TemporaryDirectory() as tmp:
                trainer = train_hmcl if job["row"] in HMCL_ROWS else train_st
                path = trainer(job["row"], job["seed"], run_args, base, Path(tmp))
                scores = evaluate_model(str(path), False)
                if args.keep_models:
                    import shutil

                    keep = Path(args.keep_models) / f"{job['row']}-s{job['seed']}-{job['key'].rsplit('|', 1)[1]}"
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.copytree(path, keep)
            cache[job["key"]] = {"row": job["row"], "label": job["label"], "seed": job["seed"],
                                 "setting": job["setting"], "scores": scores, "seconds": round(time.time() - t0, 1)}
            _save(cache, cache_path)
            print(f"{job['label']} seed {job['seed']}: {scores} ({cache[job['key']]['seconds']} s)", flush=True)
    if args.all_cached:
        jobs = cached_jobs(cache)
    if not args.no_table:
        print_table(cache, jobs, common)


def cached_jobs(cache: dict) -> list[dict]:
    """A job for every run in ``cache``, labelled by its row and how its setting differs from the
    cache's baseline (and from the first run's steps, batch, ... where it does)."""
    runs = [(k, r) for k, r in cache.items() if "setting" in r]
    first = runs[0][1]["setting"] if runs else {}
    jobs = []
    for key, r in runs:
        s = r["setting"]
        diff = [f"{k}={v}" for k, v in sorted(s.get("changes", {}).items())]
        diff += [f"{k}={v}" for k, v in sorted(s.items()) if k != "changes" and first.get(k) != v]
        jobs.append({"key": key, "label": r["row"] + (f" [{' '.join(diff)}]" if diff else "")})
    return sorted(jobs, key=lambda j: j["label"])


def print_table(cache: dict, jobs: list[dict], common: dict) -> None:
    print(f"\nsetting: {json.dumps(common)}")
    print("| row | " + " | ".join(TASKS) + " | mean | seeds |")
    print("|" + " --- |" * (len(TASKS) + 3))
    base = cache[base_key(common)]["scores"]
    print("| all-MiniLM-L6-v2 (no training) | " + " | ".join(f"{100 * base[t]:.2f}" for t in TASKS)
          + f" | {100 * statistics.mean(base[t] for t in TASKS):.2f} | - |")
    labels = list(dict.fromkeys(j["label"] for j in jobs))
    for label in labels:
        runs = [cache[j["key"]] for j in jobs if j["label"] == label and j["key"] in cache]
        if not runs:
            continue
        cells = []
        for t in TASKS:
            vals = [100 * r["scores"][t] for r in runs]
            cells.append(f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""))
        means = [100 * statistics.mean(r["scores"][t] for t in TASKS) for r in runs]
        cells.append(f"{statistics.mean(means):.2f}" + (f" ± {statistics.stdev(means):.2f}" if len(means) > 1 else ""))
        print(f"| {label} | " + " | ".join(cells) + f" | {len(runs)} |")


if __name__ == "__main__":
    main()
