"""Training throughput: `hmcl train` vs a plain sentence-transformers loop, side by side.

    python benchmarks/train_throughput.py --data quickstart                 # CPU row (fp32)
    python benchmarks/train_throughput.py --data stsb --shape minilm        # GPU rows (bf16)
    python benchmarks/train_throughput.py --data stsb --shape bert-base
    python benchmarks/train_throughput.py --data stsb --shape qwen3-0.6b --batch-size 32
    python benchmarks/train_throughput.py --data stsb --shape qwen3-4b --lora --checkpointing --tools hmcl
    python benchmarks/train_throughput.py --data stsb --shape bert-base --sdpa no-cudnn    # SDPA backends
    python benchmarks/train_throughput.py --data stsb --shape bert-base --tools hmcl --sync-audit   # host waits
    python benchmarks/train_throughput.py --data stsb --shape minilm-shape --tools st,hmcl,hmcl-compiled,hmcl-graphs  # compiled
    python benchmarks/train_throughput.py --data stsb --shape bert-base --op-count       # ops per step
    python benchmarks/train_throughput.py --data stsb --shape micro-qwen3-28 --tools st,hmcl,hmcl-unfused-norms --op-count
    python benchmarks/train_throughput.py --data stsb --shape minilm-shape --tools st,hmcl,hmcl-fused-proj --op-count
    python benchmarks/train_throughput.py --data stsb --shape bert-base --tools st,hmcl,hmcl-2d-mask  # masks
    python benchmarks/train_throughput.py --data stsb --shape bert-base --tools st,hmcl-1fwd,hmcl-2fwd  # one_forward
    python benchmarks/train_throughput.py --data stsb --shape bert-base --tools hmcl,hmcl-cudnn   # cuDNN attention
    python benchmarks/train_throughput.py --data stsb --shape bert-base --tools st,hmcl,hmcl-padded,hmcl-unpad  # model.unpad

Both tools get the same model (all-MiniLM-L6-v2, or a random-weight model of the named shape),
the same examples, batch composition (anchors x group of candidates), max length and precision
(fp32 on CPU, bf16 autocast on GPU, or fp16 with a loss scale: ``--precision``), AdamW at the same learning rate (fused, as both trainers
take it by default with torch >= 2.8; before 2026-12-04 the loop took the per-tensor AdamW,
~155 ms slower per MiniLM step on the 2-core CPU), and the same objective:
in-batch InfoNCE with the group's candidates (MultipleNegativesRankingLoss on the
sentence-transformers side; hmcl with only its contrastive term). The sentence-transformers loop
tokenises each step's texts as its trainer does; hmcl runs its own loop (`HMCLTrainer`).

Reported per tool, after ``--warmup`` steps, over ``--steps`` steps: real (non-padding) tokens/s
(hmcl encodes each distinct text of a step once, so where candidates repeat within a batch it
processes fewer tokens for the same batch: compare samples/s for the step speed),
samples (anchors)/s, peak GPU memory, and for the decoder shapes MFU (model FLOPs, 6 x the
non-embedding parameters per token, 4 x with LoRA which computes no weight gradients, over time
and the H100's 989 TFLOP/s dense bf16; an embedding lookup is no matmul, and attention's score
FLOPs, 12 x layers x width x length per token, under 1% at these ~16-token texts, are left out,
as is recomputation by gradient checkpointing: a conservative MFU). ``--op-count`` counts the
ATen operations each tool dispatches per timed step outside the optimizer (and in it, apart),
views left out: each is at least one kernel launch on a GPU, where short-text steps are
launch-bound; counted on any device (on a CPU with ``F.rms_norm`` one operation, as on a GPU:
:func:`gpu_norm_kernels_on_cpu`). The memory
planner's estimate is printed beside hmcl's measured peak. Data: ``quickstart`` =
recipes/data/support-train.jsonl (graded, group 4, max length 64/96 as the quickstart recipe);
``stsb`` = STS-B train pairs with score >= 4 from ../shared/data (group 1: the positive only,
max length 128).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

SHAPES = {  # random-weight shapes (name -> transformers config kwargs)
    "minilm-shape": ("bert", dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                                  vocab_size=30522)),  # all-MiniLM-L6-v2's shape: same speed as the real weights
    # compute next to nothing: what is left is each tool's host work (tokenising, padding, launching),
    # the part that bounds short-text steps on a big GPU; a CPU proxy for it
    "micro": ("bert", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=30522)),
    "micro-qwen3": ("qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, vocab_size=8000)),  # the decoder path, for smoke tests
    # Qwen3-0.6B's 28 layers at micro width: the host work of the 0.6B step (launch-bound on a GPU) on a CPU
    "micro-qwen3-28": ("qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=8000)),
    "bert-base": ("bert", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               vocab_size=30522)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
}
H100_BF16_FLOPS = 989e12


def profiled(fn, device: torch.device, rows: int = 25):
    """``fn()`` under torch.profiler (CUDA activity too on a GPU); prints its operations by
    device time (CPU time without a GPU) and by host time, each with its calls. Returns fn's
    output."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        out = fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"hmcl's ranges (host time in each, whole; {total / 1e3:.1f} ms of host time profiled):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total):
        if e.key.startswith("hmcl."):
            print(f"  {e.key:<22} {e.count:>6} calls {e.cpu_time_total / 1e3:>10.2f} ms "
                  f"({e.cpu_time_total / max(total, 1e-9):.0%})")
    sys.stdout.flush()
    return out


