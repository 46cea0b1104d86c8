"""Hard-negative mining throughput: `hmcl mine` vs sentence-transformers' mine_hard_negatives.

    python benchmarks/mine_throughput.py [--corpus 100000] [--queries 1000] [--batch-size 128] [--shape micro]

Same input for both, in one run: (anchor, positive) pairs from STS-B train (score >= 4) and a
corpus of distinct sentences from STS-B, SICK and TrecQA (../shared/data), padded with numbered
variants to the requested size; all-MiniLM-L6-v2; negatives from ranks [10, 50), relative margin
0.05, 3 per query, exact search (``--shape``: a random model of a ``train_throughput.py`` shape
instead; ``micro`` leaves next to no compute, so what is timed is each tool's host work). Each tool encodes the corpus and the queries itself (hmcl's
embedding cache starts empty). Reports seconds and texts/s and the ratio; on CPU unless CUDA is
present. Compare ratios across machines, not absolute numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def inputs(n_corpus: int, n_queries: int) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, texts = [], []
    with open(SHARED / "stsb" / "stsb-en-train.csv", encoding="utf-8", newline="") as f:
        for a, b, s in csv.reader(f):
            texts += [a, b]
            if float(s) >= 4.0 and len(pairs) < n_queries:
                pairs.append((a, b))
    with open(SHARED / "sick" / "SICK_train.txt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts += [row["sentence_A"], row["sentence_B"]]
    with open(SHARED / "trecqa" / "trecqa-train.csv", encoding="utf-8", newline="") as f:
        texts += [row["atext"] for row in csv.DictReader(f)]
    unique = list(dict.fromkeys(texts))
    corpus = list(unique)
    k = 1
    while len(corpus) < n_corpus:
        corpus += [f"{t} ({k})" for t in unique[: n_corpus - len(corpus)]]
        k += 1
    return pairs, corpus[:n_corpus]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shape", default="minilm", help="minilm (the real weights) or a train_throughput.py shape")
    args = ap.parse_args()
    pairs, corpus = inputs(args.corpus, args.queries)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(pairs)} queries, corpus {len(corpus)} texts, {args.shape} on {device}")

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from hmcl_cli.mining import mine
    from hmcl_cli.modeling.resolve import resolve_model
    from hmcl_cli.recipe import load_recipe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shape == "minilm":
            path = str(resolve_model("sentence-transformers/all-MiniLM-L6-v2"))
        else:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from train_throughput import build_model

            path = str(build_model(args.shape, tmp / "model"))
        (tmp / "corpus.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in corpus), encoding="utf-8")
        (tmp / "run" / "data").mkdir(parents=True)
        (tmp / "run" / "data" / "train.jsonl").write_text(
            "".join(json.dumps({"query": a, "pos": [b]}) + "\n" for a, b in pairs), encoding="utf-8")
        recipe = load_recipe(data={
            "name": "bench", "output_dir": str(tmp / "run"),
            "model": {"name_or_path": path, "max_length": 128},
            "mine": {"corpus": [str(tmp / "corpus.txt")], "top_k": 50, "range_min": 10, "range_max": 50,
                     "relative_margin": 0.05, "num_negatives": 3, "num_weak": 0, "batch_size": args.batch_size}})
        from hmcl_cli.modeling.encoder import EmbeddingModel

        model = EmbeddingModel.from_recipe(recipe.model, recipe.base_dir)  # loaded before timing, like ST's
        t0 = time.perf_counter()
        report = mine(recipe, model=model)
        results["hmcl mine"] = (time.perf_counter() - t0, report["added"]["neg"])

        st = SentenceTransformer(path, device=device)
        st.max_seq_length = 128
        ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [b for _, b in pairs]})
        t0 = time.perf_counter()
        out = mine_hard_negatives(ds, st, corpus=corpus, range_min=10, range_max=50, relative_margin=0.05,
                                  num_negatives=3, sampling_strategy="top", batch_size=args.batch_size,
                                  output_format="labeled-pair", verbose=False)
        results["sentence-transformers mine_hard_negatives"] = (
            time.perf_counter() - t0, sum(1 for x in out["label"] if x == 0))
    n_texts = len(corpus) + len(pairs)
    base = results["sentence-transformers mine_hard_negatives"][0]
    print(f"{'tool':<44} {'seconds':>8} {'texts/s':>9} {'speed-up':>9} {'negatives':>10}")
    for name, (secs, negs) in results.items():
        print(f"{name:<44} {secs:>8.1f} {n_texts / secs:>9.1f} {base / secs:>8.2f}x {negs:>10}")


if __name__ == "__main__":
    main()
