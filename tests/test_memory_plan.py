"""The memory planner: parameter counts and activation bytes against real models on CPU."""

import pytest
import torch

from hmcl_cli.recipe import load_recipe
from hmcl_cli.training.memory import (FILL, _register_probe, plan_memory, real_autocast_saved_bytes, saved_bytes,
                                      saved_tensor_bytes)
from conftest import write_recipe


def _real_saved_bytes(backbone, n_seq, seq_len):
    """What autograd really keeps for backward (weights excluded), on CPU with fused SDPA."""
    return saved_tensor_bytes(backbone, torch.randint(5, 90, (n_seq, seq_len)))


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_plan_matches_real_parameters_and_activations(tmp_path, fixture, lora, request):
    from transformers import AutoModel

    from hmcl_cli.modeling.lora import apply_lora

    folder = request.getfixturevalue(fixture)
    recipe = load_recipe(write_recipe(tmp_path, folder, model={"lora": {"enabled": lora, "r": 4, "dropout": 0.1}},
                                      train={"batch_size": 3, "group_size": 2}))
    plan = plan_memory(recipe, device=torch.device("cpu"))
    real = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    if lora:
        real = apply_lora(real, recipe.model.lora)
    assert plan.params == sum(p.numel() for p in real.parameters())
    assert plan.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan.optimizer == 2 * 4 * plan.trainable and plan.autocast_copies == 0  # fp32 on CPU
    # the step holds batch_size anchors + batch_size x group_size candidates, all at max_length 48
    assert plan.sequences == 3 + 3 * 2
    torch.manual_seed(0)
    real_bytes = _real_saved_bytes(real, 9, 48)
    # per-batch tensors (position ids, rotary tables) are counted once per sequence: a slight over-estimate
    assert real_bytes <= plan.activations <= 1.02 * real_bytes


def _real_autocast_saved_bytes(backbone, n_seq, seq_len):
    """What autograd keeps for backward under a real bf16 autocast (on the CPU), the bf16 copies
    of the weights left out (the plan counts them apart, as autocast copies)."""
    return real_autocast_saved_bytes(backbone, torch.randint(5, 90, (n_seq, seq_len)))


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_gpu_plan_counts_activations_in_the_dtypes_autocast_keeps(tmp_path, fixture, lora, request):
    """A GPU plan (bf16 autocast) equals what a real bf16 autocast keeps: a float32 model's residual
    stream and norms stay float32 there. Sized all in bf16 before, the plan was 14-21% under the
    H200's peaks for full fine-tuning of BERT-base, MiniLM and Qwen3-0.6B shapes."""
    from transformers import AutoModel

    from hmcl_cli.modeling.lora import apply_lora

    folder = request.getfixturevalue(fixture)
    recipe = load_recipe(write_recipe(tmp_path, folder, model={"lora": {"enabled": lora, "r": 4, "dropout": 0.1}},
                                      train={"batch_size": 3, "group_size": 2, "precision": "bf16"}))
    plan = plan_memory(recipe, device=torch.device("cuda"), capacity=1 << 40)
    # weights as a GPU run loads them: float32 to train in full, bf16 under frozen LoRA adapters
    real = AutoModel.from_pretrained(folder, attn_implementation="sdpa",
                                     dtype=torch.bfloat16 if lora else torch.float32)
    # attention as the plan counts it (a GPU's fused kernel; the CPU's SDPA keeps less under
    # autocast): what this test checks is the dtypes autocast leaves everything else in
    real.config._attn_implementation = _register_probe()
    if lora:
        real = apply_lora(real, recipe.model.lora)
    assert plan.autocast_copies == (0 if lora else 2 * sum(p.numel() for n, p in real.named_parameters()
                                                           if p.ndim == 2 and "embed" not in n))
    torch.manual_seed(0)
    real_bytes = _real_autocast_saved_bytes(real, 9, 48)
    if lora and fixture == "tiny_bert":
        # bf16 weights: CUDA autocast runs LayerNorm in float32, the CPU's in bf16 (the reference
        # here): the plan keeps more, by the LayerNorm outputs (test_autocast_on_meta_... below)
        assert real_bytes < plan.activations <= 1.1 * real_bytes
    else:
        assert real_bytes <= plan.activations <= 1.02 * real_bytes


