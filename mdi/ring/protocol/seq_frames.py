"""The engine's messages (engine/messages.py) as data-plane frames (docs/wire.md).

Admit -> ADMIT, Retire -> RETIRE, Prefill -> PREFILL (sample = slot), Prefills ->
PREFILLS (a row table of (slot, start, length), the tokens packed),
Decode -> SEQ_DECODE, Tokens <- SEQ_TOKENS, Replay -> REPLAY (a recovery's); a Decode / Tokens of a whole lane
travels as DECODE / TOKENS (no slot table: a fixed batch through the engine
costs the same bytes as before). The lane of a decode is not on the wire:
each side knows which lane a slot belongs to (the lanes were fixed at /init).
"""
from __future__ import annotations

from array import array

import torch

from ...engine.messages import Admit, Decode, Message, Prefill, Prefills, Replay, Retire, Tokens
from ...engine.slots import SlotStage
from .wire import Frame, Kind, WireError, admit_frame


def to_frame(m: Message | Tokens, run_id: int, slots: SlotStage) -> Frame:
    """slots: the sender's slots (for the lanes, which all stages share)."""
    if isinstance(m, Admit):
        return admit_frame(run_id, m.slot, m.temperature, m.top_k, m.top_p, m.seed)
    if isinstance(m, Retire):
        return Frame(Kind.RETIRE, run_id, m.slot)
    if isinstance(m, Prefill):
        return Frame(Kind.PREFILL, run_id, m.slot, m.start, m.x)
    if isinstance(m, Prefills):
        return Frame(Kind.PREFILLS, run_id, m.slots[0], len(m.slots), m.x, m.slots,
                     spans=tuple(zip(m.starts, m.lengths)))
    if isinstance(m, Replay):
        return Frame(Kind.REPLAY, run_id, m.slot, m.start, m.x)
    whole = slots.is_whole_lane(m.slots)
    if isinstance(m, Decode):
        if whole and m.position is not None:
            return Frame(Kind.DECODE, run_id, m.slots[0], m.position, m.x)
        return Frame(Kind.SEQ_DECODE, run_id, m.slots[0], 0, m.x, m.slots)
    if isinstance(m, Tokens):
        # frombuffer: a quarter of torch.tensor's time, which the finisher pays per frame
        # on caches its stage just flushed
        ids = torch.frombuffer(array("q", m.tokens), dtype=torch.int64)
        if whole:
            return Frame(Kind.TOKENS, run_id, m.slots[0], 0, ids)
        return Frame(Kind.SEQ_TOKENS, run_id, m.slots[0], 0, ids, m.slots)
    raise TypeError(f"no frame for {type(m).__name__}")


def to_message(f: Frame, slots: SlotStage) -> Message | Tokens:
    """A received frame (header and slot table already checked) as a message; raises
    WireError for a DECODE / TOKENS that is not a whole lane."""
    if f.kind == Kind.ADMIT:  # its parameters were checked when the frame was received
        s = f.sampling
        assert s is not None and s.seed is not None
        return Admit(f.sample, s.temperature, s.top_k, s.top_p, s.seed)
    if f.kind == Kind.RETIRE:
        return Retire(f.sample)
    assert f.tensor is not None
    if f.kind == Kind.PREFILL:
        return Prefill(f.sample, f.tensor, f.position)
    if f.kind == Kind.PREFILLS:  # the slots' lane and positions: SlotStage.prefills checks them
        return Prefills(slots.lane_of(f.slots[0]), f.slots, tuple(a for a, _ in f.spans),
                        tuple(n for _, n in f.spans), f.tensor)
    if f.kind == Kind.REPLAY:
        return Replay(f.sample, f.tensor, f.position)
    table = f.slots
    if f.kind in (Kind.DECODE, Kind.TOKENS):
        table = tuple(range(f.sample, f.sample + f.tensor.shape[0]))
        if not slots.is_whole_lane(table):
            raise WireError(f"{f.kind.name} for slots {f.sample}..{table[-1]} is not a whole lane")
    lane = slots.lane_of(table[0])
    if f.kind == Kind.DECODE:
        return Decode(lane, table, f.tensor, f.position)
    if f.kind == Kind.SEQ_DECODE:
        return Decode(lane, table, f.tensor)
    if f.kind in (Kind.TOKENS, Kind.SEQ_TOKENS):
        return Tokens(lane, table, tuple(f.tensor.tolist()))
    raise WireError(f"{f.kind.name} is not a message of a sequence run")
