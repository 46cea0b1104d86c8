"""Memory planner: the peak memory per device a recipe will need, before any weight is loaded.

    from hmcl_cli.training.memory import plan_memory
    plan = plan_memory(recipe)          # a MemoryPlan
    print(plan.summary())

How it estimates (per device, worst case: every sequence padded to its side's max length):

* **weights**: every parameter in the dtype it trains in (``model.dtype``; with LoRA on a GPU the
  frozen base is bfloat16 and the adapters float32);
* **optimizer**: AdamW keeps two states per trainable parameter, in its dtype;
* **gradients**: one per trainable parameter; they coexist with activations only under
  GradCache (otherwise they grow while activations are freed);
* **activations**: measured, not guessed — a 1-layer and a 2-layer copy of the architecture are
  built on the ``meta`` device (no memory, no compute), one sequence is run through each with
  saved-tensor hooks counting what autograd keeps, and that is scaled to the layers and
  sequences of a step (anchors + anchors x group_size candidates; ``grad_cache_chunk``
  sequences with GradCache). Attention is counted as a fused kernel keeps it (q, k, v, output,
  log-sum-exp), as SDPA's flash / memory-efficient kernels do. With gradient checkpointing each
  layer keeps only its input, plus one layer's activations during recomputation;
* **autocast copies**: under bf16 autocast every float32 weight used in a matmul is cast once per
  forward and the bf16 copy is kept until the backward pass.

The planner warns when the sum exceeds the device and names the knob that fixes it, with the
estimate after applying it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

GIB = 1024 ** 3


@dataclass
class MemoryPlan:
    weights: int
    optimizer: int
    gradients: int
    activations: int
    autocast_copies: int
    params: int
    trainable: int
    sequences: int
    capacity: Optional[int] = None
    advice: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.autocast_copies

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= 0.95 * self.capacity

    def as_dict(self) -> dict:
        keys = ("weights", "optimizer", "gradients", "activations", "autocast_copies", "peak")
        return {**{k: round(getattr(self, k) / GIB, 3) for k in keys}, "params": self.params,
                "trainable": self.trainable, "sequences": self.sequences,
                "capacity": round(self.capacity / GIB, 3) if self.capacity else None, "advice": self.advice}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in
                          ("weights", "optimizer", "gradients", "activations", "autocast_copies") if getattr(self, k))
        cap = f" of {self.capacity / GIB:.1f} GiB" if self.capacity else ""
        return (f"memory plan per device: ~{self.peak / GIB:.2f} GiB{cap} ({parts} GiB; "
                f"{self.trainable / 1e6:.1f}M of {self.params / 1e6:.1f}M parameters train; "
                f"{self.sequences} sequences in memory at once)")


class _FusedAttentionProbe(torch.autograd.Function):
    """Stands in for a fused attention kernel on the meta device: keeps what flash attention keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the probe never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return grad, torch.zeros_like(k), torch.zeros_like(v)


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    out = _FusedAttentionProbe.apply(query, key, value)  # [b, heads, s, d]
    return out.transpose(1, 2).contiguous(), None


def _register_probe() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register("hmcl_memory_probe", _probe_attention)
    return "hmcl_memory_probe"


def _layers_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ValueError("the model config has no layer count")


def _meta_model(config: Any, layers: Optional[int], dtype: torch.dtype, lora: Any = None) -> torch.nn.Module:
    import copy

    from transformers import AutoModel

    cfg = copy.deepcopy(config)
    if layers is not None:
        setattr(cfg, _layers_key(cfg), layers)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg, dtype=dtype)
    if lora is not None and lora.enabled:
        from hmcl_cli.modeling.lora import apply_lora

        model = apply_lora(model, lora)
    return model


