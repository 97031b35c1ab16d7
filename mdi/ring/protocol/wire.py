"""The data-plane wire format: a fixed binary header, then raw tensor bytes.

This module is a security boundary. Nothing received is unpickled or
torch.load-ed: a payload becomes a tensor only through torch.frombuffer with
a dtype from a fixed table, after every header field has been checked against
the run's limits (model width, block size, samples). A payload length that
does not match the checked shape is refused before any byte of it is read or
any buffer allocated. An ADMIT's sampling parameters are decoded and checked
once, as the frame is built (by generate/sampling.py:SamplingConfig, the check a
submitted sequence passed in the engine), so no node forwards what the finisher
would refuse; the frame carries them as that checked object (Frame.sampling).

Header (big-endian, 44 bytes), see docs/wire.md:

    magic    4s  b"MDI\\x00"
    version  B   1
    kind     B   Kind
    dtype    B   DType code (0 for frames without a tensor)
    ndim     B   0..3
    run_id   I   the run this frame belongs to
    sample   I   first sample id (a slot in a sequence run) the frame carries
    position I   position of the first token (PREFILL) / of the first sample (DECODE)
    shape    3I  dims, unused ones 0
    length   Q   payload bytes that follow
    reserved 4x  zero; a frame with any other value is refused

A run is either a fixed batch (CONTEXT/TOKENS over samples: --resend-context) or a
sequence run of the engine (ADMIT/RETIRE/PREFILL/SEQ_DECODE/SEQ_TOKENS over
slots, Limits.sequences); each refuses the other's own kinds. SEQ_DECODE and
SEQ_TOKENS carry some slots of a lane: their payload starts with a slot
table, B uint32 slot ids (network order, strictly ascending, the first equal to
`sample`), then the tensor bytes. A step of a whole lane needs no table: it
travels as DECODE/TOKENS. PREFILLS carries several slots' prefill chunks packed in
one (1, N, C) tensor: `position` is the number of slots B, and the payload starts
with a row table, B (slot, start, length) uint32 triples (slots strictly
ascending, the first equal to `sample`, lengths summing to N, start + length
within block_size).
"""
from __future__ import annotations

import asyncio
import enum
import math
import struct
from typing import Callable
from dataclasses import dataclass

import torch

from ...generate.sampling import SamplingConfig

MAGIC = b"MDI\x00"
VERSION = 1
HEADER = struct.Struct("!4sBBBBIII3IQ4x")
HEADER_SIZE = HEADER.size
RESERVED = slice(HEADER_SIZE - 4, HEADER_SIZE)  # the 4 pad bytes: zero (struct ignores them)
MAX_CONTROL_PAYLOAD = 256  # handshake frames


class WireError(ValueError):
    """A frame that breaks the format or the run's limits."""


class Kind(enum.IntEnum):
    PREFILL = 1      # activations (1, T, C) of one sample, positions position..position+T-1
    DECODE = 2       # activations (B, 1, C) of a group, one token per sample
    TOKENS = 3       # sampled ids (B,) int64, finisher -> starter
    STOP = 4         # end of the run; travels once around the ring
    CHALLENGE = 5    # handshake: server nonce (uint8 bytes)
    AUTH = 6         # handshake: HMAC over the nonce (uint8 bytes)
    CONTEXT = 7      # activations (1, T, C) of a sample's whole context, no cache
                     # (--resend-context: the original system's behaviour)
    ADMIT = 8        # a sequence takes slot `sample`: int64 (4,) sampling parameters
    RETIRE = 9       # the sequence in slot `sample` ended; no payload
    SEQ_DECODE = 10  # slot table + activations (B, 1, C), one token per listed slot
    SEQ_TOKENS = 11  # slot table + sampled ids (B,) int64, finisher -> starter
    REPLAY = 12      # activations (1, T, C) of slot `sample`, positions position..+T-1, from
                     # the upstream survivor's log to a lost stage's replacement, which
                     # fills its cache and sends nothing on (--recovery replay)
    PREFILLS = 13    # row table + activations (1, N, C): several slots' prefill chunks of one
                     # lane step packed one after another (position = number of slots)


