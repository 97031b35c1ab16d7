"""Weights over HTTP as a safetensors stream, one tensor at a time.

The starter streams a stage's tensors in the safetensors layout, reading them
from its checkpoint one by one, so it never holds another node's weights in
memory. The node parses the stream as it arrives: the JSON header is checked
against the stage it was told to expect (names, shapes, dtypes, offsets)
before a byte of tensor data is read, then each tensor is read straight into
its own freshly allocated (aligned) buffer. Peak memory on both sides is about
one copy of the stage. A Hugging Face (or GGUF) source is streamed in our
names and layout too: each tensor is made (read, transposed or concatenated)
when its turn comes, so still only one is in memory at a time. A quantized
checkpoint of ours streams its stage's stored parts as they are in the file
(quant_parts.py): the node packs them, nothing is requantized.
"""
from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import torch

from . import st_io
from .chunks import Span, hf_tensor, stage_sources
from ..model.int4 import Int4Linear
from ..model.quant import Int8Linear, check_mode, parse_mode, quantize_rows
from .format import CheckpointError, expected_shapes, quantized_skeleton, run_mode
from .gguf_int4 import int4_target
from .malloc import mapped_allocations
from .quant_parts import GROUP, int4_items, part_shapes
from .hf import HFCheckpoint
from .sources import Checkpoint, open_checkpoint


CHUNK = 4 << 20  # bytes per piece of an upload


class WeightsStreamError(ValueError):
    """A weights stream that does not match the announced stage."""


def _header(items: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, int]:
    """(8-byte length + padded JSON header, data length) for (name, dtype, shape, nbytes)."""
    header, offset = {}, 0
    for name, dtype_name, shape, n in items:
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(head)) + head, offset


def quantized_layers(info: Checkpoint, shard: Span, quantize: str | None,
                     dtype: torch.dtype = torch.float32) -> dict[str, tuple[str, torch.dtype]]:
    """Layer prefix -> (form "int4" | "int8", dtype quantized from) for the layers of a
    --quantize int4 stage that travel quantized (quant_parts.py), made exactly as
    the node (StageBuilder) or one device would make them: a GGUF's Q4 tensors as
    their own codes, its wider block formats as int8 rows of the float32 tensor,
    and the stage's int8 Linears (a tied head without its embedding, widths the
    int4 kernel cannot take) as int8 rows of the tensor in the run's `dtype`.
    Our checkpoints, other modes: none."""
    if not quantize or not isinstance(info, HFCheckpoint):
        return {}
    kind, group = parse_mode(check_mode(quantize))
    if kind != "int4":
        return {}
    out = {}
    for prefix, m in quantized_skeleton(info.config, shard.start, shard.stop, quantize).named_modules():
        if isinstance(m, Int8Linear):
            if shard.start > 0:  # (a head tied to the stage's own embedding is the table's)
                out[prefix] = ("int8", dtype)
            continue
        fmt = info.block_format(prefix + ".weight") if isinstance(m, Int4Linear) else None
        target = int4_target(fmt) if fmt else None
        if target == "int4 (exact)" and group == GROUP:
            out[prefix] = ("int4", torch.float32)
        elif target == "int8":
            out[prefix] = ("int8", torch.float32)
    return out


def _float(info: HFCheckpoint, name: str) -> list[torch.Tensor]:
    return [hf_tensor(info, name)]


def _quantized(info: HFCheckpoint, prefix: str, form: str, dtype: torch.dtype
               ) -> list[torch.Tensor]:
    """The parts of one quantized layer, in part_shapes' order."""
    t = hf_tensor(info, prefix + ".weight")
    if form == "int8":
        return list(quantize_rows(t.to(dtype)))
    w = getattr(t, "mdi_int4", None)
    if w is None:
        raise CheckpointError(f"{info.source.origin}: tensor {prefix + '.weight'!r} has no int4 codes")
    return [x for _, x in int4_items(prefix, w)]


