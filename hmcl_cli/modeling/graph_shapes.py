"""Few batch shapes, for kernels replayed from CUDA graphs.

A CUDA graph replays the kernels of one input shape. Encoding (:mod:`encode_graphs`) and
training with ``train.compile: cuda-graphs`` (each transformer layer compiled in
torch.compile's reduce-overhead mode) record a graph per distinct shape: about two eager runs of
that shape each, and memory each. A training batch's shape is its rows (anchors plus the distinct
candidates drawn, which vary from step to step where examples have several candidates) by its
width (the longest text, a multiple of 8), so as they are a run meets a new shape on many steps:
211 shapes in 1,496 forward calls over 4 epochs of recipes/sts-nli-en.yaml, 118 of them in the
first epoch (``benchmarks/graph_shapes.py``).

So the batches are padded to a short list of shapes:

* training (:class:`GraphShapes`): rows and width each to :func:`graph_size` (multiples of 8 up
  to 128, then 8 sizes per doubling: at most 12.5% more past 64), filled with copies of the last
  row, whose outputs are dropped. On sts-nli-en: 47 shapes, 41 of them in the first epoch, for
  1.06x the token slots. Widths of multiples of 16, as encoding takes, gave 31 shapes for 1.27x:
  short texts often end just past a multiple of 16;
* encoding (:func:`graph_width`): multiples of 16 up to 256 tokens, then of 64 (its batches come
  sorted by length, so each width gets many batches);
* neither past the positions an absolute-position model has (:func:`width_limit`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch


def graph_width(length: int) -> int:
    """The padded width a batch whose longest text has ``length`` tokens runs at: a multiple of 16
    up to 256 tokens, of 64 beyond (few distinct widths, so few graphs; at most 15 padded tokens a
    row where texts are short)."""
    step = 16 if length <= 256 else 64
    return max(step, -(-length // step) * step)


def graph_size(n: int) -> int:
    """The rows, or the width, a training batch of ``n`` runs at: a multiple of 8 up to 128, then
    one of 8 sizes per doubling (144, 160, ... 256; 288, 320, ... 512; ...): at most 12.5% more
    past 64."""
    step = 8
    while n > 16 * step:
        step *= 2
    return max(step, -(-n // step) * step)


def width_limit(backbone: torch.nn.Module) -> Optional[int]:
    """The most tokens a row of ``backbone`` may have: the rows of its absolute position table
    (``position_embeddings``, less RoBERTa's offset past the padding index); None for a model
    without one (rotary or relative positions)."""
    from hmcl_cli.modeling.unpad import position_offset

    for name, module in backbone.named_modules():
        if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - position_offset(backbone.config)
    return None


def capped(width: int, length: int, limit: Optional[int]) -> int:
    """``width`` tokens for a batch of ``length``, at most ``limit`` (a batch already wider keeps
    its width)."""
    return width if limit is None else max(length, min(width, limit))


def padded_width(length: int, limit: Optional[int]) -> int:
    """The width an encoding batch whose longest text has ``length`` tokens runs at from a graph:
    :func:`graph_width`, at most ``limit``."""
    return capped(graph_width(length), length, limit)


class GraphShapes:
    """Training forward calls padded to few shapes (``train.compile: cuda-graphs``), and the
    shapes run so far (:attr:`seen`: (rows, width) -> calls; a graph each, per compiled layer)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.limit = width_limit(model.backbone)
        self.seen: Counter = Counter()

    def width(self, length: int) -> int:
        """The width a training batch of ``length`` tokens runs at."""
        return capped(graph_size(length), length, self.limit)

    def fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_skip: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The batch padded to its graph's width (on the padding side) and filled to its graph's
        rows with copies of the last row; the caller keeps the first ``input_ids.size(0)`` outputs."""
        n, w = input_ids.shape
        rows, width = graph_size(n), self.width(w)
        self.seen[(rows, width)] += 1
        input_ids, attention_mask = self.model.widen(input_ids, attention_mask, width)
        if rows > n:
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(rows - n, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(rows - n, -1)])
            if pool_skip is not None:
                pool_skip = torch.cat([pool_skip, pool_skip[-1:].expand(rows - n)])
        return input_ids, attention_mask, pool_skip

    def summary(self, graphs: bool = True) -> str:
        """The shapes run so far, in a line (``graphs``: recorded as CUDA graphs, on a CUDA device)."""
        calls = sum(self.seen.values())
        each = "a CUDA graph each, per compiled layer" if graphs else "no CUDA graphs without a CUDA device"
        return (f"{len(self.seen)} input shapes in {calls} forward calls ({each}): "
                + ", ".join(f"{r}x{w}" for r, w in sorted(self.seen)))
