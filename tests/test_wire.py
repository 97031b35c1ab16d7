"""The data-plane wire format: round trips for every kind and dtype, every header
check (each rejection names its field), truncation and EOF on a stream, and
hypothesis fuzzing of the decoder (only WireError may escape it)."""
from __future__ import annotations

import asyncio
import math
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdi.ring.protocol.wire import (DTYPE_CODES, HEADER, HEADER_SIZE, MAGIC, MAX_CONTROL_PAYLOAD,
                           SEQUENCE_KINDS, TORCH_DTYPES, VERSION, DType, Frame, Kind, Limits, WireError,
                           decode_frame, encode_frame, read_frame, write_frame)

torch.set_num_threads(1)

RUN = 7
C = 8          # n_embd
BS = 16        # block_size
NS = 4         # n_samples
MB = 3         # max_batch
ACT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.int64: torch.int64, torch.uint8: torch.uint8}


def limits(dtype: torch.dtype = torch.float32, **kw) -> Limits:
    args = dict(run_id=RUN, n_embd=C, block_size=BS, n_samples=NS,
                act_dtype=DTYPE_CODES[dtype], max_batch=MB)
    args.update(kw)
    return Limits(**args)


LIM = limits()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern: exact comparison, NaN payloads included."""
    return t.view(INT_VIEW[t.dtype])


def assert_same_frame(got: Frame, want: Frame) -> None:
    assert (got.kind, got.run_id, got.sample, got.position) == (
        want.kind, want.run_id, want.sample, want.position)
    if want.tensor is None:
        assert got.tensor is None
        return
    assert got.tensor is not None
    assert got.tensor.dtype == want.tensor.dtype
    assert got.tensor.shape == want.tensor.shape
    assert torch.equal(bits(got.tensor), bits(want.tensor.contiguous()))


def random_act(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# --- round trips ------------------------------------------------------------

WHOLE_SAMPLE_KINDS = [Kind.PREFILL, Kind.CONTEXT]  # (1, T, C) from position 0


@pytest.mark.parametrize("kind", WHOLE_SAMPLE_KINDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("t", [1, 5, BS])
def test_prefill_round_trip(kind, dtype, t):
    f = Frame(kind, RUN, sample=NS - 1, position=0, tensor=random_act((1, t, C), dtype))
    data = f.encode()
    assert len(data) == HEADER_SIZE + t * C * f.tensor.element_size()
    assert_same_frame(decode_frame(data, limits(dtype)), f)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("batch,sample,position", [(1, 0, 0), (MB, 1, BS - 1), (2, 2, 7)])
def test_decode_round_trip(dtype, batch, sample, position):
    f = Frame(Kind.DECODE, RUN, sample=sample, position=position,
              tensor=random_act((batch, 1, C), dtype, seed=batch))
    assert_same_frame(decode_frame(f.encode(), limits(dtype)), f)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_decode_frame_size_is_bytes_per_hop(dtype):
    """What the README reports as bytes per hop: header + B * n_embd * itemsize."""
    for batch in range(1, MB + 1):
        t = random_act((batch, 1, C), dtype)
        n = len(Frame(Kind.DECODE, RUN, 0, 3, t).encode())
        assert n == HEADER_SIZE + batch * C * t.element_size()
    assert HEADER_SIZE == 44


def test_special_float_values_survive():
    t = torch.tensor([[[float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 3.0, -2.5]]])
    for dtype in ACT_DTYPES:
        f = Frame(Kind.DECODE, RUN, 0, 0, t.to(dtype))
        assert_same_frame(decode_frame(f.encode(), limits(dtype)), f)


def test_non_contiguous_tensor_is_sent_in_logical_order():
    base = random_act((C, 1, 2), torch.float32)
    t = base.permute(2, 1, 0)  # (2, 1, C), not contiguous
    assert not t.is_contiguous()
    got = decode_frame(Frame(Kind.DECODE, RUN, 0, 0, t).encode(), LIM)
    assert torch.equal(got.tensor, t)


def test_tokens_round_trip():
    ids = torch.tensor([0, 2**40, -1], dtype=torch.int64)
    f = Frame(Kind.TOKENS, RUN, sample=1, position=0, tensor=ids)
    assert_same_frame(decode_frame(f.encode(), LIM), f)
    assert len(f.encode()) == HEADER_SIZE + 3 * 8


def test_stop_round_trip():
    f = Frame(Kind.STOP, RUN)
    data = f.encode()
    assert len(data) == HEADER_SIZE
    assert_same_frame(decode_frame(data, LIM), f)


@pytest.mark.parametrize("kind", [Kind.CHALLENGE, Kind.AUTH])
@pytest.mark.parametrize("n", [1, 32, MAX_CONTROL_PAYLOAD])
@pytest.mark.parametrize("lim", [None, LIM])
def test_handshake_round_trip(kind, n, lim):
    payload = torch.tensor(list(range(n)), dtype=torch.int64).remainder(256).to(torch.uint8)
    f = Frame(kind, 0, tensor=payload)
    assert_same_frame(decode_frame(f.encode(), lim), f)


def test_decoded_tensor_is_writable_and_owns_its_memory():
    data = bytearray(Frame(Kind.DECODE, RUN, 0, 0, torch.ones(1, 1, C)).encode())
    t = decode_frame(bytes(data), LIM).tensor
    t.add_(1)  # frombuffer over a private, writable copy
    assert torch.equal(t, torch.full((1, 1, C), 2.0))


def test_encode_rejects_unsendable():
    with pytest.raises(WireError, match="dtype"):
        encode_frame(Frame(Kind.DECODE, RUN, tensor=torch.zeros(1, 1, C, dtype=torch.float64)))
    with pytest.raises(WireError, match="3 dimensions"):
        encode_frame(Frame(Kind.DECODE, RUN, tensor=torch.zeros(1, 1, 1, C)))


def test_limits_reject_integer_activation_dtype():
    with pytest.raises(WireError, match="floating point"):
        limits(torch.int64)


def test_write_frame_then_read_frame():
    async def main() -> Frame:
        reader = asyncio.StreamReader()

        class Writer:  # the two StreamWriter methods write_frame uses
            def write(self, data: bytes) -> None:
                reader.feed_data(data)

            async def drain(self) -> None:
                pass

        f = Frame(Kind.DECODE, RUN, 1, 2, random_act((2, 1, C), torch.float32))
        n = await write_frame(Writer(), f)  # type: ignore[arg-type]
        assert n == HEADER_SIZE + 2 * C * 4
        await write_frame(Writer(), Frame(Kind.STOP, RUN))  # type: ignore[arg-type]
        reader.feed_eof()
        got = await read_frame(reader, LIM)
        assert_same_frame(got, f)
        assert (await read_frame(reader, LIM)).kind == Kind.STOP
        with pytest.raises(EOFError):
            await read_frame(reader, LIM)
        return got

    asyncio.run(main())


# --- header checks ------------------------------------------------------------

def itemsize(code: int) -> int:
    try:
        return torch.tensor([], dtype=TORCH_DTYPES[DType(code)]).element_size()
    except (KeyError, ValueError):
        return 0


def header(kind: int = Kind.DECODE, dtype: int = DType.FLOAT32, ndim: int | None = None,
           run_id: int = RUN, sample: int = 0, position: int = 5,
           dims: tuple[int, ...] = (2, 1, C), length: int | None = None,
           magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """A raw header, valid DECODE for LIM by default; length defaults to what the dims need."""
    dims = tuple(dims) + (0,) * (3 - len(dims))
    if ndim is None:
        ndim = sum(1 for d in dims if d)
    if length is None:
        length = math.prod(dims[:ndim]) * itemsize(dtype) if ndim else 0
    return HEADER.pack(magic, version, int(kind), int(dtype), ndim, run_id, sample, position,
                       *dims, length)


def frame_bytes(**kw) -> bytes:
    h = header(**kw)
    length = HEADER.unpack(h)[-1]
    return h + bytes(min(length, 1 << 16))


def test_header_helper_makes_valid_frames():
    assert decode_frame(frame_bytes(), LIM).tensor.shape == (2, 1, C)
    assert decode_frame(frame_bytes(kind=Kind.PREFILL, position=0, dims=(1, BS, C)), LIM
                        ).tensor.shape == (1, BS, C)
    assert decode_frame(frame_bytes(kind=Kind.TOKENS, dtype=DType.INT64, dims=(3,)), LIM
                        ).tensor.shape == (3,)
    assert decode_frame(frame_bytes(kind=Kind.STOP, dtype=DType.NONE, dims=()), LIM).tensor is None


REJECTIONS = [
    # field-level format checks (no run context needed)
    ("bad magic", dict(magic=b"MDI\x01"), "magic"),
    ("bad magic http", dict(magic=b"GET "), "magic"),
    ("bad version", dict(version=2), "version"),
    ("version 0", dict(version=0), "version"),
    ("unknown kind", dict(kind=99), "kind"),
    ("kind 0", dict(kind=0), "kind"),
    ("unknown dtype", dict(dtype=42), "dtype"),
    ("ndim > 3", dict(ndim=4), "ndim"),
    ("ndim 255", dict(ndim=255), "ndim"),
    ("nonzero unused dim", dict(ndim=2, dims=(2, 1, C)), "unused shape dims"),
    ("nonzero unused dim ndim 0", dict(kind=Kind.STOP, dtype=DType.NONE, ndim=0, dims=(0, 0, 1)),
     "unused shape dims"),
    # the run's limits
    ("wrong run_id", dict(run_id=RUN + 1), "run"),
    ("wrong run_id STOP", dict(kind=Kind.STOP, dtype=DType.NONE, dims=(), run_id=0), "run"),
    ("act dtype not the run's", dict(dtype=DType.FLOAT16), "dtype"),
    ("act dtype bf16", dict(dtype=DType.BFLOAT16), "dtype"),
    ("act dtype int64", dict(dtype=DType.INT64), "dtype"),
    ("act dtype none", dict(dtype=DType.NONE), "dtype"),
    ("width != n_embd", dict(dims=(2, 1, C + 1)), "n_embd"),
    ("width 0", dict(ndim=3, dims=(2, 1, 0)), "n_embd"),
    ("activations 2-D", dict(dims=(2, C)), "3-D"),
    ("PREFILL batch 2", dict(kind=Kind.PREFILL, position=0, dims=(2, 3, C)), "batch"),
    ("PREFILL T > block_size", dict(kind=Kind.PREFILL, position=0, dims=(1, BS + 1, C)),
     "block_size"),
    ("PREFILL T 0", dict(kind=Kind.PREFILL, position=0, ndim=3, dims=(1, 0, C)), "tokens"),
    ("PREFILL chunk past block_size", dict(kind=Kind.PREFILL, position=BS - 2, dims=(1, 3, C)),
     "position 14 passes block_size"),
    ("CONTEXT position != 0", dict(kind=Kind.CONTEXT, position=1, dims=(1, 3, C)), "position"),
    ("CONTEXT batch 2", dict(kind=Kind.CONTEXT, position=0, dims=(2, 3, C)), "CONTEXT.*batch"),
    ("CONTEXT T > block_size", dict(kind=Kind.CONTEXT, position=0, dims=(1, BS + 1, C)),
     "block_size"),
    ("CONTEXT position != 0", dict(kind=Kind.CONTEXT, position=2, dims=(1, 3, C)), "position"),
    ("CONTEXT width", dict(kind=Kind.CONTEXT, position=0, dims=(1, 3, C - 1)), "n_embd"),
    ("CONTEXT dtype", dict(kind=Kind.CONTEXT, position=0, dtype=DType.FLOAT16, dims=(1, 3, C)),
     "dtype"),
    ("DECODE T 2", dict(dims=(2, 2, C)), "DECODE"),
    ("DECODE T 0", dict(ndim=3, dims=(2, 0, C)), "DECODE"),
    ("DECODE position == block_size", dict(position=BS), "position"),
    ("DECODE position huge", dict(position=2**32 - 1), "position"),
    ("batch > max_batch", dict(dims=(MB + 1, 1, C)), "batch"),
    ("batch 0", dict(ndim=3, dims=(0, 1, C)), "batch"),
    ("sample range past n_samples", dict(sample=NS - 1, dims=(2, 1, C)), "samples"),
    ("sample id past n_samples", dict(sample=NS, dims=(1, 1, C)), "samples"),
    ("sample id huge", dict(sample=2**32 - 1, dims=(1, 1, C)), "samples"),
    ("payload length +1", dict(length=2 * C * 4 + 1), "payload length"),
    ("payload length -1", dict(length=2 * C * 4 - 1), "payload length"),
    ("payload length 0", dict(length=0), "payload length"),
    ("payload length 2**60", dict(length=2**60), "payload length"),
    ("payload length max", dict(length=2**64 - 1), "payload length"),
    # tokens, stop, handshake
    ("TOKENS float", dict(kind=Kind.TOKENS, dtype=DType.FLOAT32, dims=(2,)), "int64"),
    ("TOKENS 2-D", dict(kind=Kind.TOKENS, dtype=DType.INT64, dims=(2, 1)), "int64 vector"),
    ("TOKENS batch > max_batch", dict(kind=Kind.TOKENS, dtype=DType.INT64, dims=(MB + 1,)), "batch"),
    ("TOKENS samples", dict(kind=Kind.TOKENS, dtype=DType.INT64, sample=NS - 1, dims=(2,)),
     "samples"),
    ("TOKENS length", dict(kind=Kind.TOKENS, dtype=DType.INT64, dims=(2,), length=15),
     "payload length"),
    ("STOP with payload", dict(kind=Kind.STOP, dtype=DType.UINT8, dims=(1,)), "STOP"),
    ("STOP with length", dict(kind=Kind.STOP, dtype=DType.NONE, dims=(), length=4), "STOP"),
    ("CHALLENGE float", dict(kind=Kind.CHALLENGE, dtype=DType.FLOAT32, dims=(4,)), "uint8"),
    ("AUTH 2-D", dict(kind=Kind.AUTH, dtype=DType.UINT8, dims=(4, 4)), "uint8 vector"),
    ("CHALLENGE empty", dict(kind=Kind.CHALLENGE, dtype=DType.UINT8, ndim=1, dims=(0,)), "payload"),
    ("AUTH too big", dict(kind=Kind.AUTH, dtype=DType.UINT8, dims=(MAX_CONTROL_PAYLOAD + 1,)),
     "payload"),
    ("AUTH length", dict(kind=Kind.AUTH, dtype=DType.UINT8, dims=(32,), length=2**60), "length"),
]


@pytest.mark.parametrize("kw,match", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_decode_frame_rejects(kw, match):
    with pytest.raises(WireError, match=match):
        decode_frame(frame_bytes(**kw), LIM)


@pytest.mark.parametrize("kw,match", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_read_frame_rejects_from_the_header_alone(kw, match):
    """Every bad header is refused before any payload byte is awaited: the reader
    holds the header only and stays open, so waiting for a payload would hang."""
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(header(**kw))
        with pytest.raises(WireError, match=match):
            await asyncio.wait_for(read_frame(reader, LIM), timeout=5)

    asyncio.run(main())


def test_huge_length_rejected_before_reading_payload():
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(header(length=2**60))
        with pytest.raises(WireError, match="payload length"):
            await asyncio.wait_for(read_frame(reader, LIM), timeout=5)

    asyncio.run(main())


@pytest.mark.parametrize("kind", [Kind.DECODE, Kind.PREFILL, Kind.CONTEXT, Kind.TOKENS, Kind.STOP])
def test_data_frames_need_the_handshake(kind):
    with pytest.raises(WireError, match="handshake"):
        decode_frame(frame_bytes(kind=kind), None)


# --- truncation and EOF -------------------------------------------------------------

def test_decode_frame_truncated_header():
    data = Frame(Kind.STOP, RUN).encode()
    for n in (0, 1, 4, HEADER_SIZE - 1):
        with pytest.raises(WireError, match="truncated header"):
            decode_frame(data[:n], LIM)


def test_decode_frame_truncated_or_padded_payload():
    data = Frame(Kind.DECODE, RUN, 0, 0, torch.ones(2, 1, C)).encode()
    for n in (HEADER_SIZE, HEADER_SIZE + 1, len(data) - 1):
        with pytest.raises(WireError, match="announces"):
            decode_frame(data[:n], LIM)
    with pytest.raises(WireError, match="announces"):
        decode_frame(data + b"\0", LIM)


async def _read(chunks: list[bytes], eof: bool = True) -> Frame:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    if eof:
        reader.feed_eof()
    return await asyncio.wait_for(read_frame(reader, LIM), timeout=5)


def test_read_frame_eof_before_any_byte():
    with pytest.raises(EOFError):
        asyncio.run(_read([]))


@pytest.mark.parametrize("n", [1, 4, HEADER_SIZE - 1])
def test_read_frame_truncated_header(n):
    data = Frame(Kind.STOP, RUN).encode()
    with pytest.raises(WireError, match=f"truncated header: {n} of {HEADER_SIZE}"):
        asyncio.run(_read([data[:n]]))


@pytest.mark.parametrize("keep", [0, 1, 2 * C * 4 - 1])
def test_read_frame_truncated_payload(keep):
    data = Frame(Kind.DECODE, RUN, 0, 0, torch.ones(2, 1, C)).encode()
    with pytest.raises(WireError, match=f"truncated payload: {keep} of {2 * C * 4}"):
        asyncio.run(_read([data[:HEADER_SIZE + keep]]))


def test_read_frame_across_chunks():
    f = Frame(Kind.PREFILL, RUN, 2, 0, random_act((1, 5, C), torch.float32))
    data = f.encode()
    chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
    assert_same_frame(asyncio.run(_read(chunks)), f)


# --- fuzzing ----------------------------------------------------------------------

FUZZ_LIMITS = [LIM, limits(torch.bfloat16), limits(torch.float16, max_batch=1, n_samples=1), None]


def decode_or_wire_error(data: bytes, lim: Limits | None) -> Frame | None:
    try:
        return decode_frame(data, lim)
    except WireError:
        return None


@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300 - len(MAGIC)).map(lambda b: MAGIC + b),
    st.binary(max_size=300 - len(MAGIC) - 1).map(lambda b: MAGIC + bytes([VERSION]) + b),
), lim=st.sampled_from(FUZZ_LIMITS))
def test_fuzz_random_bytes(data, lim):
    f = decode_or_wire_error(data, lim)
    if f is not None and f.tensor is not None:
        assert f.tensor.numel() * f.tensor.element_size() == len(data) - HEADER_SIZE


def _u32(*special: int):
    return st.one_of(st.sampled_from(special + (0, 1, 2**31, 2**32 - 1)),
                     st.integers(0, 2**32 - 1))


FIELDS = ("magic", "version", "kind", "dtype", "ndim", "run_id", "sample", "position",
          "d0", "d1", "d2", "length")


def _field_values(name: str):
    """Values for one header field: near the valid ones, and from its whole range."""
    if name == "magic":
        return st.one_of(st.sampled_from([b"MDI\x01", b"mdi\x00", b"\0\0\0\0"]),
                         st.binary(min_size=4, max_size=4))
    if name in ("version", "kind", "dtype", "ndim"):
        near = {"version": [0, 2], "kind": list(range(9)), "dtype": list(range(7)),
                "ndim": [0, 1, 2, 3, 4]}[name]
        return st.one_of(st.sampled_from(near), st.integers(0, 255))
    if name == "length":
        return st.one_of(st.integers(0, 4096), st.sampled_from([2**60, 2**63, 2**64 - 1]),
                         st.integers(0, 2**64 - 1))
    return _u32(*range(NS + 1), C, C + 1, BS - 1, BS, BS + 1, RUN)


FIELD_VALUES = [_field_values(name) for name in FIELDS]  # built once: drawing is the cost
RESERVED_VALUES = st.binary(min_size=4, max_size=4)


@st.composite
def mutated_frames(draw):
    """A valid frame's header with some fields replaced by HEADER.pack-able random
    values; the payload is the announced length, or off by one, or short."""
    f, _ = draw(valid_frames())
    fields = list(HEADER.unpack(f.encode()[:HEADER_SIZE]))
    for i in draw(st.sets(st.integers(0, len(FIELDS) - 1), min_size=1, max_size=3)):
        fields[i] = draw(FIELD_VALUES[i])
    if draw(st.booleans()):  # keep the length consistent with the (mutated) shape
        ndim, dtype = fields[4], fields[3]
        need = math.prod(fields[8:8 + ndim]) * itemsize(dtype) if 0 < ndim <= 3 else 0
        fields[11] = min(need, 2**64 - 1)
    length = fields[11]
    h = HEADER.pack(*fields)
    if draw(st.integers(0, 7)) == 0:  # the reserved bytes, which must stay zero
        h = h[:-4] + draw(RESERVED_VALUES)
    n_payload = length if length <= 4096 else draw(st.integers(0, 64))
    n_payload = max(0, n_payload + draw(st.sampled_from([0, 0, 0, -1, 1])))
    return h + draw(st.binary(min_size=n_payload, max_size=n_payload))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated_frames(), lim=st.sampled_from(FUZZ_LIMITS))
def test_fuzz_mutated_headers(data, lim):
    f = decode_or_wire_error(data, lim)
    if f is not None:
        # an accepted frame is canonical: it encodes back to exactly the bytes received
        assert f.encode() == data
        assert f.kind in (Kind.CHALLENGE, Kind.AUTH) or lim is not None


@st.composite
def valid_frames(draw):
    dtype = draw(st.sampled_from(ACT_DTYPES))
    lim = limits(dtype, max_batch=draw(st.integers(1, NS)))
    kind = draw(st.sampled_from([k for k in Kind if k not in SEQUENCE_KINDS]))  # see test_engine_wire
    sample, position, shape, tdtype = 0, 0, None, dtype
    if kind in WHOLE_SAMPLE_KINDS:
        shape = (1, draw(st.integers(1, BS)), C)
        sample = draw(st.integers(0, NS - 1))
    elif kind in (Kind.DECODE, Kind.TOKENS):
        b = draw(st.integers(1, lim.max_batch))
        sample = draw(st.integers(0, NS - b))
        if kind == Kind.DECODE:
            shape, position = (b, 1, C), draw(st.integers(0, BS - 1))
        else:
            shape, tdtype = (b,), torch.int64
    elif kind in (Kind.CHALLENGE, Kind.AUTH):
        shape, tdtype = (draw(st.integers(1, MAX_CONTROL_PAYLOAD)),), torch.uint8
        sample, position = draw(_u32()), draw(_u32())
    tensor = None
    if shape is not None:
        n = math.prod(shape) * torch.tensor([], dtype=tdtype).element_size()
        raw = draw(st.binary(min_size=n, max_size=n))  # any bit pattern, NaNs included
        tensor = torch.frombuffer(bytearray(raw), dtype=tdtype).reshape(shape)
    return Frame(kind, RUN, sample, position, tensor), lim


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=valid_frames())
def test_fuzz_round_trip(case):
    f, lim = case
    data = f.encode()
    expected = 0 if f.tensor is None else f.tensor.numel() * f.tensor.element_size()
    assert len(data) == HEADER_SIZE + expected
    assert_same_frame(decode_frame(data, lim), f)
    got = asyncio.run(_read_with(data, lim))
    assert_same_frame(got, f)


def _templates() -> list[tuple[bytes, Limits | None]]:
    """Valid frames of every kind, for the seeded mutation fuzzer."""
    out = []
    for lim in FUZZ_LIMITS[:3]:
        act = TORCH_DTYPES[lim.act_dtype]
        out += [(Frame(Kind.DECODE, RUN, 0, 3, torch.ones(lim.max_batch, 1, C, dtype=act)).encode(), lim),
                (Frame(Kind.PREFILL, RUN, 0, 0, torch.ones(1, 5, C, dtype=act)).encode(), lim),
                (Frame(Kind.CONTEXT, RUN, 0, 0, torch.ones(1, BS, C, dtype=act)).encode(), lim),
                (Frame(Kind.TOKENS, RUN, 0, 0, torch.arange(lim.max_batch)).encode(), lim),
                (Frame(Kind.STOP, RUN).encode(), lim)]
    for kind in (Kind.CHALLENGE, Kind.AUTH):
        out.append((Frame(kind, RUN, tensor=torch.arange(32, dtype=torch.uint8)).encode(), None))
    return out


BOUNDARY_U32 = [0, 1, 2, 3, NS - 1, NS, C, BS - 1, BS, RUN, 2**31, 2**32 - 1]
U32_FIELDS = [8, 12, 16, 20, 24, 28]  # run_id, sample, position, shape
SEEDED_CASES = 20_000


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """1 to 4 edits: a random byte of the header, a uint32 field set to a boundary value,
    the length field, the reserved bytes, or the payload cut or extended."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(min(HEADER_SIZE, len(b)))] = rng.randrange(256)
        elif op == 1:
            at = rng.choice(U32_FIELDS)
            b[at:at + 4] = rng.choice(BOUNDARY_U32).to_bytes(4, "big")
        elif op == 2:
            n = rng.choice([0, len(b) - HEADER_SIZE + rng.choice([-1, 1]), 2**63, 2**64 - 1,
                            rng.randrange(2**64)])
            b[32:40] = max(0, n).to_bytes(8, "big")
        elif op == 3:
            b[40:44] = rng.randbytes(4) if rng.random() < 0.5 else bytes(3) + b"\x01"
        elif op == 4:
            del b[rng.randrange(HEADER_SIZE - 1, len(b) + 1):]
        else:
            b += rng.randbytes(rng.randint(1, 9))
    return bytes(b)


