"""A GGUF file's metadata and tensor table, read lightly; tensor data memory-mapped.

The `gguf` package's GGUFReader keeps every metadata value as numpy views, one
or two per array element: for SmolLM2's 49,152 tokens and 48,900 merges that is
~160 MB of Python and numpy objects held for as long as the reader lives (the
whole run, behind a model's source), and a node's load peaked on them. Here the
metadata becomes plain Python values (a list of str for the vocabulary) read
from one pass over the header, and each tensor is a numpy view of the file's
memory map, shaped as GGUFReader shapes it (so the `gguf` package's own
`dequantize` takes it): float types (rows, cols) of their dtype, block types
(rows, bytes per row) of uint8.

Layout (GGUF v2/v3, little-endian): magic, version u32, tensor count u64,
metadata count u64; each metadata key (string) with its type u32 and value;
each tensor's name, dimension count u32, dimensions u64 (innermost first), type
u32 and offset u64; then, aligned to `general.alignment` (32 by default), the
tensor data, each tensor at its offset from there.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types (gguf-py's GGUFValueType) and the struct format of the fixed-size ones.
FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
         12: "<d"}
STRING, ARRAY = 8, 9
FAULT_AROUND = 64 << 10  # bytes the kernel maps around a faulting page of a file (its default)
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # as FIXED
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                 "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (truncated, or a value out of range)."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any           # gguf.GGMLQuantizationType
    shape: np.ndarray          # dimensions, innermost first (as GGUF stores them)
    data_offset: int           # from the start of the file
    n_bytes: int
    data: np.ndarray           # a view of the file's map


class _Cursor:
    """Reads GGUF values from a buffer, front to back, checking every length."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"truncated: the header ends past byte {len(self.buf)}")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def _advance(self, n: int, what: str) -> int:
        at = self.pos
        if at + n > len(self.buf):
            raise GGUFFormatError(f"truncated: {what} at byte {at}")
        self.pos += n
        return at

    def string(self, skip: bool = False) -> str | None:
        (n,) = self.unpack("<Q")
        at = self._advance(n, f"a string of {n} bytes")
        return None if skip else str(self.buf[at:at + n], "utf-8")

    def value(self, vtype: int, skip_arrays: bool = False) -> Any:
        """A value of type vtype; an array is skipped over (None) when skip_arrays."""
        if vtype in FIXED:
            return self.unpack(FIXED[vtype])[0]
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise GGUFFormatError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        etype, count = self.unpack("<IQ")
        if etype in _NUMPY:  # numbers: read at once
            dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
            at = self._advance(count * dt.itemsize, f"an array of {count}")
            return None if skip_arrays else np.frombuffer(self.buf, dt, count, at).tolist()
        if skip_arrays and etype == STRING:
            for _ in range(count):
                self.string(skip=True)
            return None
        items = [self.value(etype, skip_arrays) for _ in range(count)]
        return None if skip_arrays else items

    def metadata(self, keys: set[str] | None = None, skip_arrays: bool = False
                 ) -> tuple[dict[str, Any], int]:
        """(metadata, tensor count) from the file's start; with keys, only those, read
        as far as needed."""
        magic, version, n_tensors, n_kv = self.unpack("<4sIQQ")
        if magic != b"GGUF":
            raise GGUFFormatError(f"magic {magic!r}, expected b'GGUF'")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (2 and 3 are read)")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            (vtype,) = self.unpack("<I")
            value = self.value(vtype, skip_arrays)
            if keys is None or key in keys:
                fields[key] = value
                if keys is not None and len(fields) == len(keys):
                    break
        return fields, n_tensors

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        """The tensor table after the metadata: (name, dims innermost first, type, offset)."""
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            (n_dims,) = self.unpack("<I")
            dims = self.unpack(f"<{n_dims}Q")
            qtype, offset = self.unpack("<IQ")
            infos.append((name, dims, qtype, offset))
        return infos


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def header_values(path: str | Path, keys: set[str]) -> dict[str, Any]:
    """The metadata `keys` of a GGUF file, reading its header only as far as needed
    (arrays skipped over): for listings of many files (checkpoint/catalog.py)."""
    return _Cursor(memoryview(_map(Path(path)))).metadata(keys, skip_arrays=True)[0]


