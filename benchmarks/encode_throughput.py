"""Encoding throughput: hmcl's `EmbeddingModel.encode` (used by mine and eval) vs sentence-transformers' `model.encode`.

    python benchmarks/encode_throughput.py [--texts 100000] [--batch-size 256] [--shape minilm] [--sdpa no-cudnn]
    python benchmarks/encode_throughput.py --texts 20000 --sync-audit     # what makes the host wait, per batch
    python benchmarks/encode_throughput.py --two-d-mask   # also hmcl with the model's own 2D mask check
    python benchmarks/encode_throughput.py --cudnn-attention   # also hmcl with SDPA's cuDNN kernels allowed
    python benchmarks/encode_throughput.py --pageable          # also hmcl copying unpinned batches to the GPU
    python benchmarks/encode_throughput.py --graphs-off        # also hmcl without CUDA graphs (model.encode_graphs false)
    python benchmarks/encode_throughput.py --big-batch 2048    # also hmcl with 2048 texts per batch

Same input for both in one run: the mining benchmark's corpus (distinct sentences from STS-B,
SICK and TrecQA in ../shared/data, padded with numbered variants to ``--texts``), all-MiniLM-L6-v2
(or a random-weight model of a ``train_throughput.py`` shape), the same batch size and max length.
sentence-transformers is timed twice: as loaded (float32) and with its weights cast to bf16 (what
the issue's reference figure used); hmcl runs as it does in `hmcl mine` / `hmcl eval` (bf16 on
GPU, float32 on CPU), in the CLI's process state (``TOKENIZERS_PARALLELISM`` as the CLI sets it);
sentence-transformers in the caller's (unset: the tokenizers library tokenises on every core, as
for its users). Reports sentences/s and the ratios; the outputs of both tools are compared
(mean cosine) so a fast wrong answer cannot pass. Compare ratios across machines, not absolute
numbers. hmcl's default row replays CUDA graphs on a GPU (``model.encode_graphs: auto``); the
variant rows (pageable batches, 2D mask, padded, unpad true, cuDNN attention) change the eager
loop and run without graphs: compare them with the ``--graphs-off`` row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _timed(fn, device, label: str = "", n: int = 0) -> tuple[float, object]:
    """Seconds and output of ``fn()``; with ``label``, a line as soon as it ends (a run cut off by
    a time limit keeps what it finished)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if label:
        print(f"result {label}: {n / secs:.0f} sentences/s", flush=True)
    return secs, out


