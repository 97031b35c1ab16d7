"""Partitioning: table tests for even_split, shards_from_sizes and manual_split
(pure functions over half-open layer ranges), and the errors a user can cause."""
from __future__ import annotations

import pytest

from mdi.ring.plan.partition import PartitionError, Shard, even_split, manual_split, shards_from_sizes


def sizes(shards: list[Shard]) -> list[int]:
    return [s.n_blocks for s in shards]


def assert_valid_split(shards: list[Shard], n_layer: int, n_nodes: int) -> None:
    assert len(shards) == n_nodes
    assert shards[0].start == 0 and shards[-1].stop == n_layer
    for a, b in zip(shards, shards[1:]):
        assert a.stop == b.start  # contiguous: no gap, no overlap
    assert all(s.n_layer == n_layer and s.n_blocks >= 1 for s in shards)
    assert [s.is_first for s in shards] == [i == 0 for i in range(n_nodes)]
    assert [s.is_last for s in shards] == [i == n_nodes - 1 for i in range(n_nodes)]


EVEN_CASES = [(6, n) for n in range(1, 7)] + [(12, n) for n in range(1, 6)] + [
    (7, 3), (7, 2), (7, 4), (5, 4), (10, 4), (1, 1), (13, 5), (24, 7)]


@pytest.mark.parametrize("n_layer,n_nodes", EVEN_CASES)
def test_even_split_properties(n_layer, n_nodes):
    shards = even_split(n_layer, n_nodes)
    assert_valid_split(shards, n_layer, n_nodes)
    s = sizes(shards)
    assert sum(s) == n_layer
    assert max(s) - min(s) <= 1
    if n_nodes >= 3 and max(s) != min(s):
        # uneven: the first and last nodes (which also carry the embeddings and
        # the head) are never larger than any middle node
        assert max(s[0], s[-1]) <= min(s[1:-1])


@pytest.mark.parametrize("n_layer,n_nodes,expected", [
    (6, 1, [6]),
    (6, 2, [3, 3]),
    (6, 3, [2, 2, 2]),
    (6, 4, [1, 2, 2, 1]),
    (6, 5, [1, 1, 2, 1, 1]),
    (6, 6, [1, 1, 1, 1, 1, 1]),
    (7, 3, [2, 3, 2]),
    (12, 5, [2, 3, 3, 2, 2]),  # extra blocks in the middle, nearest the centre first
    (7, 4, [2, 2, 2, 1]),      # middles full, then one end takes the last extra
])
def test_even_split_table(n_layer, n_nodes, expected):
    shards = even_split(n_layer, n_nodes)
    assert sizes(shards) == expected
    assert_valid_split(shards, n_layer, n_nodes)


def test_even_split_ranges_are_half_open():
    assert [(s.start, s.stop) for s in even_split(7, 3)] == [(0, 2), (2, 5), (5, 7)]


@pytest.mark.parametrize("n_layer,n_nodes,words", [
    (3, 4, ["3 layers", "4 nodes"]),
    (1, 2, ["1 layers", "2 nodes"]),
    (6, 0, ["positive", "0"]),
    (6, -1, ["positive", "-1"]),
])
def test_even_split_rejects(n_layer, n_nodes, words):
    with pytest.raises(PartitionError) as e:
        even_split(n_layer, n_nodes)
    for w in words:
        assert w in str(e.value)


def test_shards_from_sizes():
    shards = shards_from_sizes([1, 3, 2])
    assert [(s.start, s.stop, s.n_layer) for s in shards] == [(0, 1, 6), (1, 4, 6), (4, 6, 6)]
    assert_valid_split(shards, 6, 3)
    assert shards_from_sizes((4,)) == [Shard(0, 4, 4)]


@pytest.mark.parametrize("bad,word", [
    ([], "at least one node"),
    ([2, 0], "positive"),
    ([2, -1], "positive"),
    ([True, 2], "positive"),
    ([2, 1.5], "whole number"),
    ([2, "3"], "whole number"),
])
def test_shards_from_sizes_rejects(bad, word):
    with pytest.raises(PartitionError, match=word):
        shards_from_sizes(bad)


