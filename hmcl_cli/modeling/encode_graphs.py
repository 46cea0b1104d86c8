"""Encoding replayed from CUDA graphs: one graph per padded width (``model.encode_graphs``).

On a GPU, encoding short texts is bound by the host, not the GPU: each batch is a few hundred
small kernels, and queueing them takes longer than running them. A CUDA graph records a batch's
kernels once and replays them in one launch. On the H200 of 2026-12-04, MiniLM shape, 50,000
short texts, batch 256 (benchmarks/RESULTS.md): hmcl's encode 25.9k sentences/s, the same batches
replayed from graphs 48.7k (1.88x; sentence-transformers' ``encode`` 12.4k), embeddings equal
(mean cosine 1.00000).

A graph replays fixed shapes, so:

* texts are sorted longest first and batched by tokens (as the eager loop: encoder.encode_batches),
  and each batch is padded to a width from a short list (:func:`graph_shapes.graph_width`:
  multiples of 16 up to 256 tokens, then of 64, never past an absolute position table), and
  filled up to its width's rows with copies of its last row (their embeddings are dropped);
* a width gets a graph where at least :data:`MIN_BATCHES` batches share it (a capture runs its
  first batch twice: a warm-up, then the recorded run); the other batches, and those of widths past :data:`MAX_GRAPHS`
  graphs, run eagerly as without graphs (unpadded where ``model.unpad`` allows);
* graphs live for one ``encode`` call and share one memory pool (replayed in the order captured:
  widths only shrink), so nothing stays on the GPU between calls — a training run's evaluation
  does not keep graphs beside its optimizer state.

The first graph of a call is checked: its replay must give the eager forward's embeddings on the
same batch (cosine >= 0.999 per row). A capture that fails, or a check that does not hold, makes
the model run eagerly from then on, with a warning that says why.

``auto`` (the default) uses graphs on a CUDA device for widths up to 256 tokens, where the
launches bound the batch; longer texts run eagerly, unpadded where ``model.unpad`` allows (there
the padding a graph computes would cost more than its launches save). ``true``: every width.
Never with ``model.segments`` (segments run eagerly), on a CPU, where the model checks its
padding mask on the host (``train: attention mask`` says so at the start of training: a capture
cannot wait for the GPU), with a sharded backbone (FSDP) or compiled layers (``train.compile``).

:data:`CAPTURE` false (tests) runs the same padded, filled batches eagerly on the same static
buffers: a CPU checks the widths, the filling and the order with it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from hmcl_cli.console import warn
from hmcl_cli.modeling.graph_shapes import padded_width, width_limit

MIN_BATCHES = 3  # batches sharing a width before it gets a graph
MAX_GRAPHS = 48  # graphs per call; widths past it run eagerly
AUTO_MAX_WIDTH = 256  # `auto`: widths up to this many tokens replay graphs
CHECK_COSINE = 0.999
CAPTURE = True  # tests on a CPU set False: the same batches run eagerly on the static buffers


def graph_refusal(model: Any) -> str:
    """Why ``model`` encodes without CUDA graphs ('' when it may use them)."""
    if model.encode_graphs is False:
        return "model.encode_graphs false"
    if not on_cuda(model):
        return "not on a CUDA device"
    if model.segments is not None:
        return "model.segments on (segments run eagerly)"
    if model._graphs_broken:
        return model._graphs_broken
    from hmcl_cli.training.sharding import is_sharded

    if any(is_sharded(p) for p in model.parameters()):
        return "the backbone is sharded (FSDP: each forward gathers weights from the other processes)"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.backbone.modules()):
        return "layers compiled (train.compile)"
    if model.mask_refusal():
        return "the model checks its padding mask on the host (a capture cannot wait for the GPU)"
    return ""


def on_cuda(model: Any) -> bool:
    return model.device.type == "cuda"


def plan_graphs(widths: list[int], setting: Any) -> set[int]:
    """The widths that get a graph, given each batch's width in order: those at least
    :data:`MIN_BATCHES` batches share (and, under ``auto``, at most :data:`AUTO_MAX_WIDTH`
    tokens), the first :data:`MAX_GRAPHS` of them."""
    counts: dict[int, int] = {}
    for w in widths:
        counts[w] = counts.get(w, 0) + 1
    chosen = [w for w in counts if counts[w] >= MIN_BATCHES and (setting is True or w <= AUTO_MAX_WIDTH)]
    return set(chosen[:MAX_GRAPHS])


class _Graph:
    """One width's static buffers and, where captured, its graph and output."""

    def __init__(self, model: Any, host: dict[str, torch.Tensor], capture: bool, pool: Any):
        dev = model.device
        self.model = model
        self.static = {k: v.to(dev) for k, v in host.items()}
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager()  # warm-up off the capture (cuBLAS workspaces, kernel choice)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = self.eager()

    def eager(self) -> torch.Tensor:
        # autocast's cache of weight copies would keep tensors made while capturing: off
        with _autocast(self.model.device):
            return self.model(**self.static, padded=True)

    def run(self, host: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embeddings of ``host``'s batch (copied into the static buffers), a fresh tensor."""
        pinned = self.model.device.type == "cuda"
        for k, v in host.items():
            self.static[k].copy_(v.pin_memory() if pinned else v, non_blocking=pinned)
        if self.graph is None:
            return self.eager()
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites it


def _autocast(device: torch.device) -> Any:
    from hmcl_cli.modeling.encoder import autocast_for

    return autocast_for(device, cache=False)


class GraphedBatches:
    """A call's batches replayed from graphs: :meth:`encode` gives a batch's embeddings where its
    width has a graph (None: the caller encodes it eagerly, as without graphs). ``ids``: the
    call's token lists; ``order``: longest first; ``batches``: (start, stop) spans of ``order``
    (encoder.encode_batches: as many rows as fit the first batch's tokens at each width, so every
    full batch of a width has the same rows)."""

    def __init__(self, model: Any, ids: list[list[int]], order: list[int], batches: list[tuple[int, int]], skip: int):
        self.model, self.ids, self.skip = model, ids, skip
        self.rows: dict[int, int] = {}  # width -> rows of its graph (its largest batch's)
        self.limit = width_limit(model.backbone)  # no padding past an absolute position table
        widths = []
        for start, stop in batches:
            w = padded_width(len(ids[order[start]]), self.limit)
            widths.append(w)
            self.rows[w] = max(self.rows.get(w, 0), stop - start)
        self.planned = plan_graphs(widths, model.encode_graphs)
        self.capture = CAPTURE
        self.pool = torch.cuda.graph_pool_handle() if self.planned and self.capture else None
        self.graphs: dict[int, Optional[_Graph]] = {}
        self.checked = not self.capture
        if self.planned:
            model.check_masks()  # its probe reads back from the GPU: before any capture

    def encode(self, idx: list[int]) -> Optional[torch.Tensor]:
        """Embeddings [len(idx), D] of the batch ``idx`` (positions in ``ids``) from its width's
        graph, or None where it has none."""
        rows = [self.ids[i] for i in idx]
        width = padded_width(len(rows[0]), self.limit)
        if width not in self.planned or self.model._graphs_broken:
            return None
        host = self.model.pad(rows + [rows[-1]] * (self.rows[width] - len(rows)), multiple_of=width,
                              pool_skip=self.skip)
        if width not in self.graphs:
            self.graphs[width] = _capture(self.model, host, self.capture, self.pool)
        g = self.graphs[width]
        if g is None:
            return None
        emb = g.run(host)
        if not self.checked:
            self.checked = True
            _check(self.model, g, emb)
            if self.model._graphs_broken:
                return None
        return emb[:len(idx)]

    def close(self) -> None:
        """Drop the graphs and their pool (nothing stays on the GPU after the call)."""
        self.graphs.clear()
        self.pool = None


def _capture(model: Any, host: dict[str, torch.Tensor], capture: bool, pool: Any) -> Optional[_Graph]:
    """A width's graph, or None (and graphs off for this model, with a warning) where capturing fails."""
    try:
        return _Graph(model, host, capture, pool)
    except Exception as e:  # noqa: BLE001 - any failure to capture: encode eagerly, say why
        model._graphs_broken = f"capturing a CUDA graph failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        warn(f"model.encode_graphs: {model._graphs_broken}; encoding without graphs from here on")
        return None


def _check(model: Any, g: _Graph, replayed: torch.Tensor) -> None:
    """The first replay of a call against the eager forward on the same batch."""
    eager = g.eager().float()
    cos = torch.nn.functional.cosine_similarity(replayed.float(), eager, dim=-1).min().item()
    if not cos >= CHECK_COSINE:
        model._graphs_broken = (f"a graph's replay disagreed with the eager forward on the same batch (cosine "
                                f"{cos:.4f} < {CHECK_COSINE})")
        warn(f"model.encode_graphs: {model._graphs_broken}; encoding without graphs from here on")