def build_model(shape: str, folder: Path, positions: int = 512, dtype: Optional[torch.dtype] = None) -> Path:
    """all-MiniLM-L6-v2 itself, or a random model of ``shape`` with a real tokenizer (BERT shapes
    with ``positions`` position embeddings), stored in ``dtype`` (default: as the real
    checkpoints on a GPU, float32 on a CPU)."""
    from hmcl_cli.modeling.resolve import resolve_model

    minilm = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    if shape == "minilm":
        return minilm
    from transformers import AutoModel, AutoTokenizer, BertConfig, Qwen3Config

    kind, kw = SHAPES[shape]
    torch.manual_seed(0)
    if kind == "bert":
        cfg, tok = BertConfig(**kw, max_position_embeddings=positions), AutoTokenizer.from_pretrained(minilm)
        tok.model_max_length = positions
    else:
        tok = _byte_level_tokenizer()
        cfg = Qwen3Config(**kw, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # stored like the real checkpoints: BERT-class float32, Qwen bf16 (float32 on a CPU, where bf16 is ~100x slower)
    if dtype is None:
        dtype = torch.bfloat16 if kind == "qwen3" and torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModel.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def _byte_level_tokenizer():
    """A word-piece-like tokenizer trained on the benchmark texts (Qwen's is not available offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [t for a, b in stsb_pairs(50_000) for t in (a, b)]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


def stsb_pairs(limit: int) -> list[tuple[str, str]]:
    out = []
    with open(SHARED / "stsb" / "stsb-en-train.csv", encoding="utf-8", newline="") as f:
        for a, b, s in csv.reader(f):
            if float(s) >= 4.0:
                out.append((a, b))
    return out[:limit]


def examples(data: str) -> tuple[list[dict], int, int, int]:
    """Graded examples, group size, query and document max length."""
    if data == "quickstart":
        rows = [json.loads(line) for line in (ROOT / "recipes/data/support-train.jsonl").read_text().splitlines()]
        return rows, 4, 64, 96
    return [{"query": a, "pos": [b]} for a, b in stsb_pairs(10_000)], 1, 128, 128


def st_batches(rows: list[dict], group: int, batch: int, seed: int):
    """Anchor batches with a positive and group-1 other candidates each (weak/neg first), no repeats."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for s in range(0, len(order) - batch + 1, batch):
            anchors, cands = [], []
            for i in order[s:s + batch]:
                r = rows[i]
                others = r.get("weak", []) + r.get("neg", [])
                pick = rng.sample(others, min(group - 1, len(others)))
                anchors.append(r["query"])
                cands.append([rng.choice(r["pos"])] + pick)
            yield anchors, cands


def st_trainer_adamw() -> dict:
    """The AdamW sentence-transformers' trainer takes by default (its ``optim``, from transformers:
    ``adamw_torch_fused`` with torch >= 2.8, on the CPU too), for the loop to step as it does."""
    import dataclasses

    from sentence_transformers import SentenceTransformerTrainingArguments

    optim = next(f.default for f in dataclasses.fields(SentenceTransformerTrainingArguments) if f.name == "optim")
    return {"fused": True} if str(getattr(optim, "value", optim)) == "adamw_torch_fused" else {}


def run_st(path: Path, rows, group, q_len, d_len, args, device) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=str(device))
    model.max_seq_length = max(q_len, d_len)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, **st_trainer_adamw())
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    amp = torch.autocast("cuda", dtype=half) if device.type == "cuda" and half else torch.autocast("cpu", enabled=False)
    # fp16 as sentence-transformers' trainer runs it (through accelerate): with a loss scale
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and args.precision == "fp16" else None
    gen = st_batches(rows, group, args.batch_size, 0)
    batches = [next(gen) for _ in range(args.warmup + args.steps)]
    timed = batches[args.warmup:]
    if args.warm_shapes:  # the timed batches once untimed first: see --no-warm-shapes
        batches = batches + timed
    tokens = samples = 0
    counting = contextlib.ExitStack()
    for step, (anchors, cands) in enumerate(batches):
        if step == len(batches) - args.steps:
            _sync(device)
            t0, tokens, samples = time.perf_counter(), 0, 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ops = counting.enter_context(OpCounter()) if args.op_count else None
        flat = [c for cs in cands for c in cs]
        hq = {k: v for k, v in model.preprocess(anchors).items() if torch.is_tensor(v)}
        hd = {k: v for k, v in model.preprocess(flat).items() if torch.is_tensor(v)}
        # tokens counted on the host tensors: a count of the device copies would make the loop wait
        # for the GPU every step, which the loop itself does not need to
        tokens += int(hq["attention_mask"].sum()) + int(hd["attention_mask"].sum())
        fq, fd = ({k: v.to(device) for k, v in h.items()} for h in (hq, hd))
        with amp:
            q = model(fq)["sentence_embedding"]
            d = model(fd)["sentence_embedding"]
        q, d = torch.nn.functional.normalize(q.float(), dim=-1), torch.nn.functional.normalize(d.float(), dim=-1)
        logits = q @ d.T * 20.0
        target = torch.arange(len(anchors), device=device) * len(cands[0])
        loss = torch.nn.functional.cross_entropy(logits, target)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        samples += len(anchors)
    _sync(device)
    counting.close()
    out = _result(time.perf_counter() - t0, tokens, samples, device)
    if ops is not None:
        out["ops"] = ops.per_step(args.steps)
    return out


