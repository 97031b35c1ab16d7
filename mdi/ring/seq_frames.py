"""The engine's messages (engine/messages.py) as data-plane frames (docs/wire.md).

Admit -> ADMIT, Retire -> RETIRE, Prefill -> PREFILL (sample = slot),
Decode -> SEQ_DECODE, Tokens <- SEQ_TOKENS. The lane of a decode is not on the
wire: each side knows which lane a slot belongs to (the lanes were fixed at /init).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..engine.messages import Admit, Decode, Message, Prefill, Retire, Tokens
from .wire import Frame, Kind, WireError, admit_frame, admit_params


def to_frame(m: Message | Tokens, run_id: int) -> Frame:
    if isinstance(m, Admit):
        return admit_frame(run_id, m.slot, m.temperature, m.top_k, m.top_p, m.seed)
    if isinstance(m, Retire):
        return Frame(Kind.RETIRE, run_id, m.slot)
    if isinstance(m, Prefill):
        return Frame(Kind.PREFILL, run_id, m.slot, 0, m.x)
    if isinstance(m, Decode):
        return Frame(Kind.SEQ_DECODE, run_id, m.slots[0], 0, m.x, m.slots)
    if isinstance(m, Tokens):
        return Frame(Kind.SEQ_TOKENS, run_id, m.slots[0], 0,
                     torch.tensor(m.tokens, dtype=torch.int64), m.slots)
    raise TypeError(f"no frame for {type(m).__name__}")


def to_message(f: Frame, lane_of: Callable[[int], int]) -> Message | Tokens:
    """A received frame (header and slot table already checked) as a message."""
    if f.kind == Kind.ADMIT:
        temperature, top_k, top_p, seed = admit_params(f)
        return Admit(f.sample, temperature, top_k, top_p, seed)
    if f.kind == Kind.RETIRE:
        return Retire(f.sample)
    assert f.tensor is not None
    if f.kind == Kind.PREFILL:
        return Prefill(f.sample, f.tensor)
    if f.kind == Kind.SEQ_DECODE:
        return Decode(lane_of(f.slots[0]), f.slots, f.tensor)
    if f.kind == Kind.SEQ_TOKENS:
        return Tokens(lane_of(f.slots[0]), f.slots, tuple(f.tensor.tolist()))
    raise WireError(f"{f.kind.name} is not a message of a sequence run")