FIXED_KINDS = frozenset({Kind.CONTEXT})  # refused in sequence runs
SEQUENCE_KINDS = frozenset({Kind.ADMIT, Kind.RETIRE, Kind.SEQ_DECODE, Kind.SEQ_TOKENS,
                            Kind.REPLAY, Kind.PREFILLS})  # refused in fixed runs
SLOT_TABLE_KINDS = frozenset({Kind.SEQ_DECODE, Kind.SEQ_TOKENS})
ADMIT_FIELDS = 4   # seed, top_k (0: none), temperature and top_p as float64 bit patterns


class DType(enum.IntEnum):
    NONE = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT64 = 4
    UINT8 = 5


TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16,
                DType.BFLOAT16: torch.bfloat16, DType.INT64: torch.int64, DType.UINT8: torch.uint8}
DTYPE_CODES = {v: k for k, v in TORCH_DTYPES.items()}
ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Header:
    kind: Kind
    dtype: DType
    run_id: int
    sample: int
    position: int
    shape: tuple[int, ...]
    length: int


@dataclass(frozen=True)
class Frame:
    kind: Kind
    run_id: int
    sample: int = 0
    position: int = 0
    tensor: torch.Tensor | None = None
    slots: tuple[int, ...] = ()      # SEQ_DECODE / SEQ_TOKENS: the slot of each row
    sampling: SamplingConfig | None = None  # a received ADMIT: its parameters, checked
    spans: tuple[tuple[int, int], ...] = ()  # PREFILLS: each slot's (start, length)

    def encode(self) -> bytes:
        return encode_frame(self)


@dataclass(frozen=True)
class Limits:
    """What a frame of this run may carry."""
    run_id: int
    n_embd: int
    block_size: int
    n_samples: int
    act_dtype: DType
    max_batch: int
    sequences: bool = False   # an engine run: slots, ADMIT/RETIRE, SEQ_DECODE/SEQ_TOKENS

    def __post_init__(self) -> None:
        if self.act_dtype not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16):
            raise WireError(f"activation dtype must be floating point, got {self.act_dtype!r}")


# dtypes numpy holds: their tensors' bytes are a view of .numpy() (bfloat16 goes through uint8)
NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.int64, torch.uint8})


def tensor_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy where it is a contiguous CPU tensor."""
    if t.is_cpu and not t.requires_grad and t.dtype in NUMPY_DTYPES and t.is_contiguous():
        return byte_view(t)  # the common case, in a quarter of the time of the chain below
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (no grad) as a flat, writable view."""
    if t.dtype in NUMPY_DTYPES:
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def frame_parts(f: Frame) -> list:
    """A frame as the buffers that make it up: header, slot table, tensor bytes
    (a view of the tensor's memory), to write with one sendmsg or join."""
    if f.tensor is None:
        dtype, shape, payload = DType.NONE, (), None
    else:
        if f.tensor.dtype not in DTYPE_CODES:
            raise WireError(f"cannot send dtype {f.tensor.dtype}")
        dtype, shape, payload = DTYPE_CODES[f.tensor.dtype], tuple(f.tensor.shape), tensor_view(f.tensor)
    if len(shape) > 3:
        raise WireError(f"at most 3 dimensions on the wire, got {shape}")
    parts: list = []
    if f.kind in SLOT_TABLE_KINDS:
        if not shape or len(f.slots) != shape[0]:
            raise WireError(f"{f.kind.name} needs one slot per row, got {len(f.slots)} for {shape}")
        parts.append(struct.pack(f"!{len(f.slots)}I", *f.slots))
    elif f.kind == Kind.PREFILLS:
        if not len(f.slots) == len(f.spans) == f.position:
            raise WireError(f"PREFILLS of {f.position} slots lists {len(f.slots)} slots and "
                            f"{len(f.spans)} spans")
        parts.append(struct.pack(f"!{3 * len(f.slots)}I", *(
            v for slot, (start, n) in zip(f.slots, f.spans) for v in (slot, start, n))))
    if payload is not None:
        parts.append(payload)
    dims = list(shape) + [0] * (3 - len(shape))
    length = sum(len(p) for p in parts)
    header = HEADER.pack(MAGIC, VERSION, int(f.kind), int(dtype), len(shape), f.run_id, f.sample,
                         f.position, *dims, length)
    return [header, *parts]


def encode_frame(f: Frame) -> bytes:
    return b"".join(frame_parts(f))


