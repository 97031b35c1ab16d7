"""The starter's replay held back per slot (ring/starter/replay_order.py): each
slot's REPLAY frames go out, in order, just before the first frame naming the slot,
once; what was never asked for is given by rest(); the order in which the spare
then computes them fills each slot's cache before its step."""
from __future__ import annotations

import torch

from mdi.engine.messages import Admit, Decode, Prefill, Replay, Retire
from mdi.ring.starter.replay_order import HeldReplay, slots_of


def replays(slot: int, n: int, chunk: int) -> list[Replay]:
    x = torch.zeros(1, n, 4)
    return [Replay(slot, x[:, a:a + chunk], a) for a in range(0, n, chunk)]


def test_each_slot_replay_goes_just_before_its_first_frame():
    msgs = replays(0, 5, 2) + replays(1, 3, 2) + replays(2, 4, 2) + replays(3, 2, 2)
    held = HeldReplay(msgs)
    assert held
    lane0 = Decode(0, (0, 1), torch.zeros(2, 1, 4), 5)
    out = held.before(lane0)
    assert [(m.slot, m.start) for m in out] == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2)]
    assert held.before(lane0) == []            # once
    assert held.before(Admit(5, 0.0, None, None, 1)) == []  # a slot not replayed
    assert [(m.slot, m.start) for m in held.before(Prefill(3, torch.zeros(1, 1, 4), 2))] \
        == [(3, 0)]
    assert [(m.slot, m.start) for m in held.rest()] == [(2, 0), (2, 2)]
    assert not held and held.rest() == []


def test_slots_of_names_a_lane_step_or_one_slot():
    assert slots_of(Decode(1, (2, 3), torch.zeros(2, 1, 4), 0)) == (2, 3)
    assert slots_of(Retire(4)) == (4,)
    assert slots_of(Replay(1, torch.zeros(1, 1, 4), 0)) == (1,)
