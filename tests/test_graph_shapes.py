"""Forward calls padded to few shapes for CUDA graphs (hmcl_cli/modeling/graph_shapes.py):
the buckets' bounds, the position-table cap, and training on filled batches giving the same loss
and gradients as the batches as they are."""

import pytest
import torch

from conftest import assert_grads_close, make_trainer
from hmcl_cli.modeling.graph_shapes import GraphShapes, capped, graph_size, padded_width, width_limit
from hmcl_cli.training.batching import StepBatches


def test_graph_sizes_are_few_and_waste_at_most_an_eighth_past_64():
    sizes = [graph_size(n) for n in range(1, 4097)]
    assert all(s >= n for n, s in zip(range(1, 4097), sizes))
    assert [graph_size(n) for n in (1, 8, 9, 63, 64, 65, 72, 73, 128, 129, 200, 256, 257)] == \
        [8, 8, 16, 64, 64, 72, 72, 80, 128, 144, 208, 256, 288]
    assert all((graph_size(n) - n) / n <= 0.125 for n in range(65, 4097))
    assert all(graph_size(n) % 8 == 0 for n in range(1, 65))
    for low in (64, 128, 256, 512, 1024, 2048):  # eight sizes per doubling
        assert len({graph_size(n) for n in range(low + 1, 2 * low + 1)}) == 8


def test_width_is_capped_by_an_absolute_position_table(tiny_bert, tiny_qwen):
    from transformers import AutoModel, RobertaConfig

    assert width_limit(AutoModel.from_pretrained(tiny_bert)) == 256  # its max_position_embeddings
    assert width_limit(AutoModel.from_pretrained(tiny_qwen)) is None  # rotary: no table
    roberta = AutoModel.from_config(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  max_position_embeddings=66, pad_token_id=1))
    assert width_limit(roberta) == 64  # positions start after the padding index
    assert padded_width(50, None) == 64 and padded_width(50, 60) == 60 and padded_width(70, 64) == 70
    assert padded_width(300, None) == 320  # encoding's widths: multiples of 16, then 64
    assert capped(graph_size(250), 250, 252) == 252 and capped(graph_size(250), 250, None) == 256


@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_qwen"])
def test_fill_pads_on_the_padding_side_and_copies_the_last_row(kind, request):
    from hmcl_cli.modeling.encoder import EmbeddingModel

    model = EmbeddingModel.load(str(request.getfixturevalue(kind)))
    shapes = GraphShapes(model)
    ids = torch.arange(1, 5 * 130 + 1).reshape(5, 130) % 50 + 3
    mask = torch.ones_like(ids)
    skip = torch.tensor([0, 1, 2, 3, 4])
    f_ids, f_mask, f_skip = shapes.fill(ids, mask, skip)
    assert f_ids.shape == f_mask.shape == (8, 144) and f_skip.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    real = slice(14, None) if model.settings.padding_side == "left" else slice(0, 130)
    pad = slice(0, 14) if model.settings.padding_side == "left" else slice(130, None)
    assert torch.equal(f_ids[:5, real], ids) and torch.equal(f_ids[5:, real], ids[-1:].expand(3, -1))
    assert bool((f_mask[:, real] == 1).all()) and bool((f_mask[:, pad] == 0).all())
    assert bool((f_ids[:, pad] == model.pad_token_id).all())
    assert shapes.seen == {(8, 144): 1}
    assert shapes.fill(ids[:4, :128], mask[:4, :128], None)[0].shape == (8, 128)  # already a graph width


def _step_results(t, batches):
    out = []
    for b in batches:
        loss, _ = t._forward_backward(b, 1.0)
        out.append((loss.detach(), [p.grad.clone() for p in t.model.parameters() if p.grad is not None]))
        t.optimizer.zero_grad()
    return out


@pytest.mark.parametrize("setting", ["per-side", "joined", "grad-cache", "prompt-skipped", "segments"])
def test_filled_batches_train_as_the_batches_themselves(tmp_path, tiny_bert, setting):
    """Rows filled with copies of the last one and widths padded give the same loss and gradients
    (the filler rows' outputs are dropped, so nothing flows back from them); every call runs at a
    bucketed shape."""
    sections = {"per-side": {"train": {"one_forward": False}},
                "joined": {"train": {"one_forward": True}},
                "grad-cache": {"train": {"grad_cache_chunk": 5}},
                "prompt-skipped": {"model": {"query_prompt": "find: ", "include_prompt": False}},
                "segments": {"model": {"segments": {"length": 16, "overlap": 2}}}}[setting]
    t = make_trainer(tmp_path, tiny_bert, **sections)
    t.model.eval()  # no dropout: both runs must see the same function
    batches = [StepBatches(t.data, t.model, t.plan, 0, 0, t.cfg.group_size, 0)[i] for i in range(2)]
    assert t.graph_shapes is None
    plain = _step_results(t, batches)
    t.graph_shapes = GraphShapes(t.model)
    filled = _step_results(t, batches)
    for (l0, g0), (l1, g1) in zip(plain, filled):
        assert torch.allclose(l0, l1, atol=1e-5), (l0, l1)
        assert_grads_close(g0, g1)
    seen = t.graph_shapes.seen
    assert seen and all(r % 8 == 0 and w % 8 == 0 for r, w in seen)
    rows = {b["q_input_ids"].size(0) + b["c_input_ids"].size(0) for b in batches}
    assert any(r not in rows for r, _ in seen)  # some call was filled (else the test shows nothing)


def test_cuda_graphs_setting_pads_calls_and_reports_the_shapes(tmp_path, tiny_bert, monkeypatch, capsys):
    """train.compile cuda-graphs: the trainer pads every forward call to a graph shape and says at
    the end how many shapes it ran (each a graph per compiled layer). Compiling is left out here
    (a CPU has no CUDA graphs; tests/test_benchmark_scripts.py compiles)."""
    import hmcl_cli.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "compile_layers", lambda backbone, mode=None: 0)
    t = make_trainer(tmp_path, tiny_bert, train={"compile": "cuda-graphs", "max_steps": 4, "eval_steps": 100})
    assert isinstance(t.graph_shapes, GraphShapes) and t.model.unpad is False
    t.train()
    seen = t.graph_shapes.seen
    assert sum(seen.values()) >= 4 and all(r % 8 == 0 and w % 8 == 0 for r, w in seen)
    out = capsys.readouterr()
    assert "no graphs are recorded" in out.err  # a CPU: compiled layers, no CUDA graphs
    assert (f"train.compile cuda-graphs: {len(seen)} input shapes in {sum(seen.values())} forward calls "
            "(no CUDA graphs without a CUDA device)") in out.out
    assert "unpadded" not in out.out.split("memory plan")[1].splitlines()[0]  # planned padded, as it runs