def parse_header(data: bytes) -> Header:
    """Unpack and check the fields that need no run context."""
    if len(data) != HEADER_SIZE:
        raise WireError(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    magic, version, kind, dtype, ndim, run_id, sample, position, d0, d1, d2, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not an mdi data-plane frame")
    if version != VERSION:
        raise WireError(f"unsupported wire version {version} (this node speaks {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireError(f"unknown frame kind {kind}") from None
    try:
        dtype = DType(dtype)
    except ValueError:
        raise WireError(f"unknown dtype code {dtype}") from None
    if ndim > 3:
        raise WireError(f"ndim {ndim} > 3")
    dims = (d0, d1, d2)
    if any(dims[ndim:]):
        raise WireError(f"unused shape dims must be 0, got {dims} for ndim {ndim}")
    if data[RESERVED] != bytes(4):
        raise WireError(f"reserved header bytes must be 0, got {data[RESERVED]!r}")
    return Header(kind, dtype, run_id, sample, position, dims[:ndim], length)


def _expect(cond: bool, msg: str | Callable[[], str]) -> None:
    """The message is formatted only when the check fails (every frame passes here)."""
    if not cond:
        raise WireError(msg() if callable(msg) else msg)


def check_header(h: Header, lim: Limits | None) -> None:
    """Check a header against the run; afterwards h.length is safe to read.

    Handshake frames are checked without a run (lim None is allowed only for them).
    """
    if h.kind in (Kind.CHALLENGE, Kind.AUTH):
        _expect(h.dtype == DType.UINT8 and len(h.shape) == 1, lambda: f"{h.kind.name} must carry a uint8 vector")
        _expect(0 < h.shape[0] <= MAX_CONTROL_PAYLOAD, lambda: f"{h.kind.name} payload of {h.shape[0]} bytes")
        _expect(h.length == h.shape[0], lambda: f"{h.kind.name} length {h.length} != shape {h.shape}")
        return
    _expect(lim is not None, lambda: f"{h.kind.name} frame before the handshake")
    assert lim is not None
    _expect(h.run_id == lim.run_id, lambda: f"frame for run {h.run_id}, this run is {lim.run_id}")
    if h.kind == Kind.STOP:
        _expect(h.dtype == DType.NONE and not h.shape and h.length == 0, "STOP frames carry no payload")
        return
    if lim.sequences:
        _expect(h.kind not in FIXED_KINDS, lambda: f"{h.kind.name} frame in a sequence run")
    else:
        _expect(h.kind not in SEQUENCE_KINDS, lambda: f"{h.kind.name} frame in a fixed-batch run")
    if h.kind in (Kind.ADMIT, Kind.RETIRE):
        _expect(h.position == 0, lambda: f"{h.kind.name} must have position 0, got {h.position}")
        _expect(h.sample < lim.n_samples, lambda: f"slot {h.sample} outside the run's {lim.n_samples}")
        if h.kind == Kind.RETIRE:
            _expect(h.dtype == DType.NONE and not h.shape and h.length == 0,
                    "RETIRE frames carry no payload")
        else:
            _expect(h.dtype == DType.INT64 and h.shape == (ADMIT_FIELDS,),
                    f"ADMIT must carry int64 ({ADMIT_FIELDS},)")
            _expect(h.length == 8 * ADMIT_FIELDS, lambda: f"ADMIT payload length {h.length}")
        return
    if h.kind in (Kind.TOKENS, Kind.SEQ_TOKENS):
        _expect(h.dtype == DType.INT64 and len(h.shape) == 1, "TOKENS must be an int64 vector")
        batch = h.shape[0]
    else:
        _expect(h.dtype == lim.act_dtype,
                lambda: f"activation dtype {h.dtype.name}, the run uses {lim.act_dtype.name}")
        _expect(len(h.shape) == 3, lambda: f"{h.kind.name} activations must be 3-D, got shape {h.shape}")
        batch, t, c = h.shape
        _expect(c == lim.n_embd, lambda: f"activation width {c}, the model's n_embd is {lim.n_embd}")
        if h.kind in (Kind.PREFILL, Kind.CONTEXT, Kind.REPLAY):
            name = h.kind.name
            _expect(batch == 1, lambda: f"{name} carries one sample, got batch {batch}")
            _expect(1 <= t <= lim.block_size, lambda: f"{name} of {t} tokens, block_size is {lim.block_size}")
            if h.kind == Kind.CONTEXT:
                _expect(h.position == 0, lambda: f"{name} must start at position 0, got {h.position}")
            else:  # a chunk of a chunked prefill starts where the previous one ended
                _expect(h.position + t <= lim.block_size,
                        lambda: f"{name} of {t} tokens at position {h.position} passes "
                                f"block_size {lim.block_size}")
        elif h.kind == Kind.PREFILLS:
            rows = h.position
            _expect(batch == 1, lambda: f"PREFILLS carries one packed row, got batch {batch}")
            _expect(2 <= rows <= min(lim.n_samples, t),
                    lambda: f"PREFILLS of {rows} slots with {t} tokens (at least 2 slots, one "
                            f"token each, at most the run's {lim.n_samples} slots)")
            _expect(t <= rows * lim.block_size,
                    lambda: f"PREFILLS of {t} tokens for {rows} slots of block_size {lim.block_size}")
        elif h.kind == Kind.SEQ_DECODE:
            _expect(t == 1, lambda: f"SEQ_DECODE carries one token per slot, got {t}")
            _expect(h.position == 0, lambda: f"SEQ_DECODE must have position 0, got {h.position}")
        else:
            _expect(t == 1, lambda: f"DECODE carries one token per sample, got {t}")
            _expect(h.position < lim.block_size, lambda: f"position {h.position} >= block_size {lim.block_size}")
    _expect(1 <= batch <= lim.max_batch, lambda: f"batch {batch} outside 1..{lim.max_batch}")
    if h.kind in SLOT_TABLE_KINDS:  # the slots are checked when the table is read
        _expect(h.sample < lim.n_samples, lambda: f"slot {h.sample} outside the run's {lim.n_samples}")
    else:
        _expect(h.sample + batch <= lim.n_samples,
                lambda: f"samples {h.sample}..{h.sample + batch - 1} outside the run's "
                        f"{lim.n_samples}")
    itemsize = ITEMSIZE[h.dtype]
    want = math.prod(h.shape) * itemsize + table_bytes(h)
    _expect(h.length == want, lambda: f"payload length {h.length} != {want} for shape {h.shape} {h.dtype.name}")


def table_bytes(h: Header) -> int:
    """The bytes of a checked header's slot or row table, before its tensor's."""
    if h.kind in SLOT_TABLE_KINDS:
        return 4 * h.shape[0]
    return 12 * h.position if h.kind == Kind.PREFILLS else 0


def read_row_table(h: Header, table: bytes | bytearray, lim: Limits | None
                   ) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """The slots and (start, length) spans of a PREFILLS payload's row table."""
    v = struct.unpack_from(f"!{3 * h.position}I", table)
    slots, spans = v[0::3], tuple(zip(v[1::3], v[2::3]))
    _expect(slots[0] == h.sample, lambda: f"PREFILLS: first slot {slots[0]} != header sample {h.sample}")
    _expect(all(x < y for x, y in zip(slots, slots[1:])),
            lambda: f"PREFILLS: slots must be strictly ascending, got {list(slots)}")
    _expect(sum(n for _, n in spans) == h.shape[1] and all(n >= 1 for _, n in spans),
            lambda: f"PREFILLS: lengths {[n for _, n in spans]} (each at least 1) must add up "
                    f"to the {h.shape[1]} tokens carried")
    if lim is not None:
        _expect(slots[-1] < lim.n_samples,
                lambda: f"PREFILLS: slot {slots[-1]} outside the run's {lim.n_samples}")
        bad = [(a, n) for a, n in spans if a + n > lim.block_size]
        _expect(not bad, lambda: f"PREFILLS: {bad[0][1]} tokens at position {bad[0][0]} pass "
                                 f"block_size {lim.block_size}")
    return slots, spans


def read_slot_table(h: Header, table: bytes | bytearray, n_slots: int | None) -> tuple[int, ...]:
    """The slot ids of a SEQ_DECODE/SEQ_TOKENS payload's table (its first 4 * B bytes)."""
    b = h.shape[0]
    slots = struct.unpack_from(f"!{b}I", table)
    _expect(slots[0] == h.sample, lambda: f"{h.kind.name}: first slot {slots[0]} != header sample {h.sample}")
    _expect(all(x < y for x, y in zip(slots, slots[1:])),
            lambda: f"{h.kind.name}: slots must be strictly ascending, got {list(slots)}")
    if n_slots is not None:
        _expect(slots[-1] < n_slots, lambda: f"{h.kind.name}: slot {slots[-1]} outside the run's {n_slots}")
    return slots


def build_frame(h: Header, payload: bytes, lim: Limits | None = None) -> Frame:
    if len(payload) != h.length:
        raise WireError(f"truncated payload: {len(payload)} of {h.length} bytes")
    slots: tuple[int, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    if h.kind in SLOT_TABLE_KINDS:
        slots = read_slot_table(h, payload, lim.n_samples if lim else None)
    elif h.kind == Kind.PREFILLS:
        slots, spans = read_row_table(h, payload, lim)
    payload = payload[table_bytes(h):]
    tensor = None
    if h.dtype != DType.NONE:
        buf = bytearray(payload)  # writable copy owned by the tensor
        tensor = torch.frombuffer(buf, dtype=TORCH_DTYPES[h.dtype]) if buf else torch.empty(
            0, dtype=TORCH_DTYPES[h.dtype])
        tensor = tensor.reshape(h.shape)
    return finish_frame(h, slots, tensor, spans)


def finish_frame(h: Header, slots: tuple[int, ...], tensor: torch.Tensor | None,
                 spans: tuple[tuple[int, int], ...] = ()) -> Frame:
    """The frame of a checked header, its slot table and its tensor; an ADMIT's
    sampling parameters are decoded and checked here, on receipt, at every node:
    nothing forwards what the finisher refuses."""
    sampling = None
    if h.kind == Kind.ADMIT:
        assert tensor is not None
        try:
            sampling = SamplingConfig(*_admit_fields(tensor))
        except ValueError as e:
            raise WireError(f"ADMIT for slot {h.sample}: {e}") from None
    return Frame(h.kind, h.run_id, h.sample, h.position, tensor, slots, sampling, spans)


def decode_frame(data: bytes, lim: Limits | None) -> Frame:
    """Decode one complete frame from bytes (the fuzzed entry point)."""
    h = parse_header(data[:HEADER_SIZE])
    check_header(h, lim)
    if len(data) != HEADER_SIZE + h.length:
        raise WireError(f"frame of {len(data)} bytes, header announces {HEADER_SIZE + h.length}")
    return build_frame(h, data[HEADER_SIZE:], lim)


async def read_frame(reader: asyncio.StreamReader, lim: Limits | None) -> Frame:
    """Read one frame; raises WireError on a bad frame, EOFError on a closed stream."""
    try:
        raw = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise EOFError("connection closed") from None
        raise WireError(f"truncated header: {len(e.partial)} of {HEADER_SIZE} bytes") from None
    h = parse_header(raw)
    check_header(h, lim)
    try:
        payload = await reader.readexactly(h.length) if h.length else b""
    except asyncio.IncompleteReadError as e:
        raise WireError(f"truncated payload: {len(e.partial)} of {h.length} bytes") from None
    return build_frame(h, payload, lim)


def admit_frame(run_id: int, slot: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int) -> Frame:
    """ADMIT: seed, top_k (0 for none), and temperature, top_p (1.0 for none) as the
    bit patterns of float64 values, all in one int64 (4,) tensor."""
    floats = torch.tensor([temperature, 1.0 if top_p is None else top_p], dtype=torch.float64)
    bits = floats.view(torch.int64).tolist()
    return Frame(Kind.ADMIT, run_id, slot, 0,
                 torch.tensor([seed, top_k or 0, *bits], dtype=torch.int64))


def _admit_fields(t: torch.Tensor) -> tuple[float, int | None, int, float | None]:
    """(temperature, top_k, seed, top_p) of an ADMIT payload, as SamplingConfig takes them."""
    seed, top_k, t_bits, p_bits = t.tolist()
    temperature, top_p = torch.tensor([t_bits, p_bits], dtype=torch.int64).view(torch.float64).tolist()
    return temperature, top_k or None, seed, None if top_p == 1.0 else top_p


async def write_frame(writer: asyncio.StreamWriter, f: Frame) -> int:
    data = encode_frame(f)
    writer.write(data)
    await writer.drain()
    return len(data)