def _saved_bytes(model: torch.nn.Module, seq_len: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward for one sequence of ``seq_len`` tokens (meta device)."""
    # weights that autograd keeps are not extra memory: they are counted as weights
    seen: set = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    model.train()
    try:
        model.config._attn_implementation = _register_probe()
    except Exception:  # noqa: BLE001 - architectures without the attention interface keep their own
        pass
    ids = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return total


def _activation_bytes(config: Any, dtype: torch.dtype, lora: Any, seq_len: int, checkpointing: bool) -> int:
    """Activations for one sequence through the whole model (meta-device probe, see module doc)."""
    one = _saved_bytes(_meta_model(config, 1, dtype, lora), seq_len, False)
    two = _saved_bytes(_meta_model(config, 2, dtype, lora), seq_len, False)
    per_layer, fixed = two - one, 2 * one - two
    layers = getattr(config, _layers_key(config))
    if not checkpointing:
        return fixed + layers * per_layer
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    layer_input = seq_len * hidden * torch.tensor([], dtype=dtype).element_size()
    return fixed + layers * layer_input + per_layer


def plan_memory(recipe: Any, world: int = 1, device: Optional[torch.device] = None, config: Any = None,
                capacity: Optional[int] = None) -> MemoryPlan:
    """Estimate the peak memory per device of ``hmcl train`` for ``recipe`` (see module doc)."""
    from hmcl_cli.modeling.encoder import training_dtype
    from hmcl_cli.modeling.resolve import resolve_model

    m, t = recipe.model, recipe.train
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(m.name_or_path, m.revision, recipe.base_dir),
                                            trust_remote_code=m.trust_remote_code)
    w_dtype = training_dtype(m, device.type)
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu":
        precision = "fp32"
    act_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, w_dtype)
    full = _meta_model(config, None, w_dtype, m.lora)
    params = trainable = weight_bytes = train_bytes = matmul_fp32 = 0
    for name, p in full.named_parameters():
        size = p.numel() * p.element_size()
        params += p.numel()
        weight_bytes += size
        if p.requires_grad:
            trainable += p.numel()
            train_bytes += size
        if p.ndim == 2 and p.dtype == torch.float32 and "embed" not in name:
            matmul_fp32 += p.numel()
    del full
    q_len = m.query_max_length or m.max_length
    d_len = m.doc_max_length or m.max_length
    n_q, n_d = t.batch_size, t.batch_size * t.group_size
    chunk = t.grad_cache_chunk

    def activations(ckpt: bool, chunk_size: Optional[int]) -> tuple[int, int]:
        per_q = _activation_bytes(config, act_dtype, m.lora, q_len, ckpt)
        per_d = per_q if d_len == q_len else _activation_bytes(config, act_dtype, m.lora, d_len, ckpt)
        if chunk_size:  # GradCache: one chunk of one side at a time
            return chunk_size * max(per_q, per_d), chunk_size
        return n_q * per_q + n_d * per_d, n_q + n_d

    act, seqs = activations(m.gradient_checkpointing, chunk)
    copies = 2 * matmul_fp32 if act_dtype in (torch.bfloat16, torch.float16) and w_dtype == torch.float32 else 0
    plan = MemoryPlan(
        weights=weight_bytes, optimizer=2 * train_bytes, gradients=train_bytes if chunk else 0,
        activations=act, autocast_copies=copies, params=params, trainable=trainable, sequences=seqs)
    plan.capacity = capacity
    if capacity is None and device.type == "cuda" and torch.cuda.is_available():
        plan.capacity = torch.cuda.get_device_properties(device).total_memory
    if not plan.fits:
        plan.advice = _advice(plan, m, t, activations)
    return plan


def _advice(plan: MemoryPlan, m: Any, t: Any, activations) -> list[str]:
    out = []
    fixed = plan.peak - plan.activations - plan.gradients
    if not m.gradient_checkpointing:
        act, _ = activations(True, t.grad_cache_chunk)
        out.append(f"model.gradient_checkpointing: true -> ~{(fixed + plan.gradients + act) / GIB:.1f} GiB")
    if not t.grad_cache_chunk:
        act, _ = activations(m.gradient_checkpointing, 16)
        out.append(f"train.grad_cache_chunk: 16 (same loss and gradients) -> "
                   f"~{(fixed + plan.optimizer // 2 + act) / GIB:.1f} GiB")
    if not m.lora.enabled:
        out.append("model.lora.enabled: true (trains ~1% of the weights; the optimizer state shrinks accordingly)")
    out.append("or lower train.batch_size / train.group_size / model.max_length")
    return out
