"""Partitioning a model's blocks over nodes: pure functions over half-open ranges.

Node 0 is the starter (it also runs the embeddings); the last node is the
finisher (it also runs the final LayerNorm and the head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class PartitionError(ValueError):
    """A layer split that cannot be used."""


@dataclass(frozen=True)
class Shard:
    """Blocks [start, stop) of an n_layer model."""
    start: int
    stop: int
    n_layer: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.n_layer:
            raise PartitionError(
                f"layer range [{self.start}, {self.stop}) is not a non-empty part of 0..{self.n_layer}")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.n_layer

    @property
    def n_blocks(self) -> int:
        return self.stop - self.start


def even_split(n_layer: int, n_nodes: int) -> list[Shard]:
    """Near-equal contiguous shares. When the split is uneven the middle nodes
    take the extra blocks: the first and last also carry the embeddings and
    the head."""
    if n_nodes <= 0:
        raise PartitionError(f"the number of nodes must be positive, got {n_nodes}")
    if n_layer < n_nodes:
        raise PartitionError(f"cannot split {n_layer} layers over {n_nodes} nodes: "
                             "every node needs at least one layer")
    base, extra = divmod(n_layer, n_nodes)
    # Extra blocks go to the middle nodes first, then outwards.
    order = sorted(range(n_nodes), key=lambda i: (i in (0, n_nodes - 1), abs(i - (n_nodes - 1) / 2)))
    sizes = [base] * n_nodes
    for i in order[:extra]:
        sizes[i] += 1
    return shards_from_sizes(sizes)


def shards_from_sizes(sizes: Sequence[int]) -> list[Shard]:
    if not sizes:
        raise PartitionError("a split needs at least one node")
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
        raise PartitionError(f"every node needs a positive whole number of layers, got {list(sizes)}")
    n_layer = sum(sizes)
    out, start = [], 0
    for s in sizes:
        out.append(Shard(start, start + s, n_layer))
        start += s
    return out


def manual_split(n_layer: int, layers: Sequence[int | Sequence[int]]) -> list[Shard]:
    """A user's split: per node either a layer count or a [start, stop) pair.

    Counts and ranges may not be mixed. Ranges must be contiguous and cover
    0..n_layer exactly.
    """
    if all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        shards = shards_from_sizes(list(layers))  # type: ignore[arg-type]
        if shards[-1].stop != n_layer:
            raise PartitionError(f"the layer counts {list(layers)} add up to {shards[-1].stop}, "
                                 f"the model has {n_layer} layers")
        return shards
    shards = []
    expect = 0
    for i, r in enumerate(layers):
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
            raise PartitionError(f"node {i}: layers must be a count or a [start, stop] pair, got {r!r}")
        if r[0] != expect:
            raise PartitionError(f"node {i}: layers start at {r[0]}, expected {expect} "
                                 "(ranges must be contiguous, in ring order)")
        try:
            shards.append(Shard(r[0], r[1], n_layer))
        except PartitionError as e:
            raise PartitionError(f"node {i}: {e}") from None
        expect = r[1]
    if expect != n_layer:
        raise PartitionError(f"the layer ranges end at {expect}, the model has {n_layer} layers")
    return shards