# what run_hmcl reads beyond batch_size, steps and warmup, for benchmarks whose options are fewer
RUN_DEFAULTS = dict(lr=2e-5, attn=None, workers=0, grad_cache_chunk=None, lora=False,
                    checkpointing=False, profile=False, sync_audit=False, op_count=False, precision="bf16",
                    warm_shapes=True, hmcl_loss=[])


def _loss_settings(pairs: list[str]) -> dict:
    """``--hmcl-loss KEY=VALUE`` options as the loss section's keys (values read as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--hmcl-loss {pair!r}: expected KEY=VALUE, e.g. matryoshka_dims=[256,128]")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_hmcl(path: Path, rows, group, q_len, d_len, args, device, tmp: Path, model_extra: dict | None = None,
             train_extra: dict | None = None) -> dict:
    from hmcl_cli.data.prepare import prepare
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.training.trainer import HMCLTrainer

    args = argparse.Namespace(**{**RUN_DEFAULTS, **vars(args)})
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(data={
        "name": "bench", "seed": 0, "output_dir": str(tmp / "run"),
        "model": {"name_or_path": str(path), "query_max_length": q_len, "doc_max_length": d_len, "max_length": d_len,
                  "gradient_checkpointing": args.checkpointing, "lora": {"enabled": args.lora},
                  **({"attn_implementation": args.attn} if args.attn else {}), **(model_extra or {})},
        "data": {"sources": [{"path": str(tmp / "train.jsonl"), "split": "train"}], "dev_fraction": 0.0},
        "train": {"max_steps": args.warmup, "batch_size": args.batch_size, "group_size": group,
                  "learning_rate": args.lr, "warmup_ratio": 0.0, "log_steps": 10_000, "save_steps": 100_000,
                  "eval_steps": 100_000, "max_grad_norm": None, "batch_by_source": False,
                  "grad_cache_chunk": args.grad_cache_chunk, "num_workers": args.workers,
                  "precision": args.precision if device.type == "cuda" else "auto",
                  **(train_extra or {})},
        "loss": {"contrastive_weight": 1.0, "classification_weight": 0.0, "ranking_weight": 0.0, "temperature": 0.05,
                 **_loss_settings(args.hmcl_loss)}})
    prepare(recipe, progress=False)
    trainer = HMCLTrainer(recipe)
    trainer.setup()
    plan = trainer.memory_plan if device.type == "cuda" else None
    if device.type == "cuda":  # the run's peak, for the memory plan: the plan is for the heaviest step
        torch.cuda.reset_peak_memory_stats()  # of the run, which need not fall among the timed steps
    trainer.train()  # warm-up steps
    # the timed steps write no checkpoint: the trainer writes one when it reaches total_steps
    # (model and optimizer state: ~2 s for BERT-base, ~12 s for a fully trained Qwen3-0.6B on the
    # H200 of 2026-12-04), a once-per-run cost that the sentence-transformers loop does not pay
    trainer.save_checkpoint = lambda *a, **k: None
    trainer.total_steps = args.warmup + args.steps
    if args.warm_shapes:
        # the timed steps once untimed first, then the same batches again (a step's batch follows
        # from its number), as run_st does: see --no-warm-shapes
        trainer.train()
        trainer.step = args.warmup
    _sync(device)
    run_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counted = {"tokens": 0}
    real_forward = trainer._forward_backward

    def counting(batch, scale):
        counted["tokens"] += int(batch["n_tokens"])
        return real_forward(batch, scale)

    trainer._forward_backward = counting
    t0 = time.perf_counter()
    if args.profile:
        profiled(trainer.train, device)
    elif args.sync_audit:
        with _sync_audit(device, args.steps):
            trainer.train()
    elif args.op_count:
        with OpCounter() as ops:
            trainer.train()
    else:
        trainer.train()
    _sync(device)
    out = _result(time.perf_counter() - t0, counted["tokens"], args.steps * args.batch_size, device)
    out["mask"] = "prepared 4D" if trainer.model.check_masks() else "2D"
    if args.op_count:
        out["ops"] = ops.per_step(args.steps)
    if plan is not None:
        out["run_peak_gib"] = round(max(run_peak, torch.cuda.max_memory_allocated()) / 1024 ** 3, 2)
        out["planned_gib"] = round(plan.peak / 1024 ** 3, 2)
    return out


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active, by name, views (no kernel) left out;
    those of ``optimizer.step`` apart (both take fused AdamW where torch has it, but the count
    of a fused step depends on the device)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.optimizer_ops = 0
        self._in_step = False

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [register_optimizer_step_pre_hook(lambda *a: setattr(self, "_in_step", True)),
                       register_optimizer_step_post_hook(lambda *a: setattr(self, "_in_step", False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _AS_ONE:  # inside a stand-in for one GPU kernel (see counted_as_one): its first operation
            region = _AS_ONE[-1]  # is counted under the kernel's name, the others not at all
            if not region[1]:
                region[1] = True
                self.counts[region[0]] += 1
            return func(*args, **(kwargs or {}))
        if not func.is_view:
            if self._in_step:
                self.optimizer_ops += 1
            else:
                self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> dict:
        """Per step: the operations outside the optimizer, the optimizer's, and the 10 most
        frequent of the former."""
        top = {k: round(v / steps, 1) for k, v in self.counts.most_common(10)}
        return {"total": round(sum(self.counts.values()) / steps, 1), "optimizer": round(self.optimizer_ops / steps, 1),
                **top}


@contextlib.contextmanager
def _sync_audit(device, steps: int, unit: str = "step"):
    """Print what made the host wait during the timed steps: ATen ops that read data back
    (hmcl_cli/training/host_sync.py, any device) and, on CUDA, every synchronising call that
    torch.cuda.set_sync_debug_mode reports, by Python call site."""
    import traceback
    import warnings
    from collections import Counter

    from hmcl_cli.training.host_sync import HostSyncCounter

    sites: Counter = Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter(device=device.type) as ops:
                yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show
    where = "" if device.type == "cuda" else " (CPU: every read-back counted, GPU or not)"
    print(f"host syncs seen by dispatch{where}, {len(ops.events) / steps:.1f} per {unit}:\n{ops.report()}")
    if device.type == "cuda":
        print(f"CUDA synchronising calls, {sum(sites.values()) / steps:.1f} per {unit}:")
        for site, n in sites.most_common(15):
            print(f"{n:6d}  {site}")


TOOL_NAMES = {"hmcl": "hmcl train", "hmcl-2d-mask": "hmcl train, 2D mask",
              "hmcl-1fwd": "hmcl train, one forward", "hmcl-2fwd": "hmcl train, two forwards",
              "hmcl-cudnn": "hmcl train, cuDNN attention", "hmcl-per-tensor-adamw": "hmcl train, per-tensor AdamW",
              "hmcl-padded": "hmcl train, padded", "hmcl-unpad": "hmcl train, unpadded",
              "hmcl-compiled": "hmcl train, compiled", "hmcl-graphs": "hmcl train, CUDA graphs",
              "hmcl-unfused-norms": "hmcl train, unfused norms", "hmcl-unfused-rotary": "hmcl train, unfused rotary",
              "hmcl-unfused": "hmcl train, unfused norms and rotary",
              "hmcl-unfused-proj": "hmcl train, unfused projections",
              "hmcl-fused-proj": "hmcl train, fused projections",
              "hmcl-gpu-defaults": "hmcl train, one forward, fused projections"}
# rows never measured on a GPU yet: a failure is printed and the tools after it still run
EXPERIMENTAL_TOOLS = {"hmcl-graphs", "hmcl-compiled"}
TOOL_TRAIN = {"hmcl-1fwd": {"one_forward": True}, "hmcl-gpu-defaults": {"one_forward": True}, "hmcl-2fwd": {"one_forward": False}, "hmcl-compiled": {"compile": True},
              "hmcl-graphs": {"compile": "cuda-graphs"}}  # (layers in reduce-overhead mode, padded calls)
TOOL_MODEL = {"hmcl-cudnn": {"cudnn_attention": True}, "hmcl-padded": {"unpad": False}, "hmcl-unpad": {"unpad": True},
              "hmcl-unfused-norms": {"fused_norms": False}, "hmcl-unfused-rotary": {"fused_rotary": False},
              "hmcl-unfused": {"fused_norms": False, "fused_rotary": False},
              "hmcl-unfused-proj": {"fused_projections": False},
              "hmcl-fused-proj": {"fused_projections": True},  # (a CPU's auto does not join them)
              "hmcl-gpu-defaults": {"fused_projections": True}}  # a GPU's autos on a CPU, for --op-count


def tool_model(tool: str, config, device: torch.device) -> dict | None:
    """The model settings of an hmcl row. ``hmcl-gpu-defaults`` on a CPU takes a GPU's ``auto``
    decisions: projections joined, and calls padded where a GPU's bf16 training would not run the
    flash variable-length kernel (attention dropout: BERT-class models), else unpadded."""
    extra = TOOL_MODEL.get(tool)
    if tool == "hmcl-gpu-defaults" and device.type == "cpu":
        from hmcl_cli.modeling.unpad import varlen_takes

        if not varlen_takes(config, torch.bfloat16, training=True, device_type="cuda"):
            extra = {**extra, "unpad": False}
    return extra


def has_fused_norm_decomposition() -> bool:
    """Whether PyTorch decomposes its fused RMSNorm kernel (torch >= 2.10), which
    :func:`gpu_norm_kernels_on_cpu` runs as the kernel's CPU stand-in."""
    from torch._decomp import decomposition_table

    return hasattr(torch.ops.aten, "_fused_rms_norm") and torch.ops.aten._fused_rms_norm.default in decomposition_table


