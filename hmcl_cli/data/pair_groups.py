"""Groups of texts linked by symmetric pairs, so that ``hmcl prepare`` draws each group into one split.

``hmcl prepare`` draws a query's split by a seeded hash of the query: every candidate of one query
lands in one split. A symmetric source (``symmetric: true``: STS, NLI or labelled pairs read in
both directions) yields ``a -> b`` and ``b -> a`` from one row; drawn by their queries, the
other half of a dev pair is in train about as often as train's share (``dev_fraction`` 0.1: 1,019
of the 1,136 dev pairs drawn from STS-B's German train were train pairs the other way round, and
cosine similarity does not know the order). The dev metrics then score what training saw, and the
best checkpoint is the one that remembers it best.

Here each text of the drawn symmetric sources is a node and each pair an edge; a connected group
(a text and every text paired with it, and theirs in turn) is drawn whole, by the draw of one
member chosen by a second, independent hash: a group's draw is as uniform as a query's, so
``dev_fraction`` still draws that share of the groups, and no pair or text of such a source is in
two splits. STS-B's groups are small (English train: 4,863 groups of 10,536 texts, the largest 210
texts), so the splits' sizes stay close to their fractions; :meth:`PairGroups.largest` says when one
group is large enough to tilt them.

Data that grows between runs (a scheduled retraining on appended rows) keeps each group's split
as long as no new row links two groups: the joined group is drawn by one member, so the texts of
the other may change split (a query-level draw never moves a query).

Memory: an integer per text and a size and a draw per group (Python's own hash of a ``(prompt,
text)`` names a text within the process; the texts themselves are not kept): +48 MB of 920 MB for
`hmcl prepare` of 200,000 symmetric rows (and 1.27x its time: those sources are read twice).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional


def _pick(text: str, seed: int) -> float:
    """The hash that picks a group's drawing member: independent of the draw itself."""
    return int.from_bytes(hashlib.sha256(f"pick\0{seed}\0{text}".encode()).digest()[:8], "big") / 2**64


class PairGroups:
    """Union-find over ``(prompt, text)`` nodes; each root keeps the draw of the member with the
    lowest pick hash. ``draw(key)`` is ``None`` for a key no symmetric pair holds."""

    def __init__(self, seed: int, draw_of) -> None:
        self._seed = seed
        self._draw_of = draw_of  # the seeded draw of a query text (prepare.seeded_draw)
        self._parent: dict[int, int] = {}
        self._best: dict[int, tuple[float, float]] = {}  # root -> (pick, draw) of its drawing member
        self._size: dict[int, int] = {}  # root -> texts in its group

    def _find(self, node: int) -> int:
        parent = self._parent
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    def _add(self, key: tuple[str, str]) -> int:
        node = hash(key)
        if node not in self._parent:
            self._parent[node] = node
            self._best[node] = (_pick(key[1], self._seed), self._draw_of(key[1]))
            self._size[node] = 1
        return node

    def link(self, key: tuple[str, str], others: Iterable[tuple[str, str]]) -> None:
        """``key`` and each of ``others`` (a row's query and candidates) are in one group."""
        root = self._find(self._add(key))
        for other in others:
            b = self._find(self._add(other))
            if b == root:
                continue
            if self._size[b] > self._size[root]:
                root, b = b, root
            self._parent[b] = root
            self._size[root] += self._size.pop(b)
            self._best[root] = min(self._best[root], self._best.pop(b))

    def draw(self, key: tuple[str, str]) -> Optional[float]:
        node = hash(key)
        if node not in self._parent:
            return None
        return self._best[self._find(node)][1]

    def __len__(self) -> int:
        """Texts (nodes) in all groups."""
        return len(self._parent)

    @property
    def groups(self) -> int:
        return len(self._size)

    def largest(self) -> int:
        return max(self._size.values(), default=0)
