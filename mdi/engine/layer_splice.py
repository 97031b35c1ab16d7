"""A stage gives or takes boundary layers, with their KV cache rows (a live
re-plan that moves layers between neighbours: ring/starter/layer_shift.py).

Pure, no I/O: `rows_of` reads the rows a stage gives (every kept slot's positions
0..n-1 of each layer it gives; its state untouched), and `splice` gives a
SlotStage its new range: the layers it keeps stay as they are (blocks, cache
buffers), the layers it gives go, the layers it takes come with their blocks
(built for the run as the stage's own were) and their rows. Every check runs
before anything changes: a refused splice leaves the stage as it was.

A stage keeps its ends: the first stage keeps the embeddings, the last the
head, so only the boundaries between stages move. A stage may give all its
layers and take others (its new range need not overlap the old one), but never
end with none (a leave-out: the ring is formed anew instead).
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.cache import mapped_zeros
from ..model.cache_int8 import Int8KVCache
from .slots import SlotStage


class SpliceError(ValueError):
    """A move that does not fit the stage: what is wrong, named."""


def why_not_movable(slots: SlotStage) -> str | None:
    """Why this stage's layers cannot move with their caches (None: they can)."""
    stage = slots.stage
    if stage.compiled_decode is not None:
        return "the stage decodes through a compiled step (--compile)"
    if any(isinstance(c, Int8KVCache) for c in slots.caches):
        return "the KV cache is int8 (--kv-dtype int8)"
    if slots.log is not None:
        return "the stage keeps a replay log (--recovery replay)"
    return None


def check_positions(slots: SlotStage, positions: dict[int, int]) -> None:
    """Every slot of `positions` is in use and holds at least its n >= 1 positions
    (SpliceError naming the first that does not)."""
    for slot, n in positions.items():
        if not 0 <= slot < len(slots.slots):
            raise SpliceError(f"slot {slot} outside 0..{len(slots.slots) - 1}")
        s = slots.slots[slot]
        if not s.active or s.position < n or n < 1:
            raise SpliceError(f"slot {slot} holds {s.position if s.active else 0} positions, "
                              f"{n} asked for")


def kv_dtype(slots: SlotStage) -> torch.dtype:
    """What the stage's caches store."""
    return slots.caches[0].kv[0].dtype


def rows_of(slots: SlotStage, start: int, stop: int, positions: dict[int, int]
            ) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, slot) -> a copy of the slot's keys and values (2, kv_heads, n, hs) of
    positions 0..n-1, for layers [start, stop) of the stage."""
    stage = slots.stage
    why = why_not_movable(slots)
    if why:
        raise SpliceError(f"layers cannot move: {why}")
    if not stage.start <= start < stop <= stage.stop:  # (a stage that gives its end to two
        # neighbours gives a run inside it too: splice checks the range that stays)
        raise SpliceError(f"layers [{start}, {stop}) are not in the stage's "
                          f"[{stage.start}, {stage.stop})")
    check_positions(slots, positions)
    out = {}
    for layer in range(start, stop):
        for slot, n in sorted(positions.items()):
            s = slots.slots[slot]
            buf = slots.caches[s.lane].kv[layer - stage.start]  # (2, B, nh, T, hs)
            out[(layer, slot)] = buf[:, s.row, :, :n, :].clone()
    return out


def splice(slots: SlotStage, start: int, stop: int, blocks: dict[int, nn.Module],
           rows: dict[tuple[int, int], torch.Tensor], positions: dict[int, int]) -> None:
    """Give the stage layers [start, stop): the layers it gains (`blocks`, keyed by
    layer) with their rows (every slot of `positions`, n >= 1), the layers outside the
    range dropped. SpliceError before any change when the move does not fit."""
    stage = slots.stage
    old = range(stage.start, stage.stop)
    new = range(start, stop)
    n_layer = stage.config.n_layer
    why = why_not_movable(slots)
    if why:
        raise SpliceError(f"layers cannot move: {why}")
    if not 0 <= start < stop <= n_layer:
        raise SpliceError(f"layers [{start}, {stop}) are not a range of the model's {n_layer}")
    if (start == 0) != stage.has_embeddings or (stop == n_layer) != stage.has_head:
        raise SpliceError(f"layers [{start}, {stop}): a stage keeps its embeddings or head")
    gained = [i for i in new if i not in old]
    if sorted(blocks) != gained:
        raise SpliceError(f"blocks of layers {sorted(blocks)} for the {gained} gained")
    check_positions(slots, positions)
    ref = slots.caches[0].kv[0]  # (2, B, nh, T, hs): every new layer's shape but B
    for layer in gained:
        for slot, n in positions.items():
            t = rows.get((layer, slot))
            want = (2, ref.shape[2], n, ref.shape[4])
            if t is None or tuple(t.shape) != want or t.dtype != ref.dtype:
                got = "none" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise SpliceError(f"layer {layer} slot {slot}: rows {got}, expected {want} "
                                  f"{ref.dtype}")
    # checked: the new buffers made and filled first (an allocation that fails leaves the
    # stage as it was), then swapped in by assignments that cannot fail
    lane_rows = [[(slots.slots[s].row, n, s) for s, n in positions.items()
                  if slots.slots[s].lane == lane] for lane in range(len(slots.caches))]
    lanes_kv = []
    for lane, cache in enumerate(slots.caches):
        kv = []
        for layer in new:
            if layer in old:
                kv.append(cache.kv[layer - old.start])
                continue
            like = cache.kv[0]
            buf = mapped_zeros(tuple(like.shape), like.dtype) if cache.paged else None
            buf = torch.zeros_like(like) if buf is None else buf
            for row, n, slot in lane_rows[lane]:
                buf[:, row, :, :n, :] = rows[(layer, slot)]
            kv.append(buf)
        lanes_kv.append(kv)
    for cache, kv in zip(slots.caches, lanes_kv):
        cache.kv = kv
        cache._bind()
    h = stage.transformer["h"]
    stage.transformer["h"] = nn.ModuleDict(
        {str(i): h[str(i)] if i in old else blocks[i] for i in new})
    stage.start, stage.stop = start, stop