_AS_ONE: list = []  # the stand-in regions open, innermost last: [kernel name, counted yet]


@contextlib.contextmanager
def counted_as_one(name: str):
    """Operations dispatched inside count as one operation ``name`` in :class:`OpCounter` (a CPU
    stand-in for what a GPU runs as one kernel); inside another such region, nothing more."""
    if _AS_ONE:  # a stand-in computed with another (the varlen one with SDPA's): one operation in all
        yield
        return
    _AS_ONE.append([name, False])
    try:
        yield
    finally:
        _AS_ONE.pop()


def _attend_per_text(q, k, v, cu, causal: bool, scale):
    """Packed attention ``[T, H, d]`` computed text by text (``cu``: where each text starts)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            qs, ks, vs = (x[start:stop].transpose(0, 1) for x in (q, k, v))
            out[start:stop] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=ks.size(0) != qs.size(0)).transpose(0, 1)
    return out


class _VarlenStandIn(torch.autograd.Function):
    """The flash variable-length kernel's forward and backward as one counted operation each."""

    @staticmethod
    def forward(ctx, q, k, v, cu, causal, scale):
        ctx.save_for_backward(q, k, v, cu)
        ctx.causal, ctx.scale = causal, scale
        with counted_as_one("varlen_attn"):
            return _attend_per_text(q, k, v, cu, causal, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu = ctx.saved_tensors
        with counted_as_one("varlen_attn_backward"), torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _attend_per_text(*inputs, cu, ctx.causal, ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, inputs, grad)
        return dq, dk, dv, None, None, None


def _varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's signature (torch >= 2.11), on a CPU."""
    return _VarlenStandIn.apply(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


def _attend(q, k, v, mask, keep, dropout: float, scale, causal: bool):
    """SDPA's arithmetic, written out (``keep``: the dropout's kept weights, or None)."""
    if k.size(-3) != q.size(-3):  # grouped-query attention
        k, v = (x.repeat_interleave(q.size(-3) // x.size(-3), dim=-3) for x in (k, v))
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.size(-1) ** -0.5)
    low = torch.finfo(scores.dtype).min  # not -inf: a padding query that sees no key stays finite
    if causal:
        order = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril_()
        scores = scores.masked_fill(~order, low)
    if mask is not None:
        scores = scores.masked_fill(~mask, low) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1)
    if keep is not None:
        weights = weights * keep / (1.0 - dropout)
    return weights @ v


class _SdpaStandIn(torch.autograd.Function):
    """SDPA as a GPU runs it in training, dropout included: one counted operation forward (a
    fused attention kernel) and one backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout, scale, causal):
        with counted_as_one("scaled_dot_product_attention"):
            keep = None
            if dropout > 0:
                shape = (*q.shape[:-1], k.size(-2))
                keep = torch.rand(shape, device=q.device) >= dropout
            out = _attend(q, k, v, mask, keep, dropout, scale, causal)
            if out.dim() == 4:  # laid out as a GPU's fused kernels write it: [B, L, H, d] in memory
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, mask, keep)
        ctx.dropout, ctx.scale, ctx.causal = dropout, scale, causal
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, keep = ctx.saved_tensors
        with counted_as_one("scaled_dot_product_attention_backward"), torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _attend(*inputs, mask, keep, ctx.dropout, ctx.scale, ctx.causal)
            dq, dk, dv = torch.autograd.grad(out, inputs, grad)
        return dq, dk, dv, None, None, None, None


def _sdpa_stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _SdpaStandIn.apply(query, key, value, attn_mask, float(dropout_p), scale, bool(is_causal))


def _native_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` as a GPU runs it: ``native_dropout``, one kernel forward and one backward (a
    CPU's ``F.dropout`` is empty_like, bernoulli_, div_ and mul)."""
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


def gpu_kernels_on_cpu() -> None:
    """--gpu-kernels: attention and dropout counted as a GPU's training step runs them (both tools):
    SDPA and unpadded attention through stand-ins counted as one operation forward and one backward
    (a CPU's SDPA with dropout is its math path, a dozen operations each way, and it computes packed
    attention padded), dropout as ``native_dropout``. Once per process."""
    torch.nn.functional.scaled_dot_product_attention = _sdpa_stand_in
    torch.nn.functional.dropout = _native_dropout
    varlen_kernel_on_cpu()


def varlen_kernel_on_cpu() -> None:
    """Unpadded decoder calls attend through a stand-in for the flash variable-length kernel on a
    CPU in float32 too, counted as one operation forward and one backward, as a GPU's bf16 training
    step runs them (without it a CPU computes packed attention padded: the rows scattered to their
    padded places and gathered back, operations a GPU's step does not have). For --op-count."""
    from hmcl_cli.modeling import unpad

    unpad._varlen_kernel = lambda: _varlen_stand_in
    unpad.varlen_serves = lambda dtype, device_type, head_dim, dropout: dropout == 0.0 and head_dim % 8 == 0
    unpad._kernel_takes_call = lambda dtype, head_dim, dropout: dropout == 0.0 and head_dim % 8 == 0


def gpu_norm_kernels_on_cpu() -> None:
    """Make ``F.rms_norm`` one operation forward and one backward on a CPU too, as PyTorch's fused
    kernel (``aten::_fused_rms_norm``, CUDA) makes it on a GPU: CPU kernels for the fused
    operation and its backward, computed by PyTorch's own decompositions of them. For
    ``--op-count`` on a CPU, whose count is to stand for a GPU's launches (without this, a CPU's
    ``F.rms_norm`` is the same ~20 operations as transformers' RMSNorm code). Once per process."""
    from torch._decomp import decomposition_table

    global _NORM_LIBRARY
    if _NORM_LIBRARY is not None:
        return
    aten = torch.ops.aten
    if not has_fused_norm_decomposition():
        raise SystemExit(f"--op-count's stand-in for the fused RMSNorm kernel needs PyTorch's decomposition of "
                         f"aten::_fused_rms_norm (torch >= 2.10; this is {torch.__version__})")
    _NORM_LIBRARY = torch.library.Library("aten", "IMPL")
    for op in (aten._fused_rms_norm, aten._fused_rms_norm_backward):
        _NORM_LIBRARY.impl(op.__name__, decomposition_table[op.default], "CPU")


_NORM_LIBRARY = None


@contextlib.contextmanager
def two_d_masks(active: bool):
    """hmcl as before prepared attention masks (hmcl_cli/modeling/masks.py): the backbone gets
    the 2D padding mask and checks it each forward call (a host synchronisation on a GPU)."""
    from hmcl_cli.modeling.encoder import EmbeddingModel

    if not active:
        yield
        return
    real = EmbeddingModel.check_masks
    EmbeddingModel.check_masks = lambda self: False
    try:
        yield
    finally:
        EmbeddingModel.check_masks = real


@contextlib.contextmanager
def per_tensor_adamw(active: bool):
    """hmcl with the per-tensor AdamW it took on a CPU before its fused one (training/trainer.py)."""
    from hmcl_cli.training import trainer

    real = trainer.adamw
    if active:
        trainer.adamw = lambda groups: real(groups, fused=False)
    try:
        yield
    finally:
        trainer.adamw = real


def _sdpa_backends(choice: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = SDPBackend
    allowed = {"no-cudnn": [b.FLASH_ATTENTION, b.EFFICIENT_ATTENTION, b.MATH], "efficient": [b.EFFICIENT_ATTENTION],
               "flash": [b.FLASH_ATTENTION], "math": [b.MATH]}.get(choice)
    return sdpa_kernel(allowed) if allowed else contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(x: float) -> float:
    """A rate rounded to one decimal and at least three significant digits (0.114, 1.73, 24785.3)."""
    return round(x, max(1, 2 - math.floor(math.log10(x)))) if x > 0 else 0.0


def _result(secs, tokens, samples, device) -> dict:
    r = {"seconds": round(secs, 2), "tokens_per_s": rate(tokens / secs), "samples_per_s": rate(samples / secs)}
    if device.type == "cuda":
        r["peak_gib"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=["quickstart", "stsb"], default="quickstart")
    ap.add_argument("--shape", choices=["minilm", *SHAPES], default="minilm")
    ap.add_argument("--batch-size", type=int, default=None, help="anchors per step (quickstart 32, stsb 64)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--grad-cache-chunk", type=int, default=None)
    ap.add_argument("--attn", default=None, help="attn_implementation for hmcl (default sdpa)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tools", default="st,hmcl",
                    help="comma-separated: st, hmcl, hmcl-2d-mask (hmcl with the model's own 2D mask check), "
                    "hmcl-1fwd / hmcl-2fwd (train.one_forward true / false), hmcl-cudnn (model.cudnn_attention), "
                    "hmcl-per-tensor-adamw (hmcl without its fused AdamW), hmcl-padded / hmcl-unpad (model.unpad "
                    "false / true), hmcl-compiled (train.compile), hmcl-graphs (train.compile cuda-graphs: layers replayed "
                    "from CUDA graphs, padded), hmcl-unfused-norms (model.fused_norms false), "
                    "hmcl-unfused-rotary (model.fused_rotary false), hmcl-unfused (both false), "
                    "hmcl-unfused-proj / hmcl-fused-proj (model.fused_projections false / true; auto joins on a GPU), "
                    "hmcl-gpu-defaults (a GPU's auto settings: one forward call, joined projections, and on a CPU calls "
                    "padded where a GPU's attention dropout keeps them padded)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of hmcl's timed steps")
    ap.add_argument("--sync-audit", action="store_true",
                    help="print the operations that made the host wait for the device during hmcl's timed steps")
    ap.add_argument("--op-count", action="store_true",
                    help="count the ATen operations (views left out) each tool dispatches per timed step (on a "
                    "CPU with F.rms_norm as one operation, as a GPU's fused kernel runs it)")
    ap.add_argument("--gpu-kernels", action="store_true",
                    help="with --op-count on a CPU: count attention and dropout as a GPU's bf16 training step "
                    "runs them, one operation forward and one backward each (SDPA's fused kernels, dropout's "
                    "native_dropout, unpadded attention's flash variable-length kernel, through CPU stand-ins); "
                    "by default a CPU's SDPA with dropout is its math path, a dropout four operations, and "
                    "packed attention is computed padded")
    ap.add_argument("--sdpa", choices=["default", "no-cudnn", "efficient", "flash", "math"], default="default",
                    help="restrict SDPA's backends for both tools (torch.nn.attention.sdpa_kernel)")
    ap.add_argument("--no-warm-shapes", dest="warm_shapes", action="store_false",
                    help="time the steps after --warmup at once; by default each tool runs the timed batches "
                    "once untimed first, so that no shape is first seen in the timed region (kernel selection, "
                    "cuDNN attention plans, run-time compilation; on the H200 of 2026-12-04 the loop measured "
                    "7.1k tokens/s for the MiniLM shape on a machine started minutes before, 25.0k on one that "
                    "had run for minutes: the cause was not isolated)")
    ap.add_argument("--hmcl-loss", action="append", default=[], metavar="KEY=VALUE",
                    help="a loss setting for hmcl's rows, repeatable (e.g. matryoshka_dims=[256,128,64,32]); by "
                    "default hmcl trains the contrastive term alone, as the loop's MultipleNegativesRankingLoss")
    ap.add_argument("--precision", choices=["bf16", "fp16"], default="bf16",
                    help="autocast on a GPU for both tools (fp16 with a loss scale); a CPU runs fp32")
    args = ap.parse_args()
    _loss_settings(args.hmcl_loss)  # a malformed --hmcl-loss stops here, not after the loop's row
    args.batch_size = args.batch_size or (32 if args.data == "quickstart" else 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(torch.get_num_threads())
    if args.op_count and device.type == "cpu" and args.shape in SHAPES and SHAPES[args.shape][0] != "bert":
        gpu_norm_kernels_on_cpu()  # the decoders' RMSNorm (BERT-class shapes have none)
    if args.gpu_kernels:
        if not (args.op_count and device.type == "cpu"):
            raise SystemExit("--gpu-kernels is for --op-count on a CPU (a GPU runs its kernels itself)")
        gpu_kernels_on_cpu()
    rows, group, q_len, d_len = examples(args.data)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build_model(args.shape, tmp / "model")
        from transformers import AutoConfig, AutoModel

        with torch.device("meta"):  # count without loading the weights (8B shapes)
            shaped = AutoModel.from_config(AutoConfig.from_pretrained(path))
            params = sum(p.numel() for p in shaped.parameters())
            matmul_params = params - shaped.get_input_embeddings().weight.numel()  # what MFU counts
        for tool in args.tools.split(","):
            torch.manual_seed(0)
            with _sdpa_backends(args.sdpa):
                if tool == "st":
                    results["sentence-transformers loop"] = run_st(path, rows, group, q_len, d_len, args, device)
                elif tool in TOOL_NAMES:
                    try:
                        with two_d_masks(tool == "hmcl-2d-mask"), per_tensor_adamw(tool == "hmcl-per-tensor-adamw"):
                            results[TOOL_NAMES[tool]] = run_hmcl(path, rows, group, q_len, d_len, args, device,
                                                                 tmp / tool, model_extra=tool_model(tool, shaped.config, device),
                                                                 train_extra=TOOL_TRAIN.get(tool))
                    except Exception:  # noqa: BLE001 - an experimental row's failure, printed whole
                        if tool not in EXPERIMENTAL_TOOLS:
                            raise
                        traceback.print_exc()
                        print(f"result {TOOL_NAMES[tool]}: failed (traceback above)", flush=True)
                        continue
                else:
                    ap.error(f"unknown tool {tool!r} (st, {', '.join(TOOL_NAMES)})")
            name = "sentence-transformers loop" if tool == "st" else TOOL_NAMES[tool]
            # each tool's result as it ends: a run cut off by a time limit keeps the tools it finished
            print(f"result {name}: {json.dumps(results[name])}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{args.shape} on {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'fp32'}), "
          f"data {args.data}, batch {args.batch_size} anchors x {group} candidates, {args.steps} timed steps, "
          f"{params / 1e6:.0f}M parameters ({matmul_params / 1e6:.0f}M outside the embeddings){', LoRA' if args.lora else ''}{', checkpointing' if args.checkpointing else ''}")
    st = results.get("sentence-transformers loop")
    for name, r in results.items():
        ratio = (f"samples {r['samples_per_s'] / st['samples_per_s']:.2f}x, tokens {r['tokens_per_s'] / st['tokens_per_s']:.2f}x"
                 if st else "-")
        mfu = ""
        if device.type == "cuda" and args.shape.startswith("qwen"):
            # model FLOPs per token: forward 2P + backward 4P (full) or 2P (LoRA: no weight gradients)
            flops = (4 if args.lora else 6) * matmul_params
            mfu = f" MFU {flops * r['tokens_per_s'] / H100_BF16_FLOPS:.1%}"
        extra = "".join(f" {k} {v}" for k, v in r.items() if k in ("peak_gib", "run_peak_gib", "planned_gib", "mask"))
        print(f"{name:<28} tokens/s {r['tokens_per_s']:>10} samples/s {r['samples_per_s']:>8} vs ST: {ratio}{mfu}{extra}")
    for name, r in results.items():
        if "ops" in r:
            vs = f" ({r['ops']['total'] / st['ops']['total']:.2f}x ST)" if st and "ops" in st else ""
            print(f"{name:<28} ATen ops per step outside the optimizer {r['ops']['total']}{vs}, in it "
                  f"{r['ops']['optimizer']}; most frequent: "
                  + ", ".join(f"{k} {v}" for k, v in r["ops"].items() if k not in ("total", "optimizer")))
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
