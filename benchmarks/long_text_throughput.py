"""Long texts: encoding and training throughput with and without segments (HiCL), side by side.

    python benchmarks/long_text_throughput.py --shape minilm-shape --length 512 --segment 128   # CPU smoke
    python benchmarks/long_text_throughput.py --shape bert-base --length 512                      # GPU rows
    python benchmarks/long_text_throughput.py --shape bert-base --length 2048
    python benchmarks/long_text_throughput.py --shape qwen3-0.6b --length 2048 --lora --checkpointing

One random-weight model of the named shape (BERT shapes get ``--length`` position embeddings so
the unsegmented run can take whole texts), long documents made of STS-B train sentences joined
until each exceeds ``--length`` tokens (truncated there), short queries (one sentence each).
For each setting — whole texts (``segments: off``) and ``model.segments: {length: --segment,
overlap: --overlap}`` — it reports:

* encoding ``--docs`` documents with ``EmbeddingModel.encode``: texts/s, real tokens/s, peak GPU
  memory;
* ``hmcl train`` steps (anchors x 1 positive document, InfoNCE only, the settings of
  benchmarks/train_throughput.py): samples/s, tokens/s as encoded (with segments: the repeated
  special tokens and overlaps included), peak GPU memory.

The ratio printed compares texts/s (encoding) and samples/s (training): the same texts either way.

Segments cost O(segment^2) attention per segment instead of O(length^2) per text, repeat the
special tokens in every segment and add ``overlap`` tokens per boundary; the ratios printed say
what that trades. Quality of the local term is measured separately (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import SHAPES, _sync, build_model, rate, run_hmcl, stsb_pairs  # noqa: E402


def long_texts(tokenizer, n: int, length: int) -> list[str]:
    """``n`` distinct documents of more than ``length`` tokens, from consecutive STS-B sentences."""
    sentences = list(dict.fromkeys(t for pair in stsb_pairs(100_000) for t in pair))
    out, i = [], 0
    while len(out) < n:
        parts, count = [], 0
        while count <= length:
            s = sentences[i % len(sentences)]
            parts.append(s)
            count += len(tokenizer(s, add_special_tokens=False)["input_ids"])
            i += 1
        out.append(f"[{len(out)}] " + " ".join(parts))
    return out


def encode_row(path: Path, docs: list[str], length: int, segments: dict | None, batch: int, device) -> dict:
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.segments import SegmentSettings

    model = EmbeddingModel.load(str(path), max_length=length).to(device)
    if segments:
        model.use_segments(SegmentSettings(**segments))
    ids = model.tokenize(docs, "doc")
    tokens = sum(map(len, ids))  # the texts' real tokens (segments re-read overlaps and specials)
    model.encode(docs[: batch * 2], side="doc", batch_size=batch)  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.encode(docs, side="doc", batch_size=batch)
    _sync(device)
    secs = time.perf_counter() - t0
    r = {"texts_per_s": rate(len(docs) / secs), "tokens_per_s": rate(tokens / secs)}
    if device.type == "cuda":
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    del model
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="minilm-shape")
    ap.add_argument("--length", type=int, default=512, help="document length in tokens (max_length)")
    ap.add_argument("--segment", type=int, default=256, help="segment length in tokens")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--docs", type=int, default=2000, help="documents encoded")
    ap.add_argument("--encode-batch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="training anchors per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--grad-cache-chunk", type=int, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"off": None, f"{args.segment}/{args.overlap}": {"length": args.segment, "overlap": args.overlap}}
    out: dict = {"encode": {}, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build_model(args.shape, tmp / "model", positions=max(512, args.length))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        n_train = args.batch_size * (args.warmup + args.steps + 1)
        docs = long_texts(tok, max(args.docs, n_train), args.length)
        queries = [a for a, _ in stsb_pairs(n_train)]
        rows = [{"query": q, "pos": [d]} for q, d in zip(queries, docs)]
        for name, seg in settings.items():
            torch.manual_seed(0)
            out["encode"][name] = encode_row(path, docs[: args.docs], args.length, seg, args.encode_batch, device)
            torch.manual_seed(0)
            out["train"][name] = run_hmcl(path, rows, 1, 64, args.length, args, device, tmp / f"train-{name.replace('/', '-')}",
                                          model_extra={"segments": seg} if seg else None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seg_name = list(settings)[1]
    print(f"\n{args.shape} on {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'fp32'}), "
          f"documents of {args.length} tokens, segments {seg_name} (length/overlap)")
    for part in ("encode", "train"):
        key = "texts_per_s" if part == "encode" else "samples_per_s"  # same texts: compare texts, not tokens
        base = out[part]["off"]
        for name, r in out[part].items():
            print(f"{part:<7} segments {name:<8} " + " ".join(f"{k} {v}" for k, v in r.items())
                  + f"  {key} vs off {r[key] / base[key]:.2f}x")
    print(json.dumps({"args": vars(args), "results": out}))


if __name__ == "__main__":
    main()