def test_fuzz_seeded_mutations():
    """20,000 mutated frames from a fixed seed (cheap next to hypothesis's 5,800 above):
    only WireError escapes, and whatever is accepted is canonical and in the run's limits."""
    rng = random.Random(13)
    templates = _templates()
    accepted = 0
    for _ in range(SEEDED_CASES):
        data, lim = rng.choice(templates)
        lim = rng.choice([lim, lim, None, LIM])
        bad = _mutate(rng, data)
        f = decode_or_wire_error(bad, lim)
        if f is not None:
            accepted += 1
            assert f.encode() == bad
            assert bad[40:44] == bytes(4)
            assert f.kind in (Kind.CHALLENGE, Kind.AUTH) or (lim is not None and f.run_id == lim.run_id)
    assert 0 < accepted < SEEDED_CASES // 2  # the edits mostly break frames, not always


async def _read_with(data: bytes, lim: Limits) -> Frame:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_frame(reader, lim)


@pytest.mark.parametrize("reserved", [b"\0\0\0\1", b"\xff\0\0\0", b"\xff" * 4])
def test_reserved_header_bytes_must_be_zero(reserved):
    """docs/wire.md: the 4 reserved bytes are zero; struct's pad bytes are not checked."""
    data = frame_bytes()
    bad = data[:HEADER_SIZE - 4] + reserved + data[HEADER_SIZE:]
    assert decode_frame(data, LIM).tensor.shape == (2, 1, C)
    with pytest.raises(WireError, match="reserved header bytes must be 0"):
        decode_frame(bad, LIM)

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(bad[:HEADER_SIZE])  # refused before the payload is awaited
        with pytest.raises(WireError, match="reserved"):
            await asyncio.wait_for(read_frame(reader, LIM), timeout=5)
    asyncio.run(main())


def test_header_layout_matches_the_docstring():
    assert HEADER.format == "!4sBBBBIII3IQ4x"
    assert struct.calcsize(HEADER.format) == HEADER_SIZE == 44
    data = Frame(Kind.DECODE, 0x01020304, 5, 6, torch.zeros(1, 1, C)).encode()
    assert data[:4] == MAGIC and data[4] == VERSION and data[5] == Kind.DECODE
    assert data[6] == DType.FLOAT32 and data[7] == 3
    assert data[8:12] == bytes([1, 2, 3, 4])  # big-endian run id
    assert data[40:44] == b"\0\0\0\0"          # reserved
