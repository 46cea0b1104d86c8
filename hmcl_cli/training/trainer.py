"""The HMCL training recipe: one class, ``setup`` -> ``train`` -> ``save_final``.

    hmcl train recipes/quickstart.yaml

What a step does:

1. The step's batch (anchors + a sampled group of graded candidates each) is a deterministic
   function of (seed, epoch, step); texts were tokenised once before training (cached on disk);
   each distinct text is encoded once per step; padding is dynamic (multiple of 8). With
   ``model.segments`` a long text is several sequences (its segments), averaged back into the
   text's embedding inside the loss graph; ``loss.local_weight`` adds the segment-level term.
2. Anchors and candidates are embedded (bf16 autocast on GPU, fp16 with a loss scale on GPUs
   without native bf16, fp32 on CPU) — in one forward
   call where ``train.one_forward`` says so, else one per side; with several processes they
   are gathered *with gradients*, so in-batch negatives span every GPU.
3. :class:`~hmcl_cli.losses.HMCLLoss` gives the loss; with ``train.grad_cache_chunk`` the
   embeddings are computed in chunks without a graph first and re-computed chunk by chunk
   for the backward pass (GradCache), which gives the same loss and gradients as the plain
   batch at a fraction of the memory.
4. Gradients are averaged over processes, (unscaled under fp16,) clipped, and fused AdamW steps
   with warmup + decay (backbone at ``learning_rate``, loss parameters at ``head_learning_rate``).

Every ``eval_steps`` the dev split is scored (retrieval nDCG@10, reranking MAP, Spearman) and
the best model kept; every ``save_steps`` (and when ``save_minutes`` have passed since the last
one) a checkpoint (weights, optimizer, scheduler, RNG and data position, with a checksum
manifest) is written atomically, so ``--resume`` continues exactly; it keeps the recipe too, and
is the model at its step for ``hmcl eval --model`` and ``hmcl export --model``
(:mod:`hmcl_cli.training.saved_model`). Ctrl-C / SIGTERM saves a checkpoint before exiting (with
several processes, all after the same step: they agree each step whether to stop). Metrics go to
``metrics.jsonl`` and any accelerate trackers named in the recipe.

Python use::

    trainer = HMCLTrainer(load_recipe("recipes/quickstart.yaml"))
    trainer.setup(resume=False)
    trainer.train()
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.functional import normalize
from torch.profiler import record_function

from hmcl_cli.console import ProgressBar, log, warn
from hmcl_cli.data.prepare import iter_graded, load_graded
from hmcl_cli.errors import MEMORY_HINT, DataError, InterruptedRun, OutOfMemoryError, RecipeError, TrainingDivergedError
from hmcl_cli.evaluation.graded import evaluate_graded, metric_names, undefined_metrics
from hmcl_cli.io_utils import atomic_path, file_sha256, json_text, write_json_atomic
from hmcl_cli.losses import HMCLLoss, PairBatch
from hmcl_cli.losses.ranking import describe_ranking_pairs
from hmcl_cli.modeling.encoder import EmbeddingModel, autocast_for, resolve_precision, training_dtype
from hmcl_cli.modeling.graph_shapes import GraphShapes
from hmcl_cli.modeling.layers import compile_layers, enable_checkpointing
from hmcl_cli.modeling.lora import apply_lora, is_peft
from hmcl_cli.modeling.segments import aggregate
from hmcl_cli.recipe import Recipe, suggest
from hmcl_cli.training import user_command
from hmcl_cli.training.batching import AnchorTable, BatchPlan, StepBatches, TrainData, group_fill, resolve_positive_repeats, with_positive
from hmcl_cli.training.saved_model import CHECKPOINT_RECIPE, checkpoint_recipe_yaml, write_trained_model
from hmcl_cli.training.distributed import average_gradients, gather_plain, gather_sizes, gather_with_grad
from hmcl_cli.training.memory import ONE_FORWARD_PADDING, one_forward_mode, plan_memory, predicts_unpadded, resolve_chunk
from hmcl_cli.training.sharding import clip_grad_norm, full_state, is_sharded, like, load_optimizer_state, optimizer_state_full


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool = True, accelerator: Any = None):
        self.path, self.enabled, self.accelerator = path, enabled, accelerator

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_text(record) + "\n")  # a NaN (a diverged loss) as null: standard JSON
        if self.accelerator is not None and self.accelerator.trackers:
            step = record.get("step")
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


TRAJECTORY_KEYS = ("epochs", "max_steps", "batch_size", "group_size", "learning_rate", "head_learning_rate",
                   "weight_decay", "warmup_ratio", "scheduler", "max_grad_norm", "gradient_accumulation_steps",
                   "batch_by_source", "positive_repeats", "group_by_length", "precision")


def trajectory_settings(recipe) -> dict:
    """The settings a training's course depends on (kept in each checkpoint, compared on
    ``--resume``): the loss, the seed, the sources' weights, the train keys of TRAJECTORY_KEYS and
    the model's encoding keys with its LoRA and dtype; not the knobs that compute the same steps
    another way (unpad, fused kernels, GradCache, compile) nor logging, evaluation and checkpoint
    cadence."""
    from hmcl_cli.data.origin import ENCODING_KEYS

    dump = recipe.model_dump(mode="json")
    return {"train": {k: dump["train"][k] for k in TRAJECTORY_KEYS},
            "model": {k: dump["model"][k] for k in (*ENCODING_KEYS, "lora", "dtype")},
            "loss": dump["loss"], "seed": recipe.seed, "weights": [s.weight for s in recipe.data.sources]}


class HMCLTrainer:
    """Trains an embedding model with the HMCL objective as one recipe describes."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.train
        self.run_dir = recipe.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.best_metric: Optional[float] = None
        self.best_step: Optional[int] = None
        self.start_metric: Optional[float] = None  # metric_for_best before the first step
        self.best_key = self.cfg.metric_for_best  # `auto` is resolved against the dev set in setup
        self.evals_without_improvement = 0
        self._early_stopped = False
        self._stop_signal: Optional[int] = None
        self._cpu_group: Any = None  # several processes: where they agree (_stop_agreed, _check_finite, _save_due)
        self._saved_at = time.monotonic()  # when the last checkpoint was written (train.save_minutes)

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False, model: Optional[EmbeddingModel] = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        r, cfg = self.recipe, self.cfg
        trackers = [t for t in cfg.trackers if _tracker_available(t)]
        # cpu=True on a machine without CUDA: several processes then form a gloo group (MULTI_CPU)
        # instead of each silently training alone
        self.accelerator = Accelerator(log_with=trackers or None, cpu=not torch.cuda.is_available(),
                                       project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        acc = self.accelerator
        fsdp_config = _check_distributed_setup(acc)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.sharded = (cfg.fsdp or fsdp_config) and self.world > 1
        # a CPU group for what the processes must agree on each step or log step (_stop_agreed,
        # _check_finite, _save_due): no device sync to read it
        self._cpu_group = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        if cfg.fsdp and self.world == 1 and self.is_main:
            log("train.fsdp: one process, nothing to shard (it takes effect with several)")
        if fsdp_config and self.is_main:
            log("accelerate FSDP config: hmcl shards with its own FSDP2 set-up (train.fsdp); "
                "the config's fsdp_* settings are not read")
        if trackers:
            acc.init_trackers(r.name, config=json.loads(json.dumps(r.model_dump(mode="json"), default=str)))
        self.precision = resolve_precision(cfg.precision, self.device.type)
        if self.device.type == "cpu" and cfg.precision in ("bf16", "fp16"):
            warn("bf16/fp16 autocast on a CPU is ~100x slower; using fp32 on CPU")
        _seed_everything(r.seed)

        self.memory_plan = None
        self.joins_unpadded = False  # set by setup: steps unpadded by the varlen kernel join both sides
        self.cuda_graphs = cfg.compile == "cuda-graphs"  # layers replayed from CUDA graphs: a generation per step
        built_here = model is None
        if built_here:
            model = EmbeddingModel.from_recipe(r.model, r.base_dir, dtype=training_dtype(r.model, self.device.type))
        else:
            model.apply_run_settings(r.model)
        if self.cuda_graphs:
            model.unpad = False  # a graph replays one shape: unpadded calls change theirs every step
        self.model = model
        # forward calls padded to few shapes, a graph each (graph_shapes.py); None: as the batch is
        self.graph_shapes = GraphShapes(model) if self.cuda_graphs else None
        if self.cuda_graphs and self.device.type != "cuda" and self.is_main:
            warn(f"train.compile cuda-graphs: no CUDA device ({self.device.type}), so no graphs are recorded: the "
                 "layers are compiled as with `true`, and forward calls still run padded to the graphs' shapes")
        model.settings.matryoshka_dims = list(r.loss.matryoshka_dims)  # saved with it: eval and export read them
        # what the objective trains: cosines of normalised embeddings, else dot products (saved with it)
        model.settings.similarity = "cosine" if model.settings.normalize else "dot"
        if r.model.gradient_checkpointing:
            enable_checkpointing(self.model.backbone)
        if r.model.lora.enabled and not is_peft(self.model.backbone):
            self.model.backbone = apply_lora(self.model.backbone, r.model.lora, r.model.name_or_path)
        try:
            self.loss_fn = HMCLLoss(r.loss, self.model.dim).to(self.device)
        except ValueError as e:
            raise RecipeError(str(e), hint="fix the loss section of the recipe") from None

        train_path = self.run_dir / "data" / "train.jsonl"
        examples = iter_graded(train_path)  # read as the training data is built: never all held at once
        dev_path = self.run_dir / "data" / "dev.jsonl"
        self.dev = load_graded(dev_path) if dev_path.is_file() else []
        self.dev_undefined = self._check_dev_metrics(dev_path) if self.dev else {}
        self.data_sha256 = file_sha256(train_path)  # in every checkpoint: --resume checks it trains on the same data
        self.data = TrainData(examples, self.model, self.run_dir / "cache", data_key=self.data_sha256,
                              check=lambda anchors: self._check_anchors(train_path, anchors))
        auto_chunk = cfg.grad_cache_chunk == "auto"
        if (self.is_main and built_here) or auto_chunk:  # before the weights go to the device: the worst step
            self._print_memory_plan(self.data.longest(), self.data.segments_per_text())
        if auto_chunk and self.is_main:
            log(f"train.grad_cache_chunk auto: {f'chunks of {self.chunk} texts' if self.chunk else 'the whole batch at once'}"
                f"{' (no device memory limit known)' if self.memory_plan is None or not self.memory_plan.capacity else ''}")
        if self.sharded:  # before .to(device): each process moves only its shard
            from hmcl_cli.training.sharding import shard_backbone

            compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
            units = shard_backbone(self.model.backbone, self.device, self.world, compute)
            if self.is_main:
                log(f"fsdp: weights, gradients and optimizer state sharded over {self.world} processes "
                    f"({units} layer units{'; LoRA adapters replicated' if r.model.lora.enabled else ''})")
        self.model.to(self.device)
        self.model.check_masks()  # its probe runs in eval mode: before compiling, which would recompile for it
        if self.model.unpad is not False and self.model.unpad_refusal() and getattr(self.memory_plan, "real_tokens", None):
            # planned unpadded, but the model runs padded: plan again (and grad_cache_chunk auto with it)
            self._print_memory_plan(self.data.longest(), self.data.segments_per_text(), unpadded=False)
        self.joins_unpadded = self.model.trains_with_varlen(self.device.type, self.precision)
        if cfg.compile:
            n = compile_layers(self.model.backbone, mode="reduce-overhead" if self.cuda_graphs else None)
            if self.is_main:
                log(f"train.compile: {n} layers compiled on first use (dynamic shapes"
                    + ("; reduce-overhead: a CUDA graph per input shape, forward calls padded to few shapes: "
                       "rows and widths of multiples of 8 up to 128, then 8 sizes per doubling)"
                       if self.cuda_graphs else ")"))
        self.positive_repeats = resolve_positive_repeats(cfg.positive_repeats, self.data.anchors)
        if cfg.positive_repeats == "auto" and self.is_main:
            n, total = with_positive(self.data.anchors), len(self.data.anchors)
            log(f"train.positive_repeats auto: {self.positive_repeats} ({n} of {total} anchors have a positive"
                f"{'; each listed twice per epoch' if self.positive_repeats > 1 else ''})")
        weights = self._source_weights()
        try:
            self.plan = BatchPlan(self.data, cfg.batch_size, r.seed, self.world, group_by_length=cfg.group_by_length,
                                  by_source=cfg.batch_by_source, positive_repeats=self.positive_repeats,
                                  source_weights=weights)
        except ValueError as e:
            raise DataError(f"{train_path}: {e}", hint="lower train.batch_size") from None
        if any(w != 1.0 for w in weights) and self.is_main:
            log("train: sources per epoch (data.sources[].weight): " + ", ".join(
                f"{name} {n} anchors x {w:g}" for name, n, w in self._source_mix(weights))
                + f" = {self.plan.anchors_per_epoch} anchors per epoch"
                + (f" (anchors with a positive listed {self.positive_repeats}x: train.positive_repeats)"
                   if self.positive_repeats > 1 else ""))
        steps_epoch = self.plan.steps_per_epoch // cfg.gradient_accumulation_steps or 1
        self.total_steps = cfg.max_steps or max(1, math.ceil(steps_epoch * cfg.epochs))
        self.eval_every = cfg.eval_steps or steps_epoch
        self.save_every = cfg.save_steps or steps_epoch

        backbone_params = [p for p in self.model.parameters() if p.requires_grad]
        head_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        groups = []
        # sharded (FSDP) and whole tensors in separate groups: the fused AdamW kernel takes one kind
        # per call (a sentence-transformers Dense head stays whole beside the sharded backbone)
        for sharded in (True, False):
            kind = [p for p in backbone_params if is_sharded(p) == sharded]
            groups += [{"params": [p for p in kind if p.ndim >= 2], "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
                       {"params": [p for p in kind if p.ndim < 2], "lr": cfg.learning_rate, "weight_decay": 0.0}]
        if head_params:
            groups.append({"params": head_params, "lr": cfg.head_learning_rate, "weight_decay": 0.0})
        self.optimizer = adamw([g for g in groups if g["params"]])
        self.scaler = self._loss_scaler()
        self.trainable = backbone_params + head_params
        self.replicated = [p for p in self.trainable if not is_sharded(p)]  # FSDP reduces the others itself
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg.scheduler, warmup, self.total_steps))

        if not resume and self.is_main:
            self._start_over()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main, acc)
        if resume:
            self._resume()
        per_device = min(cfg.batch_size, max(1, len(self.data.anchors) // self.world))  # less data than a batch
        n_cand = per_device * self.world * cfg.group_size
        if self.is_main:
            log(f"train: {len(self.data.anchors)} anchors, {self.data.n_docs} distinct candidates, "
                f"{self.total_steps} steps, {self.world} process(es) on {self.device.type}, {self.precision}"
                f"{' with a dynamic loss scale' if self.scaler else ''}")
            log(f"train: embedding: {self.model.describe()}"
                f"{'; the layers after the pooling train with the backbone' if len(self.model.head) else ''}")
            filled = group_fill(self.data.anchors, cfg.group_size)
            short = (f"; the data fills {filled:.1f} of the {cfg.group_size} per anchor on average, so about "
                     f"{round(n_cand * filled / cfg.group_size)} (more with `hmcl mine`)" if filled < cfg.group_size - 0.05 else "")
            log(f"train: in-batch candidates per anchor: up to {n_cand} "
                f"({per_device} anchors x {cfg.group_size} candidates x {self.world} process(es)"
                f"{f'; the data has only {len(self.data.anchors)} anchors' if per_device < cfg.batch_size else ''}"
                f"{', gathered across devices' if self.world > 1 and r.loss.gather_across_devices else ''}){short}")
            calls = self._forward_calls()
            if calls:
                log(f"train: {calls}")
            refusal = self.model.mask_refusal()
            log("train: attention mask: " + (f"2D, checked by the model each forward call ({refusal})" if refusal else
                                             "4D, prepared by hmcl (no padding check in the model's forward)"))
            log(f"train: {self.model.unpad_summary(self.device.type, self.precision)}")
            if self.model.norm_fusion.fused or self.model.norm_fusion.refused:
                log(f"train: norms: {self.model.norm_fusion.summary()}")
            if self.model.rotary_fusion.fused or self.model.rotary_fusion.refused:
                log(f"train: rotary: {self.model.rotary_fusion.summary()}")
            if self.model.projection_fusion.active_on(self.device.type):
                log(f"train: projections: {self.model.projection_fusion.summary()}")
            if r.loss.ranking_weight > 0:
                ranking = describe_ranking_pairs(self.data.anchors, r.loss.ranking_pairs, r.loss.use_scores)
                if ranking:
                    log(f"train: {ranking}")

    @property
    def chunk(self) -> Optional[int]:
        """The GradCache chunk of a step (None: the whole batch): ``train.grad_cache_chunk``, with
        ``auto`` resolved by the memory plan."""
        return resolve_chunk(self.cfg.grad_cache_chunk, self.memory_plan)

    def _source_weights(self) -> list[float]:
        """``data.sources[].weight`` per source of the training data (``Anchor.source``); 1 for
        examples whose source the recipe does not name. A weighted source that no training example
        comes from is a warning: its weight would change nothing."""
        from hmcl_cli.data.readers import source_labels

        by_label = dict(zip(source_labels(self.recipe.data.sources), (s.weight for s in self.recipe.data.sources)))
        present = set(self.data.source_names)
        for i, (label, w) in enumerate(by_label.items()):
            if w != 1.0 and label not in present and self.is_main:
                warn(f"data.sources.{i}.weight {w:g}: no training example comes from source {label!r} (a dev/test "
                     "source, or data prepared before the source was renamed: run hmcl prepare); it changes nothing")
        return [by_label.get(name, 1.0) for name in self.data.source_names]

    def _source_mix(self, weights: list[float]) -> list[tuple[str, int, float]]:
        """(source label, its training anchors, weight) for the start-of-training line."""
        counts = np.bincount(self.data.anchors.source, minlength=len(self.data.source_names)).tolist()
        return [(str(name), counts[i], weights[i]) for i, name in enumerate(self.data.source_names)]

    def _print_memory_plan(self, longest: tuple[int, int], segments: tuple[int, int], unpadded: Optional[bool] = None) -> None:
        """The memory plan of this run (``unpadded``: whether forward calls are; None: as predicted
        before the model is loaded)."""
        try:
            if unpadded is None:
                unpadded = predicts_unpadded(self.recipe, self.device, self.model.backbone.config)
            tokens = self.data.heaviest_step(self.cfg.batch_size, self.cfg.group_size) if unpadded else None
            plan = plan_memory(self.recipe, self.device, longest=longest, segments=segments,
                               shards=self.world if self.sharded else 1, real_tokens=tokens,
                               head_params=sum(p.numel() for p in self.model.head.parameters()))
        except Exception as e:  # noqa: BLE001 - an estimate must never stop training
            if self.is_main:
                log(f"memory plan skipped ({type(e).__name__}: {e})")
            return
        self.memory_plan = plan
        if not self.is_main:  # computed here only for train.grad_cache_chunk: auto
            return
        log(plan.summary())
        if not plan.fits:
            warn("the estimate exceeds this device's memory; to fit: " + "; ".join(plan.advice))

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        steps_epoch = self.plan.steps_per_epoch
        accum = cfg.gradient_accumulation_steps
        running: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), dtype=torch.long)
        nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        t_log = time.perf_counter()
        finished = self.step >= self.total_steps  # resumed from the last checkpoint of a finished training
        if finished and self.is_main:
            log(f"train: finished before ({self.step} of {self.total_steps} steps in the checkpoint); nothing to train")
        bar = ProgressBar("train", self.total_steps, "steps", enabled=self.is_main and not finished)
        bar.update(self.step)
        if self.dev and self.step == 0 and cfg.eval_at_start:
            self._evaluate_at_start()
        self.model.train()
        self.loss_fn.train()
        self._saved_at = time.monotonic()
        with self._signals():
            micro = self.step * accum
            while self.step < self.total_steps:
                epoch, start = divmod(micro, steps_epoch)
                # its own generator: a loader's iterator draws its workers' seed from the generator it
                # is given, else from the global one, which dropout reads; drawn from that, a run
                # resumed mid-epoch (a new loader) would go on with other dropout masks than the
                # uninterrupted run
                loader = torch.utils.data.DataLoader(
                    StepBatches(self.data, self.model, self.plan, epoch, start, cfg.group_size, self.rank),
                    batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                    pin_memory=self.device.type == "cuda", persistent_workers=False,
                    generator=torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + epoch))
                for batch in loader:
                    loss, parts = self._forward_backward(batch, scale=1.0 / accum)
                    tokens += batch["n_tokens"]
                    for k, v in parts.items():
                        running[k] = running.get(k, 0.0) + v
                    running["loss"] = running.get("loss", 0.0) + loss.detach()
                    bad = ~torch.isfinite(loss.detach())
                    # remember the first bad step on the device: no host sync until the log interval
                    nonfinite_step = torch.where(bad & (nonfinite_step < 0), nonfinite_step.new_full((), self.step + 1), nonfinite_step)
                    micro += 1
                    if micro % accum:
                        continue
                    self._optimizer_step()
                    self.step += 1
                    postfix = None  # the progress line of a log step shows that step's record, not the last one
                    timed = False  # train.save_minutes passed since the last checkpoint
                    if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
                        self._check_finite(nonfinite_step)
                        timed = self._save_due()
                        elapsed = time.perf_counter() - t_log
                        n = cfg.log_steps if self.step % cfg.log_steps == 0 else self.step % cfg.log_steps
                        record = {"step": self.step, "epoch": round(micro / steps_epoch, 3),
                                  "lr": self.scheduler.get_last_lr()[0],
                                  **{k: round(float(v) / (n * accum), 5) for k, v in running.items()},
                                  "tokens_per_s": round(float(tokens) * self.world / max(elapsed, 1e-9), 1)}
                        if self.recipe.loss.classifier == "ordinal" and self.recipe.loss.classification_weight > 0:
                            th = self.loss_fn.classification.thresholds().detach().cpu().tolist()
                            record["thresholds"] = [round(x, 4) for x in th]
                        self.metrics.write(record)
                        postfix = f"loss {record['loss']:.4f} (step {self.step})"  # shown until the next log step
                        running, tokens, t_log = {}, torch.zeros((), dtype=torch.long), time.perf_counter()
                    bar.update(1, postfix=postfix)
                    if self.dev and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                        if self._evaluate_and_keep_best():
                            break
                    if self.step % self.save_every == 0 or self.step == self.total_steps or timed:
                        self.save_checkpoint()
                    if self._stop_agreed():
                        self.save_checkpoint()
                        raise InterruptedRun(
                            f"training stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved",
                            hint=f"continue with `hmcl {user_command()} RECIPE --resume` (with the same --set options)")
                    if self.step >= self.total_steps or self._early_stopped:
                        break
                if self._early_stopped:
                    break
        bar.close()
        if self.graph_shapes is not None and self.is_main:
            log(f"train.compile cuda-graphs: {self.graph_shapes.summary(self.device.type == 'cuda')}")
        return {"steps": self.step, "best_metric": self.best_metric, "best_step": self.best_step}

    def _forward_backward(self, batch: dict, scale: float) -> tuple[torch.Tensor, dict]:
        dev = self.device
        if self.cuda_graphs:  # a new step: the graphs' outputs of the last one are not read again
            torch.compiler.cudagraph_mark_step_begin()
        # real tokens per row of each side, by its mask's key, counted on the host that built the
        # batch (unpadded forward calls), in numpy: no tensor op, which on a device batch would wait
        lengths = {key: batch[key].numpy().sum(1) for key in ("q_attention_mask", "c_attention_mask")}
        with record_function("hmcl.to_device"):
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        chunk = self.chunk
        sizes = self._step_sizes(batch, chunk)
        try:
            with self.model.attention_backends():  # the backward too: checkpointed layers run again there
                return self._step(batch, chunk, scale, sizes, lengths)
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(f"out of GPU memory at step {self.step + 1}", hint=MEMORY_HINT) from None

    def _step(self, batch: dict, chunk: Optional[int], scale: float, sizes: Optional[list[list[int]]],
              lengths: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict]:
        """One step's forward and backward passes (GradCache's when ``chunk``); ``lengths``: each
        side's real tokens per row (by its mask's key), on the host."""
        if chunk:
            return self._grad_cache_step(batch, chunk, scale, sizes, lengths)
        n_q, n_c = (int(lengths[key].sum()) for key in ("q_attention_mask", "c_attention_mask"))
        with record_function("hmcl.forward"), autocast_for(self.device, self.precision):
            if self._one_forward(batch):
                rows = batch["q_input_ids"].size(0)
                ids, mask, skip = self._joined(batch)
                units = self._units(ids, mask, n_q + n_c, skip)
                q, c = units[:rows], units[rows:]
            else:
                q = self._units(batch["q_input_ids"], batch["q_attention_mask"], n_q, batch.get("q_pool_skip"))
                c = (self._units(batch["c_input_ids"], batch["c_attention_mask"], n_c, batch.get("c_pool_skip"))
                     if batch["c_input_ids"].size(0) else q.new_zeros((0, q.size(1))))
        with record_function("hmcl.loss"):
            loss, parts = self.loss_fn(self._pair_batch(q, c, batch, sizes))
        self._backward(loss * scale)
        return loss, parts

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward from the loss, scaled by fp16's loss scale (its gradients would underflow)."""
        with record_function("hmcl.backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _loss_scaler(self) -> Optional[Any]:
        """fp16 autocast trains with a dynamic loss scale: the loss is multiplied before the
        backward pass so small gradients do not underflow in float16, the gradients are divided
        again before clipping, and a step whose gradients overflowed is skipped (the scale halves;
        it doubles after 2,000 good steps). bf16 and fp32 need none."""
        if self.precision != "fp16":
            return None
        if self.sharded:
            raise RecipeError("train.precision fp16 with train.fsdp: loss scaling of sharded gradients is not supported",
                              hint="use train.precision bf16 (GPUs since Ampere), or train without train.fsdp")
        half = [n for n, p in self.model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise RecipeError(f"train.precision fp16 trains float16 weights ({half[0]}, ...), whose gradients loss "
                              "scaling cannot unscale", hint="set model.dtype: auto (float32 weights under fp16 autocast)")
        if not hasattr(torch.amp, "GradScaler"):  # torch < 2.3
            return torch.cuda.amp.GradScaler()
        return torch.amp.GradScaler(self.device.type)

    def _one_forward(self, batch: dict) -> bool:
        """Whether this step encodes both sides in one forward call (``train.one_forward``); decided
        from the tensors' shapes, which the host knows without asking the device."""
        (n_q, w_q), (n_c, w_c) = batch["q_input_ids"].shape, batch["c_input_ids"].shape
        mode = one_forward_mode(self.cfg.one_forward, self.device.type, self.sharded)
        if not n_c or mode == "never":
            return False
        if mode == "always" or self.joins_unpadded:  # unpadded by the varlen kernel: joining pads nothing
            return True
        width = max(w_q, w_c)
        extra = n_q * (width - w_q) + n_c * (width - w_c)
        return extra <= ONE_FORWARD_PADDING * (n_q * w_q + n_c * w_c)

    def _forward_calls(self) -> str:
        """What ``train.one_forward`` does in this run, for the start of training ('' = the usual
        one call per side)."""
        mode = one_forward_mode(self.cfg.one_forward, self.device.type, self.sharded)
        if self.chunk or mode == "never":
            return ""
        if mode == "always":
            return "anchors and candidates in one forward call per step (train.one_forward)"
        if self.joins_unpadded:
            return "anchors and candidates in one forward call per step (train.one_forward auto: unpadded, it adds no padding)"
        return (f"anchors and candidates in one forward call where that adds at most "
                f"{ONE_FORWARD_PADDING:.0%} padded tokens to the step, else one per side (train.one_forward auto)")

    def _joined(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Both sides' rows as one batch (queries first), padded to the wider side; and the rows'
        pooling skips, if any."""
        width = max(batch["q_input_ids"].size(1), batch["c_input_ids"].size(1))
        if self.graph_shapes is not None:  # at once to the graph's width: no second widening
            width = self.graph_shapes.width(width)
        q = self.model.widen(batch["q_input_ids"], batch["q_attention_mask"], width)
        c = self.model.widen(batch["c_input_ids"], batch["c_attention_mask"], width)
        skip = torch.cat([batch["q_pool_skip"], batch["c_pool_skip"]]) if "q_pool_skip" in batch else None
        return torch.cat([q[0], c[0]]), torch.cat([q[1], c[1]]), skip

    def _step_sizes(self, batch: dict, chunk: Optional[int]) -> Optional[list[list[int]]]:
        """Every process's counts for this step — anchors, candidates, pairs, query rows, candidate
        rows (rows are segments with ``model.segments``) — in one exchange, so one read-back per
        step; None when neither the cross-process gather nor sharded GradCache needs them."""
        if self.world == 1 or not (self.recipe.loss.gather_across_devices or (self.sharded and chunk)):
            return None
        keys = ("anchor_hash", "candidate_hash", "pair_anchor", "q_input_ids", "c_input_ids")
        return gather_sizes([batch[k].size(0) for k in keys], self.device)

    def _units(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_real: Optional[int] = None,
               pool_skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward call: the texts' embeddings, or with segments the segments' pooled states
        (float32, before averaging and normalisation, which :meth:`_pair_batch` does). ``n_real``:
        the call's real tokens, known on the host (unpadded forward calls on a GPU need it);
        ``pool_skip``: the rows' leading tokens the pooling leaves out (a prompt's). With
        ``train.compile: cuda-graphs`` the call runs at one of few shapes (:class:`GraphShapes`)."""
        rows = input_ids.size(0)
        if self.graph_shapes is not None:  # padded calls: n_real is not read
            input_ids, attention_mask, pool_skip = self.graph_shapes.fill(input_ids, attention_mask, pool_skip)
        if self.data.segments is None:
            units = self.model(input_ids, attention_mask, n_real, pool_skip)
        else:
            units = self.model.pooled(input_ids, attention_mask, n_real, pool_skip).float()
        # the filler rows of GraphShapes dropped; not sliced otherwise: a slice's backward is a copy
        return units[:rows] if units.size(0) != rows else units

    def _texts(self, units: torch.Tensor, batch: dict, side: str, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Text embeddings [n, D] from a side's units, and its normalised segment embeddings when
        the local term needs them."""
        if self.data.segments is None:
            return units, None
        emb = aggregate(units, batch[f"{side}_segment_owner"], batch[f"{side}_segment_weight"], n)
        if self.model.settings.normalize:
            emb = normalize(emb, dim=-1)
        return emb, (normalize(units, dim=-1) if self.recipe.loss.local_weight > 0 else None)

    def _pair_batch(self, q_units: torch.Tensor, c_units: torch.Tensor, batch: dict,
                    sizes: Optional[list[list[int]]]) -> PairBatch:
        """The loss's batch; with ``sizes`` (:meth:`_step_sizes`) gathered from every process."""
        pa, pc = batch["pair_anchor"], batch["pair_candidate"]
        ah, ch = batch["anchor_hash"], batch["candidate_hash"]
        lvl, sc = batch["pair_level"], batch["pair_score"]
        q, q_seg = self._texts(q_units, batch, "q", ah.size(0))
        c, c_seg = self._texts(c_units, batch, "c", ch.size(0))
        q_own = batch.get("q_segment_owner") if q_seg is not None else None
        c_own = batch.get("c_segment_owner") if c_seg is not None else None
        if sizes is not None and self.recipe.loss.gather_across_devices:
            qs, cs, ps, qss, css = sizes
            q_off, c_off = sum(qs[: self.rank]), sum(cs[: self.rank])  # ints: no host-to-device copy
            q, c = gather_with_grad(q, qs), gather_with_grad(c, cs)
            pa, pc = gather_plain(pa + q_off, ps), gather_plain(pc + c_off, ps)
            lvl, sc = gather_plain(lvl, ps), gather_plain(sc, ps)
            ah, ch = gather_plain(ah, qs), gather_plain(ch, cs)
            if q_seg is not None:  # segments of every process, owners shifted to the gathered rows
                q_seg, c_seg = gather_with_grad(q_seg, qss), gather_with_grad(c_seg, css)
                q_own, c_own = gather_plain(q_own + q_off, qss), gather_plain(c_own + c_off, css)
        return PairBatch(q, c, pa, pc, lvl, sc, ah, ch, q_seg, q_own, c_seg, c_own)

    def _grad_cache_step(self, batch: dict, chunk: int, scale: float, sizes: Optional[list[list[int]]],
                         lengths: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict]:
        """GradCache (Gao et al. 2021): loss on graph-free embeddings, then chunked re-encoding.
        With segments the chunks are segments; averaging them into texts is part of the loss graph.
        Under FSDP every forward and backward pass is collective, so all processes run as many
        chunks as the process with the most; the extra ones re-encode one row and add nothing."""
        sides = [("q_input_ids", "q_attention_mask"), ("c_input_ids", "c_attention_mask")]
        rows = [batch[ids_key].size(0) for ids_key, _ in sides]
        every = sizes[3:] if self.sharded else [[n] for n in rows]  # rows of each side on every process
        rounds = [max(-(-n // chunk) for n in side) for side in every]
        filler = next((ids_key, mask_key) for (ids_key, mask_key), n in zip(sides, rows) if n)

        def encode(ids_key: str, mask_key: str, i: int) -> tuple[torch.Tensor, bool]:
            """Chunk i of a side's units, or a filler forward (one row) past the side's last chunk."""
            real = i * chunk < batch[ids_key].size(0)
            (ids, mask), part = ((ids_key, mask_key), slice(i * chunk, (i + 1) * chunk)) if real else (filler, slice(0, 1))
            n_real = int(lengths[mask][part].sum())
            skip = batch.get(ids.replace("input_ids", "pool_skip"))
            with autocast_for(self.device, self.precision):
                return self._units(batch[ids][part], batch[mask][part], n_real, None if skip is None else skip[part]).float(), real

        embs, states = [], []
        with torch.no_grad():
            for (ids_key, mask_key), n_rounds in zip(sides, rounds):
                parts, rng = [], []
                for i in range(n_rounds):
                    rng.append(_rng_state(self.device))
                    e, real = encode(ids_key, mask_key, i)
                    if real:
                        parts.append(e)
                embs.append(torch.cat(parts) if parts else torch.zeros((0, self.model.dim), device=self.device))
                states.append(rng)
        q = embs[0].detach().requires_grad_()
        c = embs[1].detach().requires_grad_()
        loss, parts = self.loss_fn(self._pair_batch(q, c, batch, sizes))
        self._backward(loss * scale)  # the embeddings' gradients carry fp16's loss scale into the chunks'
        for (ids_key, mask_key), grad, rng, n_rounds in zip(sides, (q.grad, c.grad), states, rounds):
            for i in range(n_rounds):
                with _restored_rng(rng[i], self.device):
                    e, real = encode(ids_key, mask_key, i)
                (e * grad[i * chunk:(i + 1) * chunk] if real else e * 0.0).sum().backward()
        return loss, parts

    def _optimizer_step(self) -> None:
        with record_function("hmcl.optimizer_step"):  # the step's parts as ranges in torch.profiler's tables
            if self.world > 1:
                average_gradients(self.replicated)
            if self.scaler:  # the same gradients on every process, so every process skips alike
                self.scaler.unscale_(self.optimizer)
            if self.cfg.max_grad_norm:
                clip_grad_norm(self.trainable, self.cfg.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped where a gradient overflowed (no host sync when fused)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, nonfinite_step: torch.Tensor) -> None:
        bad = int(nonfinite_step.item())
        if self._cpu_group is not None:  # the first bad step of any process: all save and stop together
            # (a process's own loss can turn NaN a step before the others', whose weights the averaged
            # gradients make NaN a step later: at a log step between the two, it alone stopped)
            none = torch.iinfo(torch.int64).max  # (no bad step here)
            first = torch.tensor([bad if bad >= 0 else none], dtype=torch.int64)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN, group=self._cpu_group)
            bad = -1 if first.item() == none else int(first.item())
        if bad >= 0:
            path = self.save_checkpoint(tag="diverged")
            if self.is_main:  # checkpoints written after the bad step hold NaN weights: keep them out of --resume
                for late in self.ckpt_dir.glob("step-*"):
                    if int(late.name[5:]) >= bad:
                        late.rename(late.with_name("diverged-" + late.name))
            good = sorted(p.name for p in self.ckpt_dir.glob("step-*") if p.is_dir())
            raise TrainingDivergedError(
                f"loss became NaN/inf at step {bad}; the state at step {self.step} is saved for inspection "
                f"in {path}" + (f"; last good checkpoint: {good[-1]}" if good else ""),
                hint="lower train.learning_rate, raise loss.temperature, keep max_grad_norm on; "
                "`--resume` continues from the last good step-* checkpoint (never the diverged one)")

    # ------------------------------------------------------------------ eval
    def _check_anchors(self, train_path: Path, anchors: AnchorTable) -> None:
        """The training data can train the objective (before its texts are tokenised)."""
        if not len(anchors):
            raise DataError(f"{train_path} holds no examples", hint="check the data sources and `hmcl prepare` stats")
        pos, weak, _ = anchors.sizes()
        if self.recipe.loss.contrastive_weight > 0 and not (pos.any() or weak.any()):
            raise DataError(
                f"{train_path}: every candidate is a negative; the contrastive term needs positives or weak-positives",
                hint="check the level mapping (thresholds / label_map), or set loss.contrastive_weight: 0",
            )

    def _check_dev_metrics(self, dev_path: Path) -> dict[str, str]:
        """Before training: ``train.metric_for_best`` must be a dev metric this dev set defines (a
        metric it cannot compute would be NaN at every eval, and the first eval's model kept as
        best). Returns the undefined metrics (left out of the evals), announced once."""
        names = [f"dev_{m}" for m in metric_names(self.dev)]
        undefined = {f"dev_{m}": why for m, why in undefined_metrics(self.dev).items()}
        defined = [n for n in names if n not in undefined]
        if not defined:  # whatever metric_for_best says: no checkpoint could be told from another
            reasons = "; ".join(dict.fromkeys(undefined.values()))
            raise DataError(f"no dev metric can be computed on {dev_path} ({len(self.dev)} queries): {reasons}",
                            hint="give the dev data positive candidates (with a lower candidate beside them for "
                            "reranking), or train without dev: data.dev_fraction 0 and no `split: dev` source (the "
                            "last step's model is kept)")
        key = self.best_key = self._auto_metric(defined) if self.cfg.metric_for_best == "auto" else self.cfg.metric_for_best
        if key not in names:
            close = suggest(key, names)
            raise DataError(f"train.metric_for_best {key!r} is not a dev metric of {dev_path}"
                            f"{f' — did you mean {close!r}?' if close else ''}", hint=f"dev metrics: {', '.join(defined)}")
        if key in undefined:
            raise DataError(f"train.metric_for_best {key!r} cannot be computed on {dev_path}: {undefined[key]}",
                            hint=f"choose one that can ({', '.join(defined) or 'none'}), or add such candidates to the dev data")
        if undefined and self.is_main:
            reasons: dict[str, list[str]] = {}
            for name, why in undefined.items():
                reasons.setdefault(why, []).append(name)
            log("dev metrics left out (this dev set cannot define them): "
                + "; ".join(f"{', '.join(names_)} ({why})" for why, names_ in reasons.items()))
        return undefined

    def _auto_metric(self, defined: list[str]) -> str:
        """``metric_for_best: auto``: Spearman where every dev example comes from a source graded
        by its scores (format sts: the score orders pairs finer than the levels), else nDCG@10 (a
        retrieval dataset's relevance grades are scores too, but what it is for is ranking), else
        the first metric this dev set defines (announced)."""
        from hmcl_cli.data.readers import source_labels

        formats = dict(zip(source_labels(self.recipe.data.sources), (s.format for s in self.recipe.data.sources)))
        graded_by_score = all(formats.get(ex.source) == "sts" for ex in self.dev)
        if graded_by_score and "dev_spearman" in defined:
            key, why = "dev_spearman", "the dev data are sts pairs, graded by their scores"
        elif "dev_ndcg@10" in defined:
            key, why = "dev_ndcg@10", ("the dev data are not sts pairs" if not graded_by_score
                                       else "the dev scores are all one value")
        else:  # (a dev set that defines none stopped before: _check_dev_metrics)
            key, why = defined[0], "the one this dev set defines first"
        if self.is_main:
            log(f"train.metric_for_best auto: {key} ({why})")
        return key

    def evaluate(self) -> dict:
        scores = evaluate_graded(self.model, self.dev, batch_size=max(32, self.cfg.batch_size * 2))
        self.model.train()
        return {f"dev_{k}": v for k, v in scores.items() if f"dev_{k}" not in self.dev_undefined}

    def _evaluate_at_start(self) -> None:
        """Step 0: the dev metrics of the model as loaded (logged and recorded, not kept as a
        candidate), what the end of training compares the best model with."""
        scores = self._evaluate_and_record(" (before training)")
        if self.is_main:
            self.start_metric = scores.get(self.best_key)

    def _evaluate_and_record(self, note: str = "") -> dict:
        """Dev metrics at this step, written to metrics.jsonl and the log by the main process.
        Without sharding the main process evaluates alone (the others get {}); under FSDP every
        process runs the same forward passes (each holds a shard of the weights)."""
        scores = self.evaluate() if (self.is_main or self.sharded) else {}
        if self.is_main:
            self.metrics.write({"step": self.step, **{k: round(v, 5) for k, v in scores.items()}})
            log("eval step {}{}: {}".format(self.step, note, ", ".join(f"{k} {v:.4f}" for k, v in scores.items())))
        return scores

    def _evaluate_and_keep_best(self) -> bool:
        """Evaluate on dev (:meth:`_evaluate_and_record`); save the best model; return True to stop
        early. Every process takes the main process's decision."""
        runs_here = self.is_main or self.sharded
        scores = self._evaluate_and_record()
        key = self.best_key  # setup checked that the dev set defines it
        value = scores.get(key, math.nan)
        if self.world > 1:
            shared = torch.tensor([value], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(shared, src=0)
            value = float(shared.item())
        best = self.best_metric
        if best is None or (not math.isnan(value) and (math.isnan(best) or value > best)):
            self.best_metric, self.best_step = value, self.step
            self.evals_without_improvement = 0
            if self.cfg.load_best_at_end and runs_here:
                self._save_model(self.run_dir / "best")
        else:
            self.evals_without_improvement += 1
        stop = bool(self.cfg.early_stopping_patience and self.evals_without_improvement >= self.cfg.early_stopping_patience)
        if stop and self.is_main:
            log(f"early stopping: no improvement of {key} for {self.evals_without_improvement} evals")
        self._early_stopped = stop
        return stop

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict:
        """Trainable weights, whole (gathered from the shards under FSDP: every process calls it)."""
        return full_state(self.model, only=[n for n, p in self.model.named_parameters() if p.requires_grad])

    def _stop_agreed(self) -> bool:
        """Whether to stop after this step: a Ctrl-C or SIGTERM reached this process or, with several,
        any of them. They agree each step (one small all-reduce on the CPU, no device sync), so all
        stop after the same step: a process that stopped alone left the others waiting in the next
        step's collective (no checkpoint: the main process writes it), and processes that stopped a
        step apart under FSDP (a GPU's host loop runs ahead of its device, each by its own amount)
        would gather their shards for the checkpoint against another step's collectives.

        The reduced flag alone decides: a signal whose handler runs just after the all-reduce
        (between any two bytecodes) counts at the next step's, not at this one in this process only."""
        if self._cpu_group is None:
            return self._stop_signal is not None
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._cpu_group)
        agreed = int(flag.item())
        if agreed and self._stop_signal is None:
            self._stop_signal = agreed  # another process's
        return bool(agreed)

    def _save_due(self) -> bool:
        """Whether ``train.save_minutes`` have passed since the last checkpoint, by the main
        process's clock, which every process follows (under FSDP all write a checkpoint together;
        one broadcast on the CPU per log step)."""
        minutes = self.cfg.save_minutes
        if not minutes:
            return False
        due = time.monotonic() - self._saved_at >= 60 * minutes
        if self._cpu_group is not None:
            flag = torch.tensor([int(due)], dtype=torch.int32)  # on the CPU: no device sync
            torch.distributed.broadcast(flag, src=0, group=self._cpu_group)
            due = bool(flag.item())
        return due

    def save_checkpoint(self, tag: Optional[str] = None) -> Optional[Path]:
        """Write a resumable checkpoint atomically, with a sha256 manifest; keep the last K."""
        self._saved_at = time.monotonic()
        if not (self.is_main or self.sharded):
            return None
        # under FSDP gathering the shards is collective: every process takes part
        weights, optim = self._trainable_state(), optimizer_state_full(self.optimizer)
        if not self.is_main:
            return None
        name = tag or f"step-{self.step:07d}"
        target = self.ckpt_dir / name
        with atomic_path(target, is_dir=True) as tmp:
            torch.save(weights, tmp / "model.pt")
            torch.save(self.loss_fn.state_dict(), tmp / "loss.pt")
            torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict(),
                        **({"scaler": self.scaler.state_dict()} if self.scaler else {})}, tmp / "optim.pt")
            torch.save(_all_rng(), tmp / "rng.pt")
            state = {"step": self.step, "best_metric": self.best_metric, "best_step": self.best_step,
                     "start_metric": self.start_metric, "data_sha256": self.data_sha256,
                     "evals_without_improvement": self.evals_without_improvement, "total_steps": self.total_steps,
                     "settings": trajectory_settings(self.recipe)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (tmp / CHECKPOINT_RECIPE).write_text(checkpoint_recipe_yaml(self.recipe), encoding="utf-8")
            manifest = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if tag is None:
            steps = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
            for old in steps[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _start_over(self) -> None:
        """A training that does not resume starts from nothing: the checkpoints and the best model
        of an earlier training in this run directory are removed (left there, ``keep_last`` pruned
        the new checkpoints by name and kept the old ones, from which a later ``--resume`` went on
        with the earlier training's weights), and its metrics.jsonl is kept as
        metrics.previous.jsonl. ``<run>/model`` stays until this training replaces it."""
        old = sorted(p.name for p in self.ckpt_dir.glob("*") if p.is_dir()) if self.ckpt_dir.is_dir() else []
        if old:
            shutil.rmtree(self.ckpt_dir)
            log(f"train: starting over (no --resume): removed the checkpoints of an earlier training here "
                f"({', '.join(old[-3:])}{', ...' if len(old) > 3 else ''}); `--resume` continues one instead")
        shutil.rmtree(self.run_dir / "best", ignore_errors=True)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            os.replace(metrics, self.run_dir / "metrics.previous.jsonl")

    def _resume(self) -> None:
        for ckpt in sorted(self.ckpt_dir.glob("step-*"), reverse=True):
            problem = _verify_checkpoint(ckpt)
            if problem:
                warn(f"checkpoint {ckpt.name} is unusable ({problem}); trying an older one")
                continue
            st = json.loads((ckpt / "trainer_state.json").read_text())
            if st.get("data_sha256") not in (None, self.data_sha256):
                raise DataError(
                    f"--resume: checkpoint {ckpt.name} was trained on other data than "
                    f"{self.run_dir / 'data' / 'train.jsonl'} holds now (it was prepared or mined again since); "
                    "resuming would continue one training on two datasets",
                    hint="train from the beginning (without --resume), or continue from the trained model as a new "
                    "run: model.name_or_path: <run>/model")
            if self.is_main and isinstance(st.get("settings"), dict):
                from hmcl_cli.data.origin import differences, listed

                changed = differences(st["settings"], trajectory_settings(self.recipe))
                if changed:
                    warn(f"--resume: checkpoint {ckpt.name} was trained with other settings than the recipe's now ("
                         + listed(changed, 4) + f"); training goes on "
                         f"from step {st['step']} with the new ones, which neither setting alone would have given")
            state = torch.load(ckpt / "model.pt", weights_only=True)
            missing = set(n for n, p in self.model.named_parameters() if p.requires_grad) - set(state)
            if missing:
                warn(f"checkpoint {ckpt.name} does not match this model ({len(missing)} tensors missing); trying an older one")
                continue
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for n, t in state.items():
                    params[n].copy_(like(t, params[n]))  # re-sharded under FSDP
            self.loss_fn.load_state_dict(torch.load(ckpt / "loss.pt", weights_only=True))
            opt = torch.load(ckpt / "optim.pt", weights_only=False)
            load_optimizer_state(self.optimizer, opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
            if self.scaler and "scaler" in opt:
                self.scaler.load_state_dict(opt["scaler"])
            _set_all_rng(torch.load(ckpt / "rng.pt", weights_only=False))
            self.step, self.best_metric, self.best_step = st["step"], st["best_metric"], st["best_step"]
            self.evals_without_improvement = st.get("evals_without_improvement", 0)
            self.start_metric = st.get("start_metric")
            if self.is_main:
                log(f"resumed from {ckpt} (step {self.step})")
            return
        if self.is_main:
            log("resume: no usable checkpoint found; starting from the beginning")

    # ------------------------------------------------------------------ final model
    def _save_model(self, folder: Path) -> None:
        """Save a sentence-transformers folder; LoRA: merged weights + adapter/ alongside.
        Under FSDP every process must call it (the weights are gathered); the main one writes."""
        model = self._unsharded_model() if self.sharded else self.model
        if model is None or not self.is_main:
            return
        thresholds = None
        if self.recipe.loss.classifier == "ordinal" and self.recipe.loss.classification_weight > 0:
            thresholds = self.loss_fn.classification.thresholds().detach().cpu().tolist()
        with atomic_path(folder, is_dir=True) as tmp:
            write_trained_model(model, tmp, self.recipe, thresholds)

    def _unsharded_model(self) -> Optional[EmbeddingModel]:
        """On the main process, a CPU copy of the sharded model with whole weights (None elsewhere).
        Built on the meta device and filled with the gathered tensors: the base checkpoint is not
        read from disk again (for a 7B model that is the size of the model)."""
        live = self.model.backbone
        weights = full_state(live)  # collective
        if not self.is_main:
            return None
        base = live.get_base_model() if is_peft(live) else live
        with torch.device("meta"):  # FSDP2's FSDP<Class>.__new__ builds the plain class
            backbone = type(base)(base.config)
            if is_peft(live):
                backbone = apply_lora(backbone, self.recipe.model.lora, self.recipe.model.name_or_path)
        backbone.load_state_dict(weights, strict=True, assign=True)
        for name, buf in live.named_buffers():  # non-persistent buffers (rotary tables, position ids)
            owner, _, leaf = name.rpartition(".")
            backbone.get_submodule(owner)._buffers[leaf] = buf.detach().cpu()
        left = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"gathered weights do not fill the model: {left[:3]}")
        head = [copy.deepcopy(layer).cpu() for layer in self.model.head]  # replicated, not sharded: whole on each process
        return EmbeddingModel(backbone.eval(), self.model.tokenizer, self.model.settings, head)

    def save_final(self) -> Path:
        """``<run>/model``: the best dev model when there was a dev set, else the last; which step
        it holds is recorded in ``<run>/final.json``. A resumed run that evaluates no better step
        keeps the best model an earlier run of it already moved there (before, the last step's
        weights replaced it)."""
        final = self.run_dir / "model"
        best = self.run_dir / "best"
        record_path = self.run_dir / "final.json"
        record = _read_record(record_path)
        use_best = bool(self.is_main and self.cfg.load_best_at_end and best.is_dir())
        keep = bool(self.is_main and not use_best and self.cfg.load_best_at_end and self.best_step is not None
                    and final.is_dir() and record.get("best") and record.get("step") == self.best_step)
        if self.sharded:  # the main process decides; saving the last weights is collective
            flag = torch.tensor([float(use_best) + 2.0 * float(keep)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            use_best, keep = flag.item() == 1.0, flag.item() == 2.0
        key = self.best_key
        if keep:
            if self.is_main:
                log(f"final model: unchanged, the best dev {key} {self.best_metric:.4f} at step {self.best_step} "
                    f"(no later step was better) -> {final}")
        elif not use_best and (self.is_main or self.sharded):
            self._save_model(final)
            if self.is_main:
                write_json_atomic(record_path, {"step": self.step, "best": False})
                why = ("no dev split to choose a step by" if not self.dev
                       else "train.load_best_at_end is off" if not self.cfg.load_best_at_end else "no dev evaluation ran")
                log(f"final model: the last step's ({self.step}; {why}) -> {final}")
        elif use_best and self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(best, final)
            write_json_atomic(record_path, {"step": self.best_step, "best": True, "metric": key, "value": self.best_metric,
                                            "before_training": self.start_metric})
            start = self.start_metric
            moved = (f" ({start:.4f} before training, {self.best_metric - start:+.4f})"
                     if start is not None and not math.isnan(start) else "")
            log(f"final model: best dev {key} {self.best_metric:.4f} at step {self.best_step}{moved} -> {final}")
            if moved and start >= 1.0 - 1e-9:  # every dev metric is at most 1
                warn(f"dev {key} was already {start:.4f} before training, its maximum: this dev set cannot show a "
                     "gain (each dev query finds its positive first among the dev candidates), so no step can be "
                     "chosen over another on it; use a harder dev set (more candidates per query: hard negatives, "
                     "a larger pool) or another train.metric_for_best")
            elif moved and not self.best_metric > start:
                warn(f"training did not improve dev {key}: the best step ({self.best_step}: {self.best_metric:.4f}) is "
                     f"no better than the model before training ({start:.4f}), so the final model is no better on dev "
                     "than the one training started from; try a lower train.learning_rate or fewer steps, or check "
                     "that the dev set measures what the training data teaches")
        # every process ends together: accelerate's end_training also destroys the process group,
        # which the main process alone used to tear down while its peer might still be in it (the
        # suspected cause of a rare abort at exit in a 2-process FSDP test)
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return final

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _signals(self):
        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                warn("stop requested: finishing this step and saving a checkpoint (again to abort)")

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, handler)
        except ValueError:  # not the main thread
            old = {}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _verify_checkpoint(ckpt: Path, only: Optional[tuple[str, ...]] = None) -> Optional[str]:
    """Why the checkpoint cannot be used (a file missing or not as written), or None; ``only``:
    check these of its files alone (the model's: not the optimizer state, twice the weights)."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (partial write)"
    try:
        expected = json.loads(manifest.read_text())
    except ValueError:
        return "manifest.json is corrupt"
    for name, digest in expected.items():
        if only is not None and name not in only:
            continue
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        if file_sha256(f) != digest:
            return f"{name} checksum mismatch"
    return None


def adamw(groups: list[dict], fused: bool = True) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where it has one for the parameters' device (CUDA; the
    CPU since torch 2.4): one kernel for all tensors instead of ~10 operations per tensor. On the
    2-core CPU, all-MiniLM-L6-v2's step took ~10 ms fused against ~66 ms per tensor. Same update
    up to float rounding; FSDP2's sharded (DTensor) parameters too (the 2-process FSDP tests
    equal one process with it). ``fused=False`` or a torch without the kernel for the device:
    the default path."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # (a private helper: if it moves, CUDA is the device every torch fuses on)
        supported = {"cuda"}
    fused = fused and all(p.device.type in supported and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True) if fused else torch.optim.AdamW(groups)


def _schedule(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_record(path: Path) -> dict:
    """``<run>/final.json`` (which step ``<run>/model`` holds), or {} when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _all_rng() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_all_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _restored_rng(state: tuple, device: torch.device):
    """Replay the RNG of a chunk's first forward, so dropout masks match in GradCache."""
    cpu_now = torch.get_rng_state()
    cuda_now = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_now)
        if cuda_now is not None:
            torch.cuda.set_rng_state(cuda_now, device)


def _check_distributed_setup(acc: Any) -> bool:
    """Refuse set-ups this loop would train wrongly rather than fail late or silently; True when
    accelerate's config asks for FSDP."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise RecipeError(
            f"launched as {launched} processes but the process group has {acc.num_processes}; "
            "each process would train alone and overwrite the same run directory",
            hint="launch with `hmcl train RECIPE --launcher accelerate -- --num_processes N` "
            "(hmcl adds the multi-process flags), or check your accelerate config",
        )
    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise RecipeError(
            "accelerate is configured for DeepSpeed; hmcl trains with its own loop (cross-device "
            "embedding gather with gradients) and shards with PyTorch FSDP2 instead of ZeRO",
            hint="use a plain multi-GPU accelerate config and set train.fsdp: true (ZeRO-3-like "
            "sharding of weights, gradients and optimizer state)",
        )
    return kind == DistributedType.FSDP


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
    if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        warn(f"tracker {name!r} is not installed (pip install {module}); logging to metrics.jsonl only")
        return False
    return True
