"""The frames of a sequence run (ADMIT, RETIRE, PREFILL by slot, SEQ_DECODE,
SEQ_TOKENS): round trips of the engine's messages, and every header / slot
table / parameter check on receipt."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdi.engine.messages import Admit, Decode, Prefill, Retire, Tokens
from mdi.engine.slots import SlotStage
from mdi.model import GPT, GPTConfig
from mdi.ring.protocol.seq_frames import to_frame, to_message
from mdi.ring.protocol.wire import (DTYPE_CODES, HEADER, HEADER_SIZE, Frame, Kind, Limits, WireError,
                           admit_frame, decode_frame)

RUN, C, BS, SLOTS, LANE = 9, 8, 16, 6, 3
SEQ = Limits(RUN, C, BS, SLOTS, DTYPE_CODES[torch.float32], LANE, sequences=True)
FIXED = Limits(RUN, C, BS, SLOTS, DTYPE_CODES[torch.float32], LANE)


STAGE = SlotStage(GPT(GPTConfig(vocab_size=100, block_size=BS, n_layer=2, n_head=2, n_embd=C), 0, 1),
                  [LANE, SLOTS - LANE])  # two lanes: slots 0..2 and 3..5


def to_bytes(m) -> bytes:
    return to_frame(m, RUN, STAGE).encode()


def round_trip(m):
    return to_message(decode_frame(to_bytes(m), SEQ), STAGE)


@pytest.mark.parametrize("m", [
    Admit(5, 0.7, 40, 0.95, 2**63 - 1), Admit(0, 0.0, None, None, 0), Retire(4),
])
def test_control_messages_round_trip(m):
    assert round_trip(m) == m


def test_tensor_messages_round_trip():
    x = torch.randn(1, 5, C)
    p = round_trip(Prefill(2, x))
    assert isinstance(p, Prefill) and p.slot == 2 and torch.equal(p.x, x)
    x = torch.randn(2, 1, C)
    d = round_trip(Decode(1, (3, 5), x))
    assert isinstance(d, Decode) and (d.lane, d.slots) == (1, (3, 5)) and torch.equal(d.x, x)
    assert round_trip(Tokens(0, (0, 2), (17, 4))) == Tokens(0, (0, 2), (17, 4))
    frame = to_frame(Decode(1, (3, 5), x), RUN, STAGE)
    assert frame.kind == Kind.SEQ_DECODE
    assert len(frame.encode()) == HEADER_SIZE + 2 * 4 + x.numel() * 4  # slot table: 4 bytes a row


def test_a_whole_lane_travels_as_decode_and_tokens_without_a_slot_table():
    x = torch.randn(3, 1, C)
    frame = to_frame(Decode(1, (3, 4, 5), x, position=7), RUN, STAGE)
    assert (frame.kind, frame.sample, frame.position, frame.slots) == (Kind.DECODE, 3, 7, ())
    assert len(frame.encode()) == HEADER_SIZE + x.numel() * 4  # as a fixed batch's group
    d = round_trip(Decode(1, (3, 4, 5), x, position=7))
    assert (d.lane, d.slots, d.position) == (1, (3, 4, 5), 7) and torch.equal(d.x, x)
    t = to_frame(Tokens(0, (0, 1, 2), (5, 6, 7)), RUN, STAGE)
    assert t.kind == Kind.TOKENS and round_trip(Tokens(0, (0, 1, 2), (5, 6, 7))).slots == (0, 1, 2)
    for sample, rows in [(1, 2), (0, 2), (2, 2)]:  # not exactly one lane: refused
        data = Frame(Kind.DECODE, RUN, sample, 0, torch.zeros(rows, 1, C)).encode()
        with pytest.raises(WireError, match="not a whole lane"):
            to_message(decode_frame(data, SEQ), STAGE)


def test_each_run_kind_refuses_the_others_frames():
    with pytest.raises(WireError, match="ADMIT frame in a fixed-batch run"):
        decode_frame(to_bytes(Admit(0, 1.0, None, None, 1)), FIXED)
    with pytest.raises(WireError, match="SEQ_DECODE frame in a fixed-batch run"):
        decode_frame(to_bytes(Decode(0, (0,), torch.zeros(1, 1, C))), FIXED)
    with pytest.raises(WireError, match="CONTEXT frame in a sequence run"):
        decode_frame(Frame(Kind.CONTEXT, RUN, 0, 0, torch.zeros(1, 4, C)).encode(), SEQ)


def seq_decode_bytes(sample: int, slots: list[int], rows: int | None = None, position: int = 0,
                     extra: int = 0) -> bytes:
    rows = len(slots) if rows is None else rows
    table = struct.pack(f"!{len(slots)}I", *slots)
    payload = table + bytes(rows * C * 4 + extra)
    return HEADER.pack(b"MDI\x00", 1, Kind.SEQ_DECODE, DTYPE_CODES[torch.float32], 3, RUN, sample,
                       position, rows, 1, C, len(payload)) + payload


@pytest.mark.parametrize("data,needle", [
    (seq_decode_bytes(3, [3, 3]), "strictly ascending"),
    (seq_decode_bytes(4, [5, 4]), "first slot 5 != header sample 4"),
    (seq_decode_bytes(4, [4, 3]), "strictly ascending"),
    (seq_decode_bytes(5, [5, 6]), "slot 6 outside the run's 6"),
    (seq_decode_bytes(6, [6]), "slot 6 outside the run's 6"),
    (seq_decode_bytes(0, [0, 1], rows=3), "payload length"),
    (seq_decode_bytes(0, [0, 1], extra=4), "payload length"),
    (seq_decode_bytes(0, [0, 1], position=3), "position 0"),
    (seq_decode_bytes(0, [0, 1, 2, 3]), "batch 4 outside 1..3"),
])
def test_slot_table_checks(data, needle):
    with pytest.raises(WireError, match=needle):
        decode_frame(data, SEQ)


def admit_bytes(temperature=1.0, top_k=0, top_p=1.0, seed=1, slot=0) -> bytes:
    return admit_frame(RUN, slot, temperature, top_k, top_p, seed).encode()


BAD_ADMITS = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(top_k=2**31), "top_k"),   # was forwarded by every node (no upper bound on the wire)
    (dict(top_k=2**62), "top_k"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("fields,name", BAD_ADMITS)
def test_admit_parameters_are_checked_on_receipt(fields, name):
    """Review: an ADMIT's parameters were checked in part, after the frame was queued
    for compute, and by other rules than the finisher's. decode_frame / read_frame
    (what every node runs on receipt) now refuses them with the field named."""
    with pytest.raises(WireError, match=rf"^ADMIT for slot 2: {name} must be"):
        decode_frame(admit_bytes(slot=2, **fields), SEQ)


@pytest.mark.parametrize("fields,name", BAD_ADMITS)
def test_one_sampling_check_for_api_engine_and_nodes(fields, name):
    """What a node refuses in ADMIT, the engine's SeqParams (the API's requests) and the
    CLI's SamplingConfig refuse too, with the same words: one check, SamplingConfig's.
    A request cannot pass the API and then fail on a node (which would fail the engine)."""
    from mdi.engine.api import SeqParams
    from mdi.generate.sampling import SamplingConfig

    params = {"temperature": 1.0, "top_k": None, "top_p": None, "seed": 1, **fields}
    with pytest.raises(WireError) as wire:
        decode_frame(admit_bytes(**fields), SEQ)
    with pytest.raises(ValueError) as api:
        SeqParams(max_tokens=1, **params)
    with pytest.raises(ValueError) as cli:
        SamplingConfig(**params)
    assert str(api.value) == str(cli.value) and str(api.value) in str(wire.value)


def test_a_received_admit_carries_its_checked_parameters():
    """Decoded once, by the wire, into the object the finisher samples with."""
    from mdi.generate.sampling import SamplingConfig

    f = decode_frame(admit_bytes(temperature=0.7, top_k=40, top_p=0.95, seed=2**63 - 1, slot=3),
                     SEQ)
    assert f.sampling == SamplingConfig(temperature=0.7, top_k=40, seed=2**63 - 1, top_p=0.95)
    m = to_message(f, STAGE)
    assert m == Admit(3, 0.7, 40, 0.95, 2**63 - 1) and m.sampling == f.sampling


def test_admit_and_retire_headers_are_checked():
    with pytest.raises(WireError, match="slot 6 outside"):
        decode_frame(admit_bytes(slot=SLOTS), SEQ)
    with pytest.raises(WireError, match="RETIRE frames carry no payload"):
        decode_frame(Frame(Kind.RETIRE, RUN, 0, 0, torch.zeros(1, dtype=torch.int64)).encode(), SEQ)
    bad = Frame(Kind.ADMIT, RUN, 0, 0, torch.zeros(3, dtype=torch.int64)).encode()
    with pytest.raises(WireError, match="ADMIT must carry int64"):
        decode_frame(bad, SEQ)


@st.composite
def seq_frames(draw):
    kind = draw(st.sampled_from(["admit", "retire", "prefill", "decode", "tokens"]))
    slot = draw(st.integers(0, SLOTS - 1))
    if kind == "admit":
        return Admit(slot, draw(st.floats(0, 5)), draw(st.none() | st.integers(1, 99)),
                     draw(st.none() | st.floats(0.01, 0.99)), draw(st.integers(0, 2**63 - 1)))
    if kind == "retire":
        return Retire(slot)
    if kind == "prefill":
        return Prefill(slot, torch.randn(1, draw(st.integers(1, BS)), C))
    lane = draw(st.integers(0, SLOTS // LANE - 1))
    slots = tuple(sorted(draw(st.sets(st.integers(lane * LANE, lane * LANE + LANE - 1),
                                      min_size=1))))
    if kind == "decode":
        return Decode(lane, slots, torch.randn(len(slots), 1, C))
    return Tokens(lane, slots, tuple(draw(st.integers(0, 99)) for _ in slots))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(m=seq_frames(), cut=st.integers(0, 64), flip=st.integers(0, 10_000))
def test_fuzz_sequence_frames(m, cut, flip):
    """Valid frames round-trip and are canonical; a changed byte or a cut frame is
    either refused with WireError or decodes to a frame that re-encodes to the same bytes."""
    data = to_bytes(m)
    f = decode_frame(data, SEQ)
    assert f.encode() == data
    broken = bytearray(data)
    at = flip % len(data)
    if 40 <= at < HEADER_SIZE:  # the reserved bytes: not read (wire.py's business, not ours)
        at = 0
    broken[at] ^= 0xFF
    for bad in (bytes(broken), data[:len(data) - 1 - cut % len(data)]):
        try:
            g = decode_frame(bad, SEQ)
        except WireError:
            continue
        assert g.encode() == bad


def test_init_of_a_sequence_run():
    """/init with sequences: the groups are lanes of slots, the finisher needs no
    sampling settings, and the run's limits take sequence frames."""
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.validate import InitError, validate_init

    config = GPTConfig(vocab_size=100, block_size=BS, n_layer=2, n_head=2, n_embd=C)
    body = {"run_id": 5, "role": "finisher", "start": 1, "stop": 2, "model": config.to_dict(),
            "groups": [[0, 3], [3, 5]], "next": {"addr": "127.0.0.1", "port": 9},
            "prev_addr": "127.0.0.1", "sampling": None}
    with pytest.raises(InitError, match="sampling"):
        validate_init(InitRequest(**body))
    _, lim, sampling = validate_init(InitRequest(**body, sequences=True))
    assert sampling is None
    assert lim.sequences and (lim.n_samples, lim.max_batch) == (5, 3)
    assert decode_frame(to_frame(Retire(4), 5, STAGE).encode(), lim).kind == Kind.RETIRE
