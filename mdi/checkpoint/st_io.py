"""A small safetensors reader: the header checked against what a stage needs,
then each tensor read straight into its own freshly allocated buffer.

Why not safetensors' own loader: it memory-maps the file, and every page it
touches counts in the process's resident memory next to the tensors copied
out of it, so a stage cost two copies of its weights at load time (and the
starter, which reads other stages' tensors to send them, far more). Plain
reads into torch.empty buffers keep the peak at one copy, and give aligned
memory, which the batch-invariant GEMM needs for bitwise-stable results.

Format: u64 little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the data buffer; offsets are relative to its start.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# our int8 checkpoints (`mdi convert --quantize`) and quantized stage streams (quant_parts.py)
INT8_DTYPES = {**ST_DTYPES, "I8": torch.int8, "U8": torch.uint8}
MAX_HEADER = 1 << 24


class SafetensorsFormatError(ValueError):
    """A safetensors header or body that cannot be used."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def header_length(first8: bytes) -> int:
    (n,) = struct.unpack("<Q", first8)
    if not 2 <= n <= MAX_HEADER:
        raise SafetensorsFormatError(f"header length {n} outside 2..{MAX_HEADER}")
    return n


def parse_header(raw: bytes, int8: bool = False) -> dict[str, Entry]:
    """Entries by name, each checked on its own (see in_order for the layout).
    int8: int8 and uint8 tensors are allowed too (an int8 checkpoint of ours, a
    stage stream with quantized parts); the loader checks each tensor's dtype."""
    dtypes = INT8_DTYPES if int8 else ST_DTYPES
    try:  # ValueError: also a 5,000-digit integer; RecursionError: arrays nested 200k deep
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise SafetensorsFormatError(f"header is not JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise SafetensorsFormatError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in dtypes:
            raise SafetensorsFormatError(f"tensor {name!r}: dtype {dtype!r}, expected floating point "
                                         "(F32, F16 or BF16)")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SafetensorsFormatError(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise SafetensorsFormatError(f"tensor {name!r}: bad data_offsets {offs!r}")
        if offs[1] - offs[0] != nbytes(tuple(shape), dtypes[dtype]):
            raise SafetensorsFormatError(f"tensor {name!r}: data_offsets {offs} do not fit shape {shape}")
        entries[name] = Entry(name, dtypes[dtype], dtype, tuple(shape), offs[0], offs[1])
    return entries


def in_order(entries: dict[str, Entry]) -> list[Entry]:
    """Entries by offset; they must tile the data buffer (no gaps, no overlaps)."""
    out = sorted(entries.values(), key=lambda e: e.begin)
    expect = 0
    for e in out:
        if e.begin != expect:
            raise SafetensorsFormatError(f"tensor {e.name!r} starts at {e.begin}, expected {expect} "
                                         "(gaps or overlaps)")
        expect = e.end
    return out


def read_header(f: BinaryIO, int8: bool = False) -> tuple[dict[str, Entry], int]:
    """(entries, offset of the data buffer) of an open file (int8: see parse_header)."""
    first = f.read(8)
    if len(first) != 8:
        raise SafetensorsFormatError("file shorter than a safetensors header")
    n = header_length(first)
    raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsFormatError("file ends inside the header")
    return parse_header(raw, int8), 8 + n


def read_tensor(f: BinaryIO, entry: Entry, data_start: int) -> torch.Tensor:
    """One tensor, read (not mapped) into a fresh allocator-aligned buffer."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    f.seek(data_start + entry.begin)
    view = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")
    if f.readinto(view) != len(view):
        raise SafetensorsFormatError(f"file ends inside tensor {entry.name!r}")
    return t


def open_file(path: str | Path) -> BinaryIO:
    return open(path, "rb")