def test_autocast_on_meta_follows_cuda_autocast_dtypes():
    from hmcl_cli.training.memory import AutocastOnMeta

    F = torch.nn.functional
    x32 = torch.empty(2, 8, device="meta")
    x16 = torch.empty(2, 8, device="meta", dtype=torch.bfloat16)
    w = torch.nn.Parameter(torch.empty(4, 8, device="meta"))
    mode = AutocastOnMeta(torch.bfloat16)
    with mode:
        assert F.linear(x32, w).dtype == torch.bfloat16  # matmuls: lowered
        assert (x32 @ w.T).dtype == torch.bfloat16 and torch.bmm(x32[None], w.T[None]).dtype == torch.bfloat16
        assert F.layer_norm(x16, (8,)).dtype == torch.float32  # CUDA's float32 list (the CPU's keeps bf16)
        assert F.softmax(x16, -1).dtype == torch.float32 and x16.pow(2).dtype == torch.float32
        assert torch.rsqrt(x16).dtype == torch.float32
        assert (x16 + x32).dtype == torch.float32 and torch.tanh(x16).dtype == torch.bfloat16  # promotion / as is
        assert F.linear(x16, w.to(torch.bfloat16)).dtype == torch.bfloat16
    assert len(mode.weight_copies) == 3  # w cast in linear, matmul and bmm (a copy each, as autocast makes)


def test_autocast_probe_is_the_same_every_time(tiny_bert):
    """A copy autocast frees (a bias: cast, never saved) must not lend its storage id to a later
    tensor: the probe once gave another size at every call (MiniLM shape, 0.72-1.11 MB a layer)."""
    from transformers import AutoConfig

    from hmcl_cli.training.memory import _layer_bytes

    config = AutoConfig.from_pretrained(tiny_bert)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 384, 1536, 12
    sizes = {_layer_bytes(config, torch.float32, None, 72, autocast=torch.bfloat16) for _ in range(4)}
    assert len(sizes) == 1


def test_plan_flags_what_does_not_fit_and_checkpointing_shrinks_it(tmp_path, tiny_qwen):
    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, train={"batch_size": 64, "group_size": 4}))
    plan = plan_memory(recipe, device=torch.device("cpu"), capacity=1 << 20)
    assert not plan.fits and any("gradient_checkpointing: true" in a for a in plan.advice)
    ckpt = plan_memory(load_recipe(write_recipe(tmp_path, tiny_qwen, model={"gradient_checkpointing": True},
                                                train={"batch_size": 64, "group_size": 4})), device=torch.device("cpu"))
    chunked = plan_memory(load_recipe(write_recipe(tmp_path, tiny_qwen, train={"batch_size": 64, "group_size": 4,
                                                                            "grad_cache_chunk": 8})), device=torch.device("cpu"))
    assert ckpt.activations < plan.activations and chunked.activations < plan.activations
    assert chunked.sequences == 8 and chunked.gradients == chunked.optimizer // 2
    assert plan_memory(recipe, device=torch.device("cpu"), capacity=1 << 40).fits


def test_train_plan_flag_prints_and_trains_nothing(tmp_path, tiny_bert):
    import subprocess
    import sys

    recipe = write_recipe(tmp_path, tiny_bert)
    out = subprocess.run([sys.executable, "-m", "hmcl_cli", "train", str(recipe), "--plan"], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "memory plan per device" in out.stdout and "in memory at once" in out.stdout
    assert not (tmp_path / "run").exists()


def test_plan_sizes_the_worst_step_by_the_longest_text_of_the_data(tmp_path, tiny_qwen):
    """Batches are padded to their longest text: with the data's longest query/document known, the
    plan equals the plan of a recipe whose max lengths are those (padded to 8) lengths."""
    cpu = torch.device("cpu")
    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, train={"batch_size": 4, "group_size": 2}))
    by_data = plan_memory(recipe, cpu, longest=(10, 20))
    assert by_data.lengths == (16, 24)
    capped = load_recipe(write_recipe(tmp_path, tiny_qwen, model={"query_max_length": 16, "doc_max_length": 24},
                                      train={"batch_size": 4, "group_size": 2}))
    assert by_data.activations == plan_memory(capped, cpu).activations
    worst = plan_memory(recipe, cpu)
    assert worst.lengths == (48, 48) and worst.activations > by_data.activations
    # a text longer than max_length is truncated: the cap holds
    assert plan_memory(recipe, cpu, longest=(500, 500)).activations == worst.activations


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_plan_divides_the_sharded_state_by_the_processes(tmp_path, tiny_qwen, lora):
    from transformers import AutoConfig, Qwen3Config

    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, model={"lora": {"enabled": lora}}))
    d = {k: v for k, v in AutoConfig.from_pretrained(tiny_qwen).to_dict().items() if k != "layer_types"}
    config = Qwen3Config(**{**d, "num_hidden_layers": 16})  # sharding pays with many layers
    cpu = torch.device("cpu")
    one, four = plan_memory(recipe, cpu, config=config), plan_memory(recipe, cpu, config=config, shards=4)
    assert four.activations == one.activations
    assert four.weights < one.weights
    if lora:  # adapters and their optimizer state stay whole on every process
        assert (four.optimizer, four.gradients) == (one.optimizer, one.gradients)
    else:
        assert four.optimizer == one.optimizer // 4
        assert four.gradients < one.gradients


