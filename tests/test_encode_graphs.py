"""Encoding replayed from CUDA graphs (model.encode_graphs; hmcl_cli/modeling/encode_graphs.py).

A CPU runs the graphs' batches eagerly on their static buffers (encode_graphs.CAPTURE false): the
widths, the filled rows, the order and the fall-backs are checked here; the capture itself by the
tests marked for a CUDA device (run on the lent GPU: benchmarks/device/run.sh gputests)."""

import pytest
import torch

from hmcl_cli.modeling import encode_graphs
from hmcl_cli.modeling.encode_graphs import MIN_BATCHES, plan_graphs
from hmcl_cli.modeling.graph_shapes import graph_width
from hmcl_cli.modeling.encoder import EmbeddingModel

WORDS = "where is my order refund how long does a take to reach card after i return it ship what the".split()
# 200 distinct texts of 1 to 40 words, some repeated, and one long text alone at its width; with
# batch_size 4, token-sized batches (encoder.encode_batches) give each short width several batches
TEXTS = [f"{i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range((i * 13) % 40)) for i in range(200)]
TEXTS += TEXTS[:5] + [" ".join(WORDS * 4)]


def test_widths_are_few_multiples():
    assert [graph_width(n) for n in (1, 16, 17, 100, 256, 257, 300, 1000)] == [16, 16, 32, 112, 256, 320, 320, 1024]


def test_plan_takes_widths_enough_batches_share():
    widths = [64] * MIN_BATCHES + [48] * (MIN_BATCHES - 1) + [512] * MIN_BATCHES + [16] * 10
    assert plan_graphs(widths, "auto") == {64, 16}  # 48: too few batches; 512: past auto's 256 tokens
    assert plan_graphs(widths, True) == {64, 16, 512}


def test_plan_caps_the_number_of_graphs(monkeypatch):
    monkeypatch.setattr(encode_graphs, "MAX_GRAPHS", 2)
    assert plan_graphs([16] * 3 + [32] * 3 + [48] * 3, True) == {16, 32}  # the first (widest) ones


@pytest.fixture
def eager_graphs(monkeypatch):
    """The graph path on a CPU: no capture, no refusal for the device; counts the batches it ran."""
    from hmcl_cli.modeling import encoder

    monkeypatch.setattr(encode_graphs, "CAPTURE", False)
    monkeypatch.setattr(encode_graphs, "on_cuda", lambda model: True)
    monkeypatch.setattr(encoder, "batch_growth", lambda device: encoder.GROW)  # a GPU's batches
    runs = []
    real = encode_graphs._Graph.run

    def counted(self, host):
        runs.append(tuple(host["input_ids"].shape))
        return real(self, host)
    monkeypatch.setattr(encode_graphs._Graph, "run", counted)
    return runs


@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_qwen"])
def test_graph_batches_give_the_eager_embeddings_in_order(kind, request, eager_graphs):
    """BERT (right padding, mean pooling) and Qwen3 (left padding, last token): batches padded to
    the graph widths and filled with copies of their last row give each text its own embedding."""
    model = EmbeddingModel.load(str(request.getfixturevalue(kind)))
    model.unpad = False
    model.encode_graphs = False
    ref = model.encode(TEXTS, batch_size=4)
    model.encode_graphs = "auto"
    got = model.encode(TEXTS, batch_size=4)
    assert eager_graphs, "no batch took the graph path"
    # filled to its width's rows (the first batch's tokens: 4 x the long text's), bucketed
    longest = max(len(x) for x in model.tokenize(TEXTS))
    assert all(width % 16 == 0 and rows == 4 * longest // width for rows, width in eager_graphs), eager_graphs
    assert len({w for _, w in eager_graphs}) >= 3
    assert 96 not in {w for _, w in eager_graphs}  # the long text's batch, alone at its width, ran eagerly
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)


def test_prompt_left_out_of_the_pooling_in_graph_batches(tiny_bert, eager_graphs):
    model = EmbeddingModel.load(str(tiny_bert), doc_prompt="where is ", include_prompt=False)
    model.unpad = False
    model.encode_graphs = False
    ref = model.encode(TEXTS, batch_size=4)
    model.encode_graphs = "auto"
    got = model.encode(TEXTS, batch_size=4)
    assert eager_graphs and torch.allclose(got, ref, atol=1e-5)


def test_a_capture_that_fails_encodes_eagerly_and_says_why(tiny_bert, eager_graphs, monkeypatch, capsys):
    model = EmbeddingModel.load(str(tiny_bert))
    model.encode_graphs = False
    ref = model.encode(TEXTS, batch_size=4)
    model.encode_graphs = "auto"

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(encode_graphs, "_Graph", broken)
    got = model.encode(TEXTS, batch_size=4)
    assert torch.allclose(got, ref, atol=1e-5)
    err = capsys.readouterr().err
    assert "model.encode_graphs: capturing a CUDA graph failed (RuntimeError: operation not permitted" in err
    assert "without graphs from here on" in err
    assert "capturing a CUDA graph failed" in encode_graphs.graph_refusal(model)  # off for later calls too


def test_a_replay_that_disagrees_with_the_eager_forward_turns_graphs_off(tiny_bert, monkeypatch, capsys):
    monkeypatch.setattr(encode_graphs, "CAPTURE", False)
    monkeypatch.setattr(encode_graphs, "on_cuda", lambda model: True)
    model = EmbeddingModel.load(str(tiny_bert))
    model.encode_graphs = False
    ref = model.encode(TEXTS, batch_size=4)
    model.encode_graphs = "auto"
    real = encode_graphs._Graph.run
    monkeypatch.setattr(encode_graphs._Graph, "run", lambda self, host: -real(self, host))  # a wrong replay

    class Checked(encode_graphs.GraphedBatches):  # as if captured: the first replay is checked
        def __init__(self, *args):
            super().__init__(*args)
            self.checked = False
    monkeypatch.setattr(encode_graphs, "GraphedBatches", Checked)
    got = model.encode(TEXTS, batch_size=4)
    assert torch.allclose(got, ref, atol=1e-5)  # the checked batch's eager result, then eager batches
    assert "a graph's replay disagreed with the eager forward" in capsys.readouterr().err
    assert model._graphs_broken


def test_refusals(tiny_bert, monkeypatch):
    model = EmbeddingModel.load(str(tiny_bert))
    assert encode_graphs.graph_refusal(model) == "not on a CUDA device"
    model.encode_graphs = False
    assert encode_graphs.graph_refusal(model) == "model.encode_graphs false"
    model.encode_graphs = "auto"
    monkeypatch.setattr(encode_graphs, "on_cuda", lambda m: True)
    assert encode_graphs.graph_refusal(model) == ""
    from hmcl_cli.modeling.layers import compile_layers

    compile_layers(model.backbone)  # (compiled on first call: none here)
    assert encode_graphs.graph_refusal(model) == "layers compiled (train.compile)"


def test_recipe_key_reaches_the_model(tmp_path, tiny_bert):
    from conftest import write_recipe

    from hmcl_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert), overrides=["model.encode_graphs=false"])
    model = EmbeddingModel.from_recipe(recipe.model, base_dir=tmp_path)
    assert model.encode_graphs is False
    with pytest.raises(Exception, match="encode_graphs"):
        load_recipe(write_recipe(tmp_path, tiny_bert), overrides=["model.encode_graphs=sometimes"])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_qwen"])