def main() -> None:
    from mine_throughput import inputs
    from train_throughput import SHAPES, _sdpa_backends, _sync_audit, build_model, two_d_masks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--shape", choices=["minilm", *SHAPES], default="minilm")
    ap.add_argument("--warmup", type=int, default=None,
                    help="texts encoded once by each tool (and each hmcl variant) before timing; default: all of "
                    "them, so that no batch shape is first seen in the timed pass (on the H200 of 2026-12-04, "
                    "warmed on 2000, hmcl's default row measured 23.4k sentences/s on 50k texts and 39.5k on "
                    "20k in the next process: the cause was not isolated)")
    ap.add_argument("--sdpa", choices=["default", "no-cudnn", "efficient", "flash", "math"], default="default",
                    help="restrict SDPA's backends for both tools (torch.nn.attention.sdpa_kernel)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rows, print torch.profiler tables of one hmcl encode of the texts, "
                         "then of one sentence-transformers encode")
    ap.add_argument("--sync-audit", action="store_true",
                    help="then encode once more (hmcl, untimed) printing what made the host wait for the device")
    ap.add_argument("--two-d-mask", action="store_true",
                    help="also time hmcl with the model's own 2D mask check (as before prepared masks)")
    ap.add_argument("--padded", action="store_true",
                    help="also time hmcl with padded forward calls (model.unpad false), and unpadded ones "
                    "where `auto` keeps them padded (model.unpad true)")
    ap.add_argument("--big-batch", type=int, default=None,
                    help="also time hmcl with this batch_size (the batch of its longest texts; on a GPU later "
                         "batches grow by tokens from it): fewer launches per text")
    ap.add_argument("--graphs-off", action="store_true",
                    help="also time hmcl without CUDA graphs (model.encode_graphs false; the default row replays "
                         "them on a GPU): what removing the launches is worth")
    ap.add_argument("--cudnn-attention", action="store_true",
                    help="also time hmcl with SDPA's cuDNN attention allowed (model.cudnn_attention)")
    ap.add_argument("--pageable", action="store_true",
                    help="also time hmcl moving its batches to the GPU from pageable host memory (as before "
                    "it pinned them; on a CPU nothing is pinned, so the row only repeats the default)")
    args = ap.parse_args()
    _, texts = inputs(args.texts, 0)
    args.warmup = len(texts) if args.warmup is None else args.warmup
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from sentence_transformers import SentenceTransformer

    from hmcl_cli.modeling.encoder import EmbeddingModel

    with tempfile.TemporaryDirectory() as tmp, _sdpa_backends(args.sdpa):
        path = build_model(args.shape, Path(tmp) / "model")
        results = {}
        st = SentenceTransformer(str(path), device=device)
        st.max_seq_length = args.max_length

        def st_encode():
            return st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True, normalize_embeddings=True)

        st.encode(texts[: args.warmup], batch_size=args.batch_size)
        results["sentence-transformers (fp32 weights)"], ref = _timed(st_encode, device, "sentence-transformers (fp32 weights)", len(texts))
        if device == "cuda":
            st.to(torch.bfloat16)
            st.encode(texts[: args.warmup], batch_size=args.batch_size)
            results["sentence-transformers (bf16 weights)"], _ = _timed(st_encode, device, "sentence-transformers (bf16 weights)", len(texts))
        st.to("cpu")
        from hmcl_cli.modeling.tokenizing import quiet_forks

        quiet_forks()  # the process state of `hmcl mine` / `hmcl eval` (the CLI calls it at start)
        hm = EmbeddingModel.load(str(path), max_length=args.max_length).to(device)
        hm.encode(texts[: args.warmup], batch_size=args.batch_size)
        results["hmcl encode"], ours = _timed(lambda: hm.encode(texts, batch_size=args.batch_size), device, "hmcl encode", len(texts))
        if args.big_batch:
            label = f"hmcl encode, batch {args.big_batch}"
            hm.encode(texts[: args.warmup], batch_size=args.big_batch)
            results[label], _ = _timed(lambda: hm.encode(texts, batch_size=args.big_batch), device, label, len(texts))
        if args.graphs_off:  # model.encode_graphs false: every batch queued kernel by kernel
            hm.encode_graphs = False
            hm.encode(texts[: args.warmup], batch_size=args.batch_size)
            results["hmcl encode, no CUDA graphs"], eager = _timed(lambda: hm.encode(texts, batch_size=args.batch_size),
                                                                   device, "hmcl encode, no CUDA graphs", len(texts))
            same = torch.nn.functional.cosine_similarity(eager.float(), ours.float(), dim=-1).mean().item()
            print(f"hmcl encode, no CUDA graphs vs hmcl encode: mean cosine {same:.5f}", flush=True)
        # the variant rows below change the eager loop: they run without CUDA graphs (compare them with
        # the "no CUDA graphs" row)
        hm.encode_graphs = False
        if args.pageable:  # batches copied from pageable memory (encoder.PIN_HOST_BATCHES off)
            from hmcl_cli.modeling import encoder

            encoder.PIN_HOST_BATCHES = False
            hm.encode(texts[: args.warmup], batch_size=args.batch_size)
            results["hmcl encode, pageable batches"], _ = _timed(lambda: hm.encode(texts, batch_size=args.batch_size),
                                                                 device, "hmcl encode, pageable batches", len(texts))
            encoder.PIN_HOST_BATCHES = True
        if args.two_d_mask:  # the same encoder as before prepared masks: the model checks its 2D mask
            with two_d_masks(True):
                hm.encode(texts[: args.warmup], batch_size=args.batch_size)
                results["hmcl encode, 2D mask"], _ = _timed(lambda: hm.encode(texts, batch_size=args.batch_size), device, "hmcl encode, 2D mask", len(texts))
        if args.padded:  # model.unpad false, then true (auto is the default row)
            for setting, label in ((False, "hmcl encode, padded"), (True, "hmcl encode, unpad true")):
                hm.unpad = setting
                hm.encode(texts[: args.warmup], batch_size=args.batch_size)
                results[label], _ = _timed(lambda: hm.encode(texts, batch_size=args.batch_size), device, label, len(texts))
            hm.unpad = "auto"
        if args.cudnn_attention:  # hmcl letting SDPA take cuDNN attention (model.cudnn_attention)
            hm.cudnn_attention = True
            hm.encode(texts[: args.warmup], batch_size=args.batch_size)
            results["hmcl encode, cuDNN attention"], _ = _timed(lambda: hm.encode(texts, batch_size=args.batch_size), device,
                                                                "hmcl encode, cuDNN attention", len(texts))
            hm.cudnn_attention = False
        hm.encode_graphs = "auto"
        prepared = hm.check_masks()
        agree = torch.nn.functional.cosine_similarity(ours.float(), ref.float().cpu(), dim=-1).mean().item()
        if args.profile:  # where each tool's time goes (after the timed rows: the profiler slows them)
            from train_throughput import profiled

            print("\nprofile: hmcl encode", flush=True)
            profiled(lambda: hm.encode(texts, batch_size=args.batch_size), torch.device(device))
            hm.to("cpu")
            st.to(device, torch.float32)  # the row hmcl is compared with (fp32 weights)
            print("\nprofile: sentence-transformers encode", flush=True)
            profiled(st_encode, torch.device(device))
            st.to("cpu")
            hm.to(device)
        if args.sync_audit:  # the loop only (encode's final copy to the host waits by design), per batch
            from hmcl_cli.modeling.encoder import batch_growth, encode_batches

            unique = list(dict.fromkeys(texts))
            batches = len(encode_batches(sorted(map(len, hm.tokenize(unique)), reverse=True), args.batch_size,
                                         batch_growth(torch.device(device))))
            with _sync_audit(torch.device(device), batches, "batch"):
                hm._encode_plain(unique, "doc", args.batch_size, False, "encode")
    print(f"\n{args.shape} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'fp32'}), "
          f"{len(texts)} texts, batch {args.batch_size} (hmcl: of the longest texts; sized by tokens), max length {args.max_length}, SDPA {args.sdpa}; "
          f"hmcl vs sentence-transformers fp32 mean cosine {agree:.5f}; hmcl's attention mask: "
          f"{'prepared 4D' if prepared else 'the 2D padding mask'}")
    base = results["sentence-transformers (fp32 weights)"]
    for name, secs in results.items():
        print(f"{name:<40} {len(texts) / secs:>10.0f} sentences/s  hmcl is {secs / results['hmcl encode']:.2f}x this"
              if name != "hmcl encode" else
              f"{name:<40} {len(texts) / secs:>10.0f} sentences/s  ({base / secs:.2f}x ST fp32)")


if __name__ == "__main__":
    main()
