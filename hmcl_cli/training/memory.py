"""Memory planner: the peak memory per device a recipe will need, before any weight is loaded.

    from hmcl_cli.training.memory import plan_memory
    plan = plan_memory(recipe)          # a MemoryPlan
    print(plan.summary())

How it estimates (per device, for the worst step: every sequence as long as the longest text of its
side in the data — batches are padded to their longest text — capped by the max lengths; without
the data, ``hmcl train --plan`` assumes every sequence fills its max length):

* **weights**: every parameter in the dtype it trains in (``model.dtype``; with LoRA on a GPU the
  frozen base is bfloat16 and the adapters float32);
* **optimizer**: AdamW keeps two states per trainable parameter, in its dtype;
* **gradients**: one per trainable parameter, counted beside the activations (they grow while
  the backward pass frees activations, so this is an upper bound);
* **activations**: measured, not guessed — a 1-layer and a 2-layer copy of the architecture are
  built on the ``meta`` device (no memory, no compute), one sequence is run through each with
  saved-tensor hooks counting what autograd keeps, and that is scaled to the layers and
  sequences of a step (anchors + anchors x group_size candidates; ``grad_cache_chunk``
  sequences with GradCache; with ``model.segments`` every text is as many sequences of at most
  one segment's length as its longest text needs). Attention is counted as a fused kernel keeps it (q, k, v, output,
  log-sum-exp), as SDPA's flash / memory-efficient kernels do. Under bf16 / fp16 autocast the
  probe runs as autocast would (:class:`AutocastOnMeta`: matmul inputs lowered, norms and
  softmax in float32, the rest by type promotion), so a float32 model's residual stream and
  norms are counted in float32, as a GPU keeps them (counted all in bf16, plans were 14-21%
  under the H200's peaks of 2026-12-04 for full fine-tuning). With gradient checkpointing each
  layer keeps only its input, plus one layer's activations for one forward call (the anchors or
  the candidates, both with ``train.one_forward``, or one GradCache chunk) during recomputation;
  with ``train.one_forward`` both sides are sized at the wider length. A run whose forward calls
  are unpadded (``model.unpad``) is sized by the most real tokens a step can hold instead (the
  longest queries and documents of the data), at the probe's bytes per token;
* **autocast copies**: under bf16 autocast every float32 weight used in a matmul is cast once per
  forward and the bf16 copy is kept until the backward pass;
* **fused copies**: with ``model.fused_projections`` (``auto``: on a GPU) each forward call joins
  a layer's trainable sibling projections (query/key/value, gate/up) and autograd keeps the joined
  weights (in the compute dtype) until the backward pass: one copy of those weights per forward
  call of a step (with gradient checkpointing, one layer's), where autocast's cached copy counted
  above serves the first call.

With ``train.fsdp`` over N processes the sharded weights (the frozen base with LoRA), their
gradients and optimizer state count 1/N, plus two whole layers being gathered.

The planner warns when the sum exceeds the device and names the knob that fixes it, with the
estimate after applying it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from hmcl_cli.modeling.masks import no_cache

GIB = 1024 ** 3
# train.one_forward auto: one forward call when padding both sides to the wider one adds at most
# this share of padded tokens to the step (the trainer decides with it, the planner sizes by it)
ONE_FORWARD_PADDING = 0.25


def one_forward_mode(setting: Any, device_type: str, sharded: bool) -> str:
    """How ``train.one_forward`` resolves: ``always`` (true), ``never`` (false; and ``auto`` on a
    CPU, which computes every padded token, or under FSDP, where every forward is collective so
    no process may decide alone), else ``padding`` (one call where it adds at most
    ONE_FORWARD_PADDING padded tokens to the step)."""
    if setting is True:
        return "always"
    if setting is False or device_type != "cuda" or sharded:
        return "never"
    return "padding"


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
    # the largest GradCache chunk that fits the capacity, when the whole batch does not (else None)
    fitting_chunk: Optional[int] = None
    lengths: tuple[int, int] = (0, 0)  # query and document tokens each sequence is sized at
    real_tokens: Optional[tuple[int, int]] = None  # unpadded: the real tokens of the step it is sized at
    fused_copies: int = 0  # model.fused_projections: the concatenated weights autograd keeps

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.autocast_copies + self.fused_copies

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= 0.95 * self.capacity

    def as_dict(self) -> dict:
        keys = ("weights", "optimizer", "gradients", "activations", "autocast_copies", "fused_copies", "peak")
        return {**{k: round(getattr(self, k) / GIB, 3) for k in keys}, "params": self.params,
                "trainable": self.trainable, "sequences": self.sequences, "lengths": list(self.lengths),
                "capacity": round(self.capacity / GIB, 3) if self.capacity else None, "advice": self.advice}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in
                          ("weights", "optimizer", "gradients", "activations", "autocast_copies", "fused_copies")
                          if getattr(self, k))
        cap = f" of {self.capacity / GIB:.1f} GiB" if self.capacity else ""
        tokens = (f"; unpadded: at most {sum(self.real_tokens):,} real tokens" if self.real_tokens else "")
        return (f"memory plan per device: ~{self.peak / GIB:.2f} GiB{cap} ({parts} GiB; "
                f"{self.trainable / 1e6:.1f}M of {self.params / 1e6:.1f}M parameters train; "
                f"{self.sequences} sequences of up to {max(self.lengths)} tokens in memory at once{tokens})")


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


def meta_model(config: Any, layers: Optional[int], dtype: torch.dtype, lora: Any = None) -> torch.nn.Module:
    import copy

    from pathlib import Path

    from hmcl_cli.modeling.encoder import backbone_class

    cfg = copy.deepcopy(config)
    if layers is not None:
        setattr(cfg, _layers_key(cfg), layers)
    cls = backbone_class(cfg, Path(getattr(cfg, "_name_or_path", "") or "."))  # T5: the encoder alone, as trained
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype) if hasattr(cls, "from_config") else cls._from_config(cfg, dtype=dtype)
    if lora is not None and lora.enabled:
        from hmcl_cli.modeling.lora import apply_lora

        model = apply_lora(model, lora)
    return model


def saved_bytes(model: torch.nn.Module, run: Any, skip: Optional[set] = None) -> int:
    """Bytes autograd keeps for backward while ``run()`` runs ``model`` (its weights and buffers
    excluded: they are counted as weights; each storage once). ``skip``: more storages to leave
    out (their ``_cdata``), a set ``run`` may still fill (the autocast copies of the weights)."""
    seen: set = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    skip = skip if skip is not None else set()
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen and key not in skip:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


class AutocastOnMeta(torch.overrides.TorchFunctionMode):
    """What CUDA autocast does to dtypes, for tensors on the ``meta`` device (where autocast does
    not run): matrix products take their floating inputs in ``dtype``, the operations autocast
    runs in float32 (norms, softmax, exp/log/pow/rsqrt) take them in float32, everything else
    follows type promotion, as under autocast. Applied above autograd, as autocast is, so what a
    backward keeps comes out in the dtypes a GPU step keeps it in: the residual stream of float32
    weights stays float32, a layer's matmul inputs are bf16 copies. The bf16 copies of parameters
    are recorded in ``weight_copies`` (storage ids): the plan counts them apart, once per weight.
    (The lists are CUDA autocast's, as documented for torch 2.x; an op not named keeps its dtypes.)"""

    F = torch.nn.functional
    T = torch.Tensor
    LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__,
             torch.mm, T.mm, torch.bmm, T.bmm, torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addbmm,
             torch.mv, T.mv, torch.einsum, torch.addmv, torch.addr}
    FLOAT32 = {F.layer_norm, F.group_norm, F.softmax, T.softmax, torch.softmax, F.log_softmax, T.log_softmax,
               torch.log_softmax, torch.exp, T.exp, torch.log, T.log, torch.pow, T.pow, T.__pow__, torch.rsqrt,
               T.rsqrt, torch.reciprocal, T.reciprocal, F.normalize, torch.cumsum, T.cumsum, F.cosine_similarity,
               F.softplus, torch.norm, T.norm, F.mse_loss, F.cross_entropy, F.nll_loss}

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: set = set()
        self._held: list = []  # the copies themselves: a freed one's storage id could name a later tensor

    def _cast(self, x: Any, to: torch.dtype, low: bool) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, to, low) for v in x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == to:
            return x
        if low and x.dtype != torch.float32:  # autocast lowers float32 only
            return x
        out = x.to(to)
        if isinstance(x, torch.nn.Parameter) or isinstance(x._base, torch.nn.Parameter):  # a weight or its view
            self.weight_copies.add(out.untyped_storage()._cdata)
            self._held.append(out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOWER or func in self.FLOAT32:
            low = func in self.LOWER
            to = self.dtype if low else torch.float32
            args = tuple(self._cast(a, to, low) for a in args)
            kwargs = {k: self._cast(v, to, low) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def saved_tensor_bytes(model: torch.nn.Module, input_ids: torch.Tensor,
                       autocast: Optional[torch.dtype] = None, outputs: Optional[list] = None) -> int:
    """Bytes autograd keeps for backward in one forward of ``model`` in training mode. Works on
    real tensors and on the ``meta`` device; ``autocast``: the dtype of an autocast the forward
    runs under (emulated by :class:`AutocastOnMeta`; the bf16 copies of the weights left out).
    ``outputs``: a list the model's output is appended to."""
    model.train()
    mode = AutocastOnMeta(autocast) if autocast is not None else None

    def run():
        with mode if mode is not None else contextlib.nullcontext():
            out = model(input_ids=input_ids, **no_cache(model))
        if outputs is not None:
            outputs.append(out)

    return saved_bytes(model, run, skip=mode.weight_copies if mode is not None else None)


def real_autocast_saved_bytes(model: torch.nn.Module, input_ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes autograd keeps for backward in one forward of ``model`` (real tensors) under a real
    autocast to ``dtype`` on the tensors' device, its copies of 2-D weights left out: the
    reference :class:`AutocastOnMeta` is checked against (tests, benchmarks/memory_plan_recompute.py).
    A CPU's autocast keeps LayerNorm in ``dtype`` where CUDA's runs it in float32."""
    model.train()
    shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    seen = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            if not (t.dtype == dtype and tuple(t.shape) in shapes):  # a weight's autocast copy
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(input_ids.device.type, dtype=dtype):
        model(input_ids=input_ids, **no_cache(model))
    return total


def _layer_bytes(config: Any, dtype: torch.dtype, lora: Any, seq_len: int,
                 autocast: Optional[torch.dtype] = None) -> tuple[int, int, int]:
    """(fixed, per layer) activation bytes of one sequence of ``seq_len`` tokens, and the bytes
    per element of the hidden states between layers: a 1- and a 2-layer copy with weights in
    ``dtype`` on the meta device, under an emulated ``autocast`` where given (a float32 model's
    residual stream stays float32 there), attention counted as a fused kernel keeps it."""
    sizes, outputs = [], []
    for layers in (1, 2):
        model = meta_model(config, layers, dtype, lora)
        try:
            model.config._attn_implementation = _register_probe()
        except Exception:  # noqa: BLE001 - architectures without the attention interface keep their own
            pass
        ids = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
        sizes.append(saved_tensor_bytes(model, ids, autocast=autocast, outputs=outputs))
    one, two = sizes
    hidden = getattr(outputs[-1], "last_hidden_state", None)
    stream = hidden.element_size() if isinstance(hidden, torch.Tensor) else torch.tensor([], dtype=dtype).element_size()
    return 2 * one - two, two - one, stream


def _sequence_bytes(config: Any, probe: tuple[int, int, int], seq_len: int, checkpointing: bool) -> int:
    """Activations one sequence keeps through the whole model. With gradient checkpointing each
    layer keeps only its input, the hidden states between layers (the layer being recomputed is
    added by the caller)."""
    fixed, per_layer, stream = probe
    layers = getattr(config, _layers_key(config))
    if not checkpointing:
        return fixed + layers * per_layer
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return fixed + layers * seq_len * hidden * stream


def _padded(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def _segment_count(length: int, seg: Any, overhead: int) -> int:
    """Segments a text of ``length`` tokens splits into (``overhead``: the tokens each segment
    spends on special tokens, prompt and EOS)."""
    if length <= seg.length:
        return 1
    content = seg.length - overhead
    return 1 + -(-(length - seg.length) // max(1, content - seg.overlap))


def _segment_overheads(recipe: Any, config: Any) -> tuple[int, int]:
    """Tokens a query / document segment spends on special tokens, prompt and EOS, from the
    recipe's tokenizer (2 each, a [CLS] and a [SEP], when it cannot be loaded)."""
    from hmcl_cli.modeling.encoder import is_decoder_config, resolve_append_eos
    from hmcl_cli.modeling.resolve import resolve_transformer
    from hmcl_cli.modeling.segments import segment_overhead

    m = recipe.model
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_transformer(m.name_or_path, m.revision, recipe.base_dir),
                                            trust_remote_code=m.trust_remote_code)
    except Exception:  # noqa: BLE001 - the estimate falls back to a BERT-like frame
        return 2, 2
    pooling = m.pooling if m.pooling != "auto" else ("last_token" if is_decoder_config(config) else "mean")
    eos = resolve_append_eos(m.append_eos, pooling, tok)
    return segment_overhead(tok, m.query_prompt, eos), segment_overhead(tok, m.doc_prompt, eos)


def predicts_unpadded(recipe: Any, device: torch.device, config: Any) -> bool:
    """Whether ``hmcl train`` will run this recipe's forward calls unpadded (``model.unpad``), as
    far as the recipe, the device and the model config tell before the model is loaded (its probe
    decides at load: a refusal re-plans padded). Segments and ``train.compile: cuda-graphs`` are
    planned padded."""
    from hmcl_cli.modeling.encoder import resolve_precision
    from hmcl_cli.modeling.unpad import varlen_takes

    m = recipe.model
    if m.unpad is False or m.segments is not None or m.attn_implementation != "sdpa" or recipe.train.compile == "cuda-graphs":
        return False  # (cuda-graphs: a graph replays fixed shapes, so its calls run padded)
    if device.type == "cpu" or m.unpad is True:
        return True
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(recipe.train.precision, device.type))
    return half is not None and varlen_takes(config, half, training=True)


def _head_params(recipe: Any) -> int:
    """Parameters of the layers after the pooling (Dense, LayerNorm) of the recipe's model, read
    from its folder when it is here (no download); 0 otherwise."""
    from hmcl_cli.errors import ModelNotFoundError
    from hmcl_cli.modeling.resolve import resolve_model
    from hmcl_cli.modeling.st_modules import read_pipeline

    m = recipe.model
    try:
        folder = resolve_model(m.name_or_path, m.revision, recipe.base_dir, download=False)
    except ModelNotFoundError:
        return 0
    return sum(p.numel() for layer in read_pipeline(folder).head for p in layer.parameters())


def plan_memory(recipe: Any, device: Optional[torch.device] = None, config: Any = None,
                capacity: Optional[int] = None, longest: Optional[tuple[int, int]] = None,
                segments: Optional[tuple[int, int]] = None, shards: int = 1,
                real_tokens: Optional[tuple[int, int]] = None, head_params: Optional[int] = None) -> MemoryPlan:
    """Estimate the peak memory per device of ``hmcl train`` for ``recipe`` (see module doc).

    ``longest``: the longest query and document of the data in tokens; batches are padded to their
    longest text, so the worst step is sized by these (capped by the max lengths). Without it every
    sequence is assumed to fill its max length. With ``model.segments``, ``longest`` is the longest
    segment and ``segments`` the most segments of one query / document in the data; without them
    the worst case is derived from the max lengths. ``shards``: processes sharing the weights
    under ``train.fsdp`` (1: every process holds all of them). ``real_tokens``: for a run whose
    forward calls are unpadded (``model.unpad``; see :func:`predicts_unpadded`), the most real
    tokens a step's queries and its candidates can hold (``TrainData.heaviest_step``): activations
    then follow those tokens instead of every sequence at its padded length. ``head_params``: the
    parameters of the sentence-transformers layers after the pooling (float32, trained; None: read
    from the model's folder when it is here, else none)."""
    from hmcl_cli.modeling.encoder import resolve_precision, training_dtype
    from hmcl_cli.modeling.fused_projections import fused_weight_numel, joins_on
    from hmcl_cli.modeling.graph_shapes import graph_size
    from hmcl_cli.modeling.resolve import resolve_transformer

    m, t = recipe.model, recipe.train
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_transformer(m.name_or_path, m.revision, recipe.base_dir),
                                            trust_remote_code=m.trust_remote_code)
    w_dtype = training_dtype(m, device.type)
    precision = resolve_precision(t.precision, device.type)
    act_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, w_dtype)
    full = meta_model(config, None, w_dtype, m.lora)
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
    fusable = fused_weight_numel(full) if joins_on(m.fused_projections, device.type) else 0
    del full
    head = head_params if head_params is not None else _head_params(recipe)
    params, trainable, weight_bytes, train_bytes = params + head, trainable + head, weight_bytes + 4 * head, train_bytes + 4 * head
    q_len = m.query_max_length or m.max_length
    d_len = m.doc_max_length or m.max_length
    if longest is not None:
        q_len, d_len = min(q_len, _padded(longest[0])), min(d_len, _padded(longest[1]))
    n_q, n_d = t.batch_size, t.batch_size * t.group_size
    if m.segments is not None:  # rows are segments: more, shorter sequences
        if segments is None:  # worst case from the max lengths, each segment's own tokens counted
            over_q, over_d = _segment_overheads(recipe, config)
            segments = (_segment_count(q_len, m.segments, over_q), _segment_count(d_len, m.segments, over_d))
        per_q, per_d = segments
        n_q, n_d = n_q * per_q, n_d * per_d
        q_len, d_len = min(q_len, _padded(m.segments.length)), min(d_len, _padded(m.segments.length))
    if t.compile == "cuda-graphs":  # forward calls padded to graph shapes (graph_shapes.GraphShapes)
        n_q, n_d, q_len, d_len = (graph_size(x) for x in (n_q, n_d, q_len, d_len))
    chunk = None if t.grad_cache_chunk == "auto" else t.grad_cache_chunk
    # under autocast (bf16 / fp16 on a GPU) the probe runs as autocast would have it
    autocast = act_dtype if precision in ("bf16", "fp16") else None
    probes = {n: _layer_bytes(config, w_dtype, m.lora, n, autocast=autocast) for n in {q_len, d_len}}
    unpadded = real_tokens is not None and m.segments is None
    mode = one_forward_mode(t.one_forward, device.type, shards > 1)

    def activations(ckpt: bool, chunk_size: Optional[int]) -> tuple[int, int]:
        per_q = _sequence_bytes(config, probes[q_len], q_len, ckpt)
        per_d = _sequence_bytes(config, probes[d_len], d_len, ckpt)
        # recomputation rebuilds one layer of one forward call (one side, or one chunk) at a time
        redo_q, redo_d = (probes[q_len][1], probes[d_len][1]) if ckpt else (0, 0)
        if chunk_size:  # GradCache: one chunk of one side at a time
            return chunk_size * max(per_q + redo_q, per_d + redo_d), chunk_size
        if unpadded:  # activations per real token (linear in length: attention counted as fused);
            # the sides joined in one call add no padding, and recompute one layer of their tokens
            tq, td = (min(real, n * length) for real, n, length in zip(real_tokens, (n_q, n_d), (q_len, d_len)))
            keep = tq * per_q / q_len + td * per_d / d_len
            redo_each = (tq * redo_q / q_len, td * redo_d / d_len)
            return int(keep + (max(redo_each) if mode == "never" else sum(redo_each))), n_q + n_d
        two_calls = n_q * per_q + n_d * per_d + max(n_q * redo_q, n_d * redo_d)
        if mode == "never":
            return two_calls, n_q + n_d
        # train.one_forward: both sides in one call at the wider length (auto joins only where
        # that adds at most ONE_FORWARD_PADDING of padded tokens, so at most that much more)
        width = max(q_len, d_len)
        per_w = _sequence_bytes(config, probes[width], width, ckpt)
        one_call = (n_q + n_d) * (per_w + (probes[width][1] if ckpt else 0))
        if mode == "padding":
            one_call = min(one_call, int(two_calls * (1 + ONE_FORWARD_PADDING)))
        return max(two_calls, one_call), n_q + n_d

    act, seqs = activations(m.gradient_checkpointing, chunk)
    capacity = capacity if capacity is not None else _device_capacity(device)
    copies = 2 * matmul_fp32 if act_dtype in (torch.bfloat16, torch.float16) and w_dtype == torch.float32 else 0
    optimizer, gradients = 2 * train_bytes, train_bytes
    if shards > 1:  # FSDP: 1/N of the sharded tensors, plus two whole layers (current + prefetched)
        # LoRA adapters and the head stay whole on every process
        sharded = weight_bytes - train_bytes if m.lora.enabled else weight_bytes - 4 * head
        layers = max(1, int(getattr(config, _layers_key(config))))
        # layers are gathered in the compute dtype (FSDP's mixed-precision policy, no autocast
        # copies); counted in the stored dtype, an upper bound
        gathered = min(2 * sharded // layers, sharded - sharded // shards)
        weight_bytes = weight_bytes - sharded + sharded // shards + gathered
        if not m.lora.enabled:
            whole = 4 * head
            optimizer = 2 * (train_bytes - whole) // shards + 2 * whole
            gradients = (train_bytes - whole) // shards + whole + sharded // layers
        copies = 0
    plan = MemoryPlan(
        weights=weight_bytes, optimizer=optimizer, gradients=gradients,
        activations=act, autocast_copies=copies, params=params, trainable=trainable, sequences=seqs,
        lengths=(q_len, d_len), real_tokens=real_tokens if unpadded and not chunk else None,
        fused_copies=_fused_copies(fusable, config, act_dtype, shards > 1 or not copies,
                                   1 if chunk or mode == "always" else 2, m.gradient_checkpointing))
    plan.capacity = capacity
    if capacity:
        fixed = plan.peak - plan.activations
        whole, _ = activations(m.gradient_checkpointing, None)
        if fixed + whole > FILL * capacity:
            per_chunk_text, _ = activations(m.gradient_checkpointing, 1)
            n = int((FILL * capacity - fixed) // max(1, per_chunk_text))
            if n >= 1:  # else not even one text at a time fits: other knobs must help
                plan.fitting_chunk = min(n - n % 8 if n >= 16 else n, n_q + n_d)
        if t.grad_cache_chunk == "auto" and plan.fitting_chunk:
            plan.activations, plan.sequences = activations(m.gradient_checkpointing, plan.fitting_chunk)
            plan.real_tokens = None  # chunks are sized padded
    if not plan.fits:
        plan.advice = _advice(plan, m, t, activations)
    return plan


def _fused_copies(numel: int, config: Any, act_dtype: torch.dtype, uncached: bool, calls: int,
                  checkpointing: bool) -> int:
    """Bytes of the concatenated projection weights autograd keeps (``model.fused_projections``):
    one copy in the compute dtype per forward call of a step, less the first where autocast's cached
    copy of the weights (``autocast_copies``) already counts it (``uncached`` False); with gradient
    checkpointing one layer's at a time."""
    total = numel * act_dtype.itemsize * (calls if uncached else calls - 1)
    return total // max(1, int(getattr(config, _layers_key(config)))) if checkpointing else total


FILL = 0.8  # share of the device a chosen GradCache chunk may plan to use (the plan was 18% low for MiniLM)


def _device_capacity(device: torch.device) -> Optional[int]:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def resolve_chunk(setting: Any, plan: Optional[MemoryPlan]) -> Optional[int]:
    """The GradCache chunk a step uses: ``train.grad_cache_chunk`` as given, or for ``auto`` the
    plan's largest fitting chunk (None: the whole batch fits, or no device capacity is known)."""
    if setting != "auto":
        return setting
    return plan.fitting_chunk if plan is not None else None


def _advice(plan: MemoryPlan, m: Any, t: Any, activations) -> list[str]:
    out = []
    fixed = plan.peak - plan.activations  # weights, optimizer state, gradients, autocast copies
    if not m.gradient_checkpointing:
        act, _ = activations(True, resolve_chunk(t.grad_cache_chunk, plan))
        out.append(f"model.gradient_checkpointing: true -> ~{(fixed + act) / GIB:.1f} GiB")
    if t.grad_cache_chunk in (None, "auto") and plan.fitting_chunk:
        act, _ = activations(m.gradient_checkpointing, plan.fitting_chunk)
        out.append(f"train.grad_cache_chunk: {plan.fitting_chunk} (the largest that fits; same loss and gradients; "
                   f"or `auto`) -> ~{(fixed + act) / GIB:.1f} GiB")
    if not m.lora.enabled:
        out.append("model.lora.enabled: true (trains ~1% of the weights; the optimizer state shrinks accordingly)")
    out.append("or lower train.batch_size / train.group_size / model.max_length")
    return out