def test_shard_is_frozen_and_validated():
    s = Shard(1, 3, 4)
    assert (s.n_blocks, s.is_first, s.is_last) == (2, False, False)
    with pytest.raises(AttributeError):
        s.start = 0  # type: ignore[misc]
    for start, stop, n in [(2, 2, 4), (3, 1, 4), (-1, 2, 4), (0, 5, 4)]:
        with pytest.raises(PartitionError, match=rf"\[{start}, {stop}\)"):
            Shard(start, stop, n)


# --- manual splits ----------------------------------------------------------

@pytest.mark.parametrize("n_layer,counts", [(6, [1, 2, 3]), (6, [6]), (4, [1, 1, 1, 1]), (5, (2, 3))])
def test_manual_split_counts(n_layer, counts):
    shards = manual_split(n_layer, counts)
    assert sizes(shards) == list(counts)
    assert_valid_split(shards, n_layer, len(counts))


@pytest.mark.parametrize("n_layer,ranges", [
    (6, [[0, 1], [1, 3], [3, 6]]),
    (6, [(0, 6)]),
    (4, [[0, 2], (2, 4)]),  # lists (JSON) and tuples (NodeSpec) alike
])
def test_manual_split_ranges(n_layer, ranges):
    shards = manual_split(n_layer, ranges)
    assert [(s.start, s.stop) for s in shards] == [tuple(r) for r in ranges]
    assert_valid_split(shards, n_layer, len(ranges))


def test_manual_split_counts_equal_ranges():
    assert manual_split(7, [2, 3, 2]) == manual_split(7, [[0, 2], [2, 5], [5, 7]]) == even_split(7, 3)


@pytest.mark.parametrize("n_layer,layers,words", [
    # counts
    (6, [2, 3], ["add up to 5", "6 layers"]),
    (6, [4, 4], ["add up to 8", "6 layers"]),
    (2, [1, 1, 1], ["add up to 3", "2 layers"]),        # more nodes than layers
    (6, [], ["at least one node"]),                      # zero nodes
    (6, [3, 0, 3], ["positive"]),
    (6, [4, -1, 3], ["positive"]),
    # ranges
    (6, [[0, 2], [3, 6]], ["node 1", "start at 3", "expected 2"]),      # gap
    (6, [[0, 3], [2, 6]], ["node 1", "start at 2", "expected 3"]),      # overlap
    (6, [[1, 3], [3, 6]], ["node 0", "start at 1", "expected 0"]),      # not from 0
    (6, [[0, 4], [4, 2]], ["[4, 2)"]),                                  # out of order
    (6, [[0, 3], [3, 3], [3, 6]], ["[3, 3)"]),                          # empty range
    (6, [[0, 3], [3, 5]], ["end at 5", "6 layers"]),                    # short
    (6, [[0, 3], [3, 7]], ["[3, 7)", "0..6"]),                          # past the end
    (6, [[3, 6], [0, 3]], ["node 0", "start at 3"]),                    # wrong ring order
    (2, [[0, 1], [1, 2], [2, 3]], ["[2, 3)", "0..2"]),                  # more nodes than layers
    # malformed entries
    (6, [3, [3, 6]], ["node 0", "count or a [start, stop] pair"]),      # mixed types
    (6, [[0, 3], 3], ["node 1", "count or a [start, stop] pair"]),      # mixed types
    (6, [True, 5], ["node 0", "count or a [start, stop] pair"]),        # bool count
    (6, [[0, True], [1, 6]], ["node 0", "pair"]),                       # bool in a pair
    (6, [[0, 3, 6]], ["node 0", "pair"]),
    (6, [[0, 3.0], [3, 6]], ["node 0", "pair"]),
    (6, ["0-3", "3-6"], ["node 0", "pair"]),
    (6, [None], ["node 0", "pair"]),
])
def test_manual_split_rejects(n_layer, layers, words):
    with pytest.raises(PartitionError) as e:
        manual_split(n_layer, layers)
    for w in words:
        assert w in str(e.value), (str(e.value), w)
