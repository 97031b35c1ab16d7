"""The layer-move stream: KV cache rows of layers that change node in a live
re-plan (ring/starter/layer_shift.py), from the giving stage to the receiving one.

Binary, little-endian, no pickle (docs/wire.md, "Moving layers"):

    stream := HEAD ROW* END
    HEAD   := b"MDIMOVE1" u32 start u32 stop u32 rows
    ROW    := b"ROW\\0" u32 layer u32 slot u32 positions u8 dtype u8 0 u16 kv_heads
              u16 head_size u64 nbytes, then nbytes of the row's keys and values
              (2, kv_heads, positions, head_size) in C order, the cache's dtype
    END    := b"END\\0" u32 rows

One ROW per (layer, slot): every layer of [start, stop) for every slot the move
keeps, positions 0..positions-1. The receiver knows what to expect (`Expect`:
the layers, each slot's positions, the cache's dtype and shape) before a byte
arrives and refuses anything else with a MoveError naming what is wrong: another
magic, a layer or slot it does not expect (or twice), positions, dtype or shape
that differ, a byte count that does not match, a stream cut short, bytes after
END. Nothing is applied until the whole stream was read and checked.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import torch

from .wire import DTYPE_CODES, ITEMSIZE, TORCH_DTYPES

MAGIC = b"MDIMOVE1"
HEAD = struct.Struct("<8sIII")
ROW = struct.Struct("<4sIIIBxHHQ")
END = struct.Struct("<4sI")

Rows = dict[tuple[int, int], torch.Tensor]  # (layer, slot) -> (2, kv_heads, positions, hs)


class MoveError(ValueError):
    """A move stream (or a move) that does not fit: what is wrong, named."""


@dataclass(frozen=True)
class Expect:
    """What a move stream must hold: layers [start, stop), each slot's positions."""
    start: int
    stop: int
    positions: tuple[tuple[int, int], ...]  # (slot, n >= 1), ascending slots
    dtype: torch.dtype
    kv_heads: int
    head_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise MoveError(f"layers [{self.start}, {self.stop}): not a non-empty range")
        slots = [s for s, _ in self.positions]
        if slots != sorted(set(slots)) or any(n < 1 for _, n in self.positions):
            raise MoveError(f"slots {list(self.positions)}: ascending, distinct, >= 1 position")
        if self.dtype not in DTYPE_CODES:
            raise MoveError(f"dtype {self.dtype}: no move stream carries it")

    def row_bytes(self, n: int) -> int:
        return 2 * self.kv_heads * n * self.head_size * ITEMSIZE[DTYPE_CODES[self.dtype]]

    @property
    def n_rows(self) -> int:
        return (self.stop - self.start) * len(self.positions)

    @property
    def nbytes(self) -> int:
        """The whole stream's length."""
        per_layer = sum(ROW.size + self.row_bytes(n) for _, n in self.positions)
        return HEAD.size + (self.stop - self.start) * per_layer + END.size


def encode(expect: Expect, rows: Rows) -> Iterator[bytes]:
    """The stream of `rows` (every (layer, slot) of `expect`), piece by piece."""
    code = DTYPE_CODES[expect.dtype]
    yield HEAD.pack(MAGIC, expect.start, expect.stop, expect.n_rows)
    for layer in range(expect.start, expect.stop):
        for slot, n in expect.positions:
            t = rows[(layer, slot)]
            shape = (2, expect.kv_heads, n, expect.head_size)
            if tuple(t.shape) != shape or t.dtype != expect.dtype:
                raise MoveError(f"layer {layer} slot {slot}: rows of shape {tuple(t.shape)} "
                                f"{t.dtype}, the move says {n} positions of {expect.dtype}")
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            yield ROW.pack(b"ROW\0", layer, slot, n, code, expect.kv_heads, expect.head_size,
                           len(raw))
            yield raw
    yield END.pack(b"END\0", expect.n_rows)


def decode(data: bytes | bytearray | memoryview, expect: Expect) -> Rows:
    """The rows of a whole stream, checked against `expect` (MoveError otherwise)."""
    view = memoryview(data)
    if len(view) < HEAD.size:
        raise MoveError(f"move stream: {len(view)} bytes, cut short before its header")
    magic, start, stop, n_rows = HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise MoveError(f"move stream: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if (start, stop) != (expect.start, expect.stop):
        raise MoveError(f"move stream: layers [{start}, {stop}), expected "
                        f"[{expect.start}, {expect.stop})")
    if n_rows != expect.n_rows:
        raise MoveError(f"move stream: {n_rows} rows announced, expected {expect.n_rows}")
    want = {(layer, slot): n for layer in range(start, stop) for slot, n in expect.positions}
    code = DTYPE_CODES[expect.dtype]
    out: Rows = {}
    at = HEAD.size
    while len(out) < n_rows:
        if len(view) < at + ROW.size:
            raise MoveError(f"move stream: cut short after {len(out)} of {n_rows} rows")
        tag, layer, slot, n, dt, heads, hs, nbytes = ROW.unpack_from(view, at)
        at += ROW.size
        where = f"move stream, row {len(out)} (layer {layer}, slot {slot})"
        if tag != b"ROW\0":
            raise MoveError(f"{where}: tag {bytes(tag)!r}, expected a row")
        if (layer, slot) not in want:
            raise MoveError(f"{where}: not a layer and slot this move carries"
                            if (layer, slot) not in out else f"{where}: sent twice")
        if n != want[(layer, slot)]:
            raise MoveError(f"{where}: {n} positions, expected {want[(layer, slot)]}")
        if dt != code or (heads, hs) != (expect.kv_heads, expect.head_size):
            name = TORCH_DTYPES[dt] if dt in TORCH_DTYPES else f"code {dt}"
            raise MoveError(f"{where}: {name} rows of {heads} heads x {hs}, expected "
                            f"{expect.dtype} of {expect.kv_heads} x {expect.head_size}")
        if nbytes != expect.row_bytes(n):
            raise MoveError(f"{where}: {nbytes} bytes, its shape takes {expect.row_bytes(n)}")
        if len(view) < at + nbytes:
            raise MoveError(f"{where}: cut short, {len(view) - at} of {nbytes} bytes")
        raw = bytearray(view[at:at + nbytes])  # its own, writable copy
        at += nbytes
        out[(layer, slot)] = torch.frombuffer(raw, dtype=torch.uint8).view(expect.dtype) \
            .view(2, heads, n, hs)
        del want[(layer, slot)]
    if len(view) < at + END.size:
        raise MoveError(f"move stream: cut short after its {n_rows} rows (no end mark)")
    tag, count = END.unpack_from(view, at)
    if tag != b"END\0" or count != n_rows:
        raise MoveError(f"move stream: end mark {bytes(tag)!r} of {count} rows, expected "
                        f"b'END\\x00' of {n_rows}")
    if len(view) != at + END.size:
        raise MoveError(f"move stream: {len(view) - at - END.size} bytes after its end mark")
    return out