def _hf_stream(info: HFCheckpoint, shard: Span, quantize: str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[int, Iterator[bytes]]:
    names = {v: k for k, v in st_io.INT8_DTYPES.items()}
    shapes = expected_shapes(info.config, shard.start, shard.stop)
    layers = quantized_layers(info, shard, quantize, dtype)
    units = []  # ([(name, dtype name, shape, nbytes)], tensors of the unit, read when sent)
    for name, shape in shapes.items():
        prefix = name[:-len(".weight")]
        if name.endswith(".weight") and prefix in layers:
            form, source_dtype = layers[prefix]
            parts = part_shapes(form, *shape)
            kinds = {"int4_codes": torch.uint8, "weight": torch.int8}
            items = [(f"{prefix}.{s}", names[kinds.get(s, torch.float32)], p,
                      st_io.nbytes(p, kinds.get(s, torch.float32))) for s, p in parts.items()]
            units.append((items, functools.partial(_quantized, info, prefix, form, source_dtype)))
            continue
        stored = info.dtype_of(name)
        if stored not in st_io.ST_DTYPES.values():
            raise CheckpointError(f"{info.source.origin}: tensor {name!r} has dtype {stored}; "
                                  "streams carry float32, float16 or bfloat16")
        units.append(([(name, names[stored], shape, st_io.nbytes(shape, stored))],
                      functools.partial(_float, info, name)))
    head, length = _header([item for items, _ in units for item in items])

    def chunks() -> Iterator[bytes]:
        yield head
        with mapped_allocations():  # the tensors made and dropped leave no heap behind
            yield from _unit_bytes(info, units)

    return len(head) + length, chunks()


def _unit_bytes(info: HFCheckpoint, units: list) -> Iterator[bytes]:
    """The data of _hf_stream's units, each read when its turn comes."""
    for items, read in units:
        for (name, _, shape, n), t in zip(items, read()):
            if tuple(t.shape) != tuple(shape) or st_io.nbytes(tuple(t.shape), t.dtype) != n:
                raise CheckpointError(f"{info.source.origin}: tensor {name!r} has shape "
                                      f"{tuple(t.shape)} ({t.dtype}), the config needs {shape}")
            raw = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B") if n \
                else memoryview(b"")
            for i in range(0, n, CHUNK):
                yield bytes(raw[i:i + CHUNK])


def shard_stream(ckpt: str | Path | Checkpoint, shard: Span, quantize: str | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[int, Iterator[bytes]]:
    """(total length, byte chunks) of a stage's tensors in safetensors layout.
    Pass the opened Checkpoint when streaming to several nodes: a path is opened
    (config.json parsed) on every call. quantize, dtype: the run's --quantize and
    --dtype (with int4, a GGUF's layers then travel quantized: quantized_layers; a
    quantized checkpoint's travel as stored, and its mode is the run's)."""
    info = open_checkpoint(ckpt)
    if isinstance(info, HFCheckpoint):
        return _hf_stream(info, shard, quantize, dtype)
    run_mode(info.quantized, quantize, info.path)
    path = info.weights_path
    entries, data_start = _weights_header(path, info.quantized is not None)
    order = stage_sources(entries, info.config, shard, path, info.quantized)
    head, length = _header([(name, entries[src].dtype_name, entries[src].shape,
                             entries[src].end - entries[src].begin) for name, src in order])
    total = len(head) + length

    def chunks() -> Iterator[bytes]:
        yield head
        with st_io.open_file(path) as f:
            for _, src in order:  # a few MB in memory at a time, even for the embedding
                e = entries[src]
                f.seek(data_start + e.begin)
                left = e.end - e.begin
                while left:
                    piece = f.read(min(left, CHUNK))
                    if not piece:
                        raise CheckpointError(f"{path} ends inside tensor {src!r}")
                    left -= len(piece)
                    yield piece

    return total, chunks()


def _weights_header(path: Path, quantized: bool = False) -> tuple[dict, int]:
    """(entries, data start) of a safetensors file, parsed once per version of the
    file: a ring's nodes each stream a stage of the same file."""
    try:
        stat = path.stat()
        return _parsed_header(path, stat.st_mtime_ns, stat.st_size, quantized)
    except (st_io.SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from None


@functools.lru_cache(maxsize=4)
def _parsed_header(path: Path, mtime_ns: int, size: int, quantized: bool) -> tuple[dict, int]:
    with st_io.open_file(path) as f:
        return st_io.read_header(f, quantized)


def shard_bytes(ckpt: str | Path | Checkpoint, shard: Span, quantize: str | None = None,
                dtype: torch.dtype = torch.float32) -> bytes:
    """A stage's whole stream at once (for tests and small models)."""
    return b"".join(shard_stream(ckpt, shard, quantize, dtype)[1])


class _Reader:
    """readexactly/readinto over an async iterator of byte chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""
        self.pos = 0
        self.total = 0

    async def _more(self) -> None:
        try:
            chunk = await self.chunks.__anext__()
        except StopAsyncIteration:
            raise WeightsStreamError(f"stream ended after {self.total} bytes") from None
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        self.total += len(chunk)

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            await self._more()
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    async def readinto(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            if self.pos == len(self.buf):
                await self._more()
            take = min(len(view) - done, len(self.buf) - self.pos)
            view[done:done + take] = self.buf[self.pos:self.pos + take]
            self.pos += take
            done += take

    async def at_end(self) -> bool:
        while self.pos == len(self.buf):  # empty chunks (Starlette ends with one) say nothing
            try:
                await self._more()
            except WeightsStreamError:
                return True
        return False


async def iter_stream(chunks: AsyncIterator[bytes],
                      want: dict[str, tuple[int, ...]] | Callable[[set[str]], dict],
                      what: str = "this stage") -> AsyncIterator[tuple[str, torch.Tensor]]:
    """Parse a safetensors stream holding exactly the tensors `want` (name -> shape),
    yielding (name, tensor) as each arrives: a consumer that builds its stage from
    them (quantizing as it goes) never holds the stream's tensors and the stage both.
    The header is checked whole before the first tensor; trailing bytes after the
    last one raise after it. want as a function of the header's names (a builder's
    stream_want): the stream may carry quantized parts, int8 and uint8 tensors whose
    dtypes the consumer checks."""
    r = _Reader(chunks)
    try:
        entries = st_io.parse_header(await r.readexactly(st_io.header_length(await r.readexactly(8))),
                                     int8=callable(want))
    except st_io.SafetensorsFormatError as e:
        raise WeightsStreamError(f"not a valid safetensors stream: {e}") from None
    if callable(want):
        want = want(set(entries))
    extra = sorted(set(entries) - set(want))
    if extra:
        raise WeightsStreamError(f"tensor(s) not part of {what}: {', '.join(extra[:5])}")
    missing = [n for n in want if n not in entries]
    if missing:
        raise WeightsStreamError(f"missing tensor {missing[0]!r}"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for e in entries.values():
        if e.shape != tuple(want[e.name]):
            raise WeightsStreamError(f"tensor {e.name!r} has shape {e.shape}, the config needs "
                                     f"{tuple(want[e.name])}")
    try:
        ordered = st_io.in_order(entries)
    except st_io.SafetensorsFormatError as e:
        raise WeightsStreamError(f"not a valid safetensors stream: {e}") from None
    for e in ordered:
        t = torch.empty(e.shape, dtype=e.dtype)
        if t.numel():
            await r.readinto(memoryview(t.view(torch.uint8).numpy()).cast("B"))
        yield e.name, t
        del t
    if not await r.at_end():
        raise WeightsStreamError("trailing bytes after the last tensor")


async def read_stream(chunks: AsyncIterator[bytes], want: dict[str, tuple[int, ...]],
                      what: str = "this stage") -> dict[str, torch.Tensor]:
    """Parse a safetensors stream holding exactly the tensors `want`, all at once."""
    return {name: t async for name, t in iter_stream(chunks, want, what)}