def test_cuda_captured_graphs_give_the_eager_embeddings(kind, request, monkeypatch):
    """On a GPU: graphs are captured and replayed (none left after the call), embeddings as eager."""
    model = EmbeddingModel.load(str(request.getfixturevalue(kind))).to("cuda")
    model.encode_graphs = False
    ref = model.encode(TEXTS, batch_size=4)
    model.encode_graphs = "auto"
    captured = []
    real = encode_graphs._Graph.__init__

    def counted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        captured.append(self.graph is not None)
    monkeypatch.setattr(encode_graphs._Graph, "__init__", counted)
    got = model.encode(TEXTS, batch_size=4)
    again = model.encode(TEXTS, batch_size=4)
    assert captured and all(captured) and not model._graphs_broken
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.999
    assert torch.equal(got, again)


def test_encode_batches_are_sized_by_the_first_batchs_tokens():
    from hmcl_cli.modeling.encoder import GROW, encode_batches

    lengths = sorted([300] * 3 + [40] * 50 + [9] * 2000 + [3] * 40, reverse=True)
    batches = encode_batches(lengths, 8)
    assert batches[0] == (0, 8)  # the longest texts: batch_size of them
    assert [b[0] for b in batches[1:]] == [b[1] for b in batches[:-1]] and batches[-1][1] == len(lengths)
    for start, stop in batches[1:]:
        rows = stop - start
        # padded to its graph width (no padding exceeds it): no more tokens than the first's real ones
        assert rows * graph_width(lengths[start]) <= 8 * 300
        assert stop == len(lengths) or 8 <= rows <= GROW * 8
    assert max(stop - start for start, stop in batches) == GROW * 8  # short texts: the cap
    assert encode_batches([], 8) == [] and encode_batches([5], 8) == [(0, 1)]


def test_batches_grow_on_a_gpu_only():
    from hmcl_cli.modeling.encoder import GROW, batch_growth

    assert batch_growth(torch.device("cpu")) == 1 and batch_growth(torch.device("cuda")) == GROW


def test_a_cpu_encodes_batch_size_texts_a_batch(tiny_bert, monkeypatch):
    from hmcl_cli.modeling import encoder

    model = EmbeddingModel.load(str(tiny_bert))
    sizes = []
    real = encoder.HostRows.add
    monkeypatch.setattr(encoder.HostRows, "add", lambda self, idx, values: sizes.append(len(idx)) or real(self, idx, values))
    model.encode(TEXTS, batch_size=4)
    assert set(sizes[:-1]) == {4}


def test_graph_widths_stop_at_the_position_table(tiny_bert, tmp_path, eager_graphs):
    """A BERT with 40 positions: a batch whose longest text has 36 tokens runs at 40, not at
    graph_width's 48 (positions 40-47 would index past the table)."""
    import shutil

    from transformers import AutoConfig, AutoModel

    folder = tmp_path / "bert-40"
    shutil.copytree(tiny_bert, folder)
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = 40
    AutoModel.from_config(config).save_pretrained(folder)
    model = EmbeddingModel.load(str(folder), max_length=40)
    model.unpad = False
    texts = [f"{i} " + " ".join((WORDS * 2)[: 34 - i % 3]) for i in range(40)]  # 34-37 tokens a text
    assert max(len(x) for x in model.tokenize(texts)) > 32
    model.encode_graphs = False
    ref = model.encode(texts, batch_size=4)
    model.encode_graphs = "auto"
    got = model.encode(texts, batch_size=4)
    assert eager_graphs and {w for _, w in eager_graphs} == {40}
    assert torch.allclose(got, ref, atol=1e-5)