def bytes_by_type(path: str | Path, prefix: str = "") -> dict[str, int]:
    """Tensor bytes per GGML type name (of the tensors whose name starts with
    `prefix`), from the header alone (metadata arrays skipped): what a file mostly
    holds, without reading its vocabulary."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(memoryview(_map(Path(path))))
    _, n_tensors = cur.metadata(set(), skip_arrays=True)
    sizes: dict[str, int] = {}
    for name, dims, qtype, _ in cur.tensor_infos(n_tensors):
        if not name.startswith(prefix):
            continue
        try:
            tt = GGMLQuantizationType(qtype)
            block, block_bytes = GGML_QUANT_SIZES[tt]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r} has unknown type {qtype}") from None
        n = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
        sizes[tt.name] = sizes.get(tt.name, 0) + n
    return sizes


class GGUFFile:
    """`fields`: metadata key -> value (str, int, float, bool, or a list of them).
    `tensors`: the tensor table, in file order."""

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._map = _map(self.path)
        cur = _Cursor(memoryview(self._map))
        self.fields, n_tensors = cur.metadata()
        infos = cur.tensor_infos(n_tensors)
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise GGUFFormatError(f"general.alignment is {align!r}")
        start = -(-cur.pos // align) * align
        self.tensors: list[GGUFTensor] = []
        size = len(self._map)
        for name, dims, qtype, offset in infos:
            try:
                tt = GGMLQuantizationType(qtype)
                block, block_bytes = GGML_QUANT_SIZES[tt]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name!r} has unknown type {qtype}") from None
            if not dims or dims[0] % block:
                raise GGUFFormatError(f"tensor {name!r} has shape {dims}, not whole blocks of {block}")
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * block_bytes
            at, n_bytes = start + offset, rows * row_bytes
            if at + n_bytes > size:
                raise GGUFFormatError(f"truncated: tensor {name!r} ends at byte {at + n_bytes}, "
                                      f"the file has {size}")
            outer = tuple(int(d) for d in reversed(dims[1:]))
            if tt.name in _FLOAT_DTYPES:
                dt = np.dtype(_FLOAT_DTYPES[tt.name])
                data = np.frombuffer(self._map, dt, rows * dims[0], at).reshape(*outer, dims[0])
            else:
                data = np.frombuffer(self._map, np.uint8, n_bytes, at).reshape(*outer, row_bytes)
            self.tensors.append(GGUFTensor(name, tt, np.array(dims, dtype=np.uint64), at, n_bytes,
                                           data))
        # the header has been read into `fields`: its pages leave this process (SmolLM2's
        # vocabulary and merges: 7 MB of RSS for the whole run)
        self._drop_pages(0, start)

    def _drop_pages(self, begin: int, end: int) -> None:
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        if end <= start:
            return
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: the pages stay
            pass

    def release(self, t: GGUFTensor, rows: tuple[int, int] | None = None) -> None:
        """Drop t's pages (or those of its rows [a, b)) from this process once they have
        been copied out: they stay in the page cache, and a later read faults them in
        again. Without this a loaded model kept the whole file's pages in its RSS beside
        its own copy (SmolLM2: 110 MB); a tensor read a block of rows at a time kept
        its pages until its end (the Q8_0 embedding: 30 MB more at the load's peak)."""
        begin, end = t.data_offset, t.data_offset + t.n_bytes
        if rows is not None:
            row_bytes = t.n_bytes // max(1, t.data.shape[0])
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        # and the neighbours' pages that a fault maps along (the kernel's fault-around,
        # 64 KB): a tensor's first read kept the previous one's last pages (5 MB in all)
        self._drop_pages(max(0, begin - FAULT_AROUND), min(len(self._map), end + FAULT_AROUND))