def test_fitting_chunk_is_the_largest_grad_cache_chunk_within_the_device(tmp_path, tiny_qwen):
    cpu = torch.device("cpu")
    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, train={"batch_size": 64, "group_size": 4}))
    whole = plan_memory(recipe, cpu)
    assert whole.fitting_chunk is None  # no device capacity known (CPU)
    fixed = whole.peak - whole.activations
    per_text = plan_memory(load_recipe(write_recipe(tmp_path, tiny_qwen, train={
        "batch_size": 64, "group_size": 4, "grad_cache_chunk": 1})), cpu).activations
    capacity = int((fixed + 40.5 * per_text) / FILL)  # room for 40 texts at a time, not the 320 of a step
    plan = plan_memory(recipe, cpu, capacity=capacity)
    assert plan.fitting_chunk == 40  # the largest fitting chunk, rounded down to a multiple of 8
    assert any("grad_cache_chunk: 40" in a for a in plan.advice)
    auto = load_recipe(write_recipe(tmp_path, tiny_qwen, train={"batch_size": 64, "group_size": 4,
                                                                "grad_cache_chunk": "auto"}))
    chosen = plan_memory(auto, cpu, capacity=capacity)
    assert chosen.sequences == 40 and chosen.fits and chosen.activations == 40 * per_text
    assert plan_memory(auto, cpu, capacity=whole.peak * 2).fitting_chunk is None  # the whole batch fits
    assert plan_memory(recipe, cpu, capacity=fixed // 2).fitting_chunk is None  # not even one text fits


def test_trainer_with_auto_chunk_uses_the_plans_chunk(tmp_path, tiny_bert, monkeypatch):
    import hmcl_cli.training.memory as memory
    from conftest import make_trainer
    from hmcl_cli.training.batching import StepBatches

    t = make_trainer(tmp_path / "cpu", tiny_bert, train={"grad_cache_chunk": "auto"})
    assert t.chunk is None  # CPU: no capacity known, the whole batch at once
    plan = t.memory_plan
    per_text = plan.activations / plan.sequences
    monkeypatch.setattr(memory, "_device_capacity", lambda device: int((plan.peak - plan.activations + 5.5 * per_text) / memory.FILL))
    t = make_trainer(tmp_path / "small", tiny_bert, train={"grad_cache_chunk": "auto"})
    assert t.chunk == t.memory_plan.fitting_chunk and 1 <= t.chunk <= 5  # room for ~5 average texts
    used = []
    real = t._grad_cache_step
    monkeypatch.setattr(t, "_grad_cache_step", lambda batch, chunk, *rest: used.append(chunk) or real(batch, chunk, *rest))
    t._forward_backward(StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[0], 1.0)
    assert used == [t.chunk]


def test_plan_without_data_counts_the_segments_a_longest_text_really_splits_into(tmp_path, tiny_qwen):
    """`hmcl train --plan` (no data): the worst case is a text filling max_length, and each segment
    repeats the prompt and EOS — the plan counts as many segments as `split_segments` cuts."""
    from hmcl_cli.modeling.encoder import EmbeddingModel
    from hmcl_cli.modeling.segments import split_segments

    cpu = torch.device("cpu")
    model = {"segments": {"length": 16, "overlap": 2}, "max_length": 64,
             "query_prompt": "Instruct: find the answer to this customer question\nQuery: "}
    recipe = load_recipe(write_recipe(tmp_path, tiny_qwen, model=model, train={"batch_size": 4, "group_size": 2}))
    m = EmbeddingModel.from_recipe(recipe.model, recipe.base_dir)
    long_text = " ".join(["refund shipping order seller account payment"] * 40)
    real = tuple(len(split_segments(m, [long_text], side, m.segments)[0]) for side in ("query", "doc"))
    assert real[0] > real[1]  # the prompt leaves less room per query segment
    assert plan_memory(recipe, cpu).activations == plan_memory(recipe, cpu, segments=real).activations


def test_plan_sizes_one_forward_calls_at_the_wider_length(tmp_path, tiny_bert):
    """train.one_forward: anchors (16 tokens) and candidates (48) in one call, all at 48 tokens."""
    def plan(one_forward, device="cpu", ckpt=False):
        recipe = load_recipe(write_recipe(tmp_path, tiny_bert, model={"query_max_length": 16, "doc_max_length": 48,
                                                                     "gradient_checkpointing": ckpt},
                                          train={"batch_size": 4, "group_size": 2, "one_forward": one_forward}))
        return plan_memory(recipe, device=torch.device(device), capacity=1 << 40)

    from transformers import AutoModel

    two, one = plan(False), plan(True)
    real = _real_saved_bytes(AutoModel.from_pretrained(tiny_bert, attn_implementation="sdpa"), 4 + 8, 48)
    assert real <= one.activations <= 1.02 * real  # every sequence at the wider length
    assert two.activations < one.activations
    assert plan("auto").activations == two.activations  # a CPU never joins the sides
    # on a GPU auto joins only where that adds at most 25% padded tokens: sized by that bound
    gpu_two, gpu_auto = plan(False, "cuda"), plan("auto", "cuda")
    assert gpu_two.activations < gpu_auto.activations <= 1.25 * gpu_two.activations
    # with checkpointing the recomputed layer is one call's: both sides at once
    assert plan(True, ckpt=True).activations > plan(False, ckpt=True).activations


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_unpadded_plan_follows_the_real_tokens_of_the_step(tmp_path, fixture, request, monkeypatch):
    """model.unpad: activations by the step's real tokens, as a packed forward call keeps them
    (attention by the flash variable-length kernel, here a stand-in that keeps what it keeps:
    0.99x / 0.97x with torch 2.14 and 2.11 alike)."""
    from test_unpad import _fp32_kernel, _reference_varlen

    from hmcl_cli.modeling import unpad
    from hmcl_cli.modeling.encoder import EmbeddingModel

    class FlashLike(torch.autograd.Function):
        """Keeps for backward what the flash kernel keeps (q, k, v, the output, the log-sum-exp),
        not what a per-text SDPA on this torch's CPU keeps (that changes between releases: torch
        2.11's kept 1.12x what 2.14's does for tiny Qwen3)."""

        @staticmethod
        def forward(ctx, q, k, v, cu, width, scale, window, gqa):
            out = _reference_varlen(q, k, v, cu, cu, width, width, scale, window, gqa)
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
            return out

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        return FlashLike.apply(q, k, v, cu_q, max_q, scale, tuple(window_size), enable_gqa)

    folder = request.getfixturevalue(fixture)
    recipe = load_recipe(write_recipe(tmp_path, folder, train={"batch_size": 4, "group_size": 2}))
    model = EmbeddingModel.load(str(folder), max_length=48)
    _fp32_kernel(monkeypatch, kernel)
    model.unpad = True
    assert model.unpad_refusal() == ""
    lengths = {"q": [5, 9, 12, 20], "d": [7, 30, 11, 3, 16, 25, 9, 40]}
    model.train()

    def both_sides():
        for side in ("q", "d"):
            batch = model.pad([[7] * n for n in lengths[side]])
            model(batch["input_ids"], batch["attention_mask"], sum(lengths[side]))

    total = saved_bytes(model, both_sides)
    tokens = (sum(lengths["q"]), sum(lengths["d"]))
    plan = plan_memory(recipe, torch.device("cpu"), longest=(20, 40), real_tokens=tokens)
    padded = plan_memory(recipe, torch.device("cpu"), longest=(20, 40))
    assert plan.real_tokens == tokens and "unpadded: at most 187 real tokens" in plan.summary()
    assert plan.activations < 0.6 * padded.activations
    assert 0.85 * total <= plan.activations <= 1.15 * total, (plan.activations, total)


@pytest.mark.parametrize("lora", [False, True])
def test_plan_counts_the_layers_after_the_pooling(tmp_path, tiny_bert, lora):
    """A sentence-transformers model with a Dense head: the plan counts the head's parameters as
    trained float32 weights (with LoRA too: the head trains whole), read from the folder; the
    trainer passes its own, the same number."""
    from test_st_modules import HEADS, build_st

    from hmcl_cli.modeling.encoder import EmbeddingModel

    folder = build_st(tmp_path / "st", tiny_bert, head=HEADS["dense-identity-layernorm-residual"])
    head = sum(p.numel() for layer in EmbeddingModel.load(str(folder)).head for p in layer.parameters())
    assert head == 32 * 24 + 2 * 24 + 24 * 24 + 24
    cpu = torch.device("cpu")
    section = {"lora": {"enabled": lora, "r": 4}}
    plain = plan_memory(load_recipe(write_recipe(tmp_path / "a", tiny_bert, model=section)), cpu)
    headed = plan_memory(load_recipe(write_recipe(tmp_path / "b", folder, model=section)), cpu)
    assert (headed.params - plain.params, headed.trainable - plain.trainable) == (head, head)
    assert headed.weights - plain.weights == 4 * head and headed.optimizer - plain.optimizer == 8 * head
    given = plan_memory(load_recipe(write_recipe(tmp_path / "b", folder, model=section)), cpu, head_params=head)
    assert given.params == headed.params


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_plan_counts_the_joined_projection_weights_autograd_keeps(tmp_path, fixture, request):
    """model.fused_projections joins each layer's sibling weights in every forward call, and
    autograd keeps the join: the plan's fused_copies is the joined weights a real forward call
    keeps, once per call of the step (two on a CPU); none with LoRA (frozen) and none with
    ``auto`` on a CPU (it joins on a GPU only)."""
    from transformers import AutoModel

    from hmcl_cli.modeling.fused_projections import fuse_projections

    folder = request.getfixturevalue(fixture)
    cpu = torch.device("cpu")

    def plan(name, **model):
        return plan_memory(load_recipe(write_recipe(tmp_path / name, folder, model=model,
                                                    train={"batch_size": 3, "group_size": 2})), device=cpu)

    joined_plan, auto, off = plan("a", fused_projections=True), plan("b"), plan("c", fused_projections=False)
    ids = torch.randint(5, 90, (2, 16))
    real = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    plain = saved_tensor_bytes(real, ids)
    assert fuse_projections(real, setting=True).groups > 0
    joined = saved_tensor_bytes(real, ids)
    weights = sum(m.weight.numel() * 4 for m in real.modules() if type(m).__name__ == "FusedLinear")
    assert joined_plan.fused_copies == 2 * weights > 0
    # attention keeps queries, keys and values as they come: the join alone (before use_cache=False a
    # decoder's key/value cache copied the keys and values, and a kept slice held the rest of the join)
    assert joined - plain == weights
    assert auto.fused_copies == off.fused_copies == 0 and joined_plan.peak - off.peak == joined_plan.fused_copies
    assert plan("d", fused_projections=True, lora={"enabled": True, "r": 4}).fused_copies == 0


def test_cuda_graphs_plan_sizes_calls_at_their_graph_shapes(tmp_path, tiny_bert):
    """train.compile cuda-graphs pads rows and widths to graph sizes: 12 anchors of up to 20 tokens
    run as 16 rows of 24 (graph_shapes.graph_size), so the plan's activations are those of 16 x 24."""
    from transformers import AutoModel

    def plan(compile):
        recipe = load_recipe(write_recipe(tmp_path, tiny_bert, model={"max_length": 20},
                                          train={"batch_size": 12, "group_size": 1, "one_forward": False,
                                                 "compile": compile}))
        return plan_memory(recipe, device=torch.device("cpu"), capacity=1 << 40)

    plain, graphs = plan(False), plan("cuda-graphs")
    backbone = AutoModel.from_pretrained(tiny_bert, attn_implementation="sdpa")
    assert plain.lengths == (20, 20) and graphs.lengths == (24, 24)
    real = 2 * _real_saved_bytes(backbone, 16, 24)  # two calls (one a side) of 16 rows
    assert 0.98 * real <= graphs.activations <= 1.02 * real
    assert graphs.activations > 1.3 * plain.activations
