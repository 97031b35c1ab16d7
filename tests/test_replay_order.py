"""The starter's replay held back per slot (ring/starter/replay_order.py): each
slot's REPLAY frames go out, in order, just before the first frame naming the slot,
once; what was never asked for is given by rest(); the order in which the spare
then computes them fills each slot's cache before its step."""
from __future__ import annotations

import pytest
import torch

from mdi.engine.link import LinkClosed
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


def test_the_link_buffers_a_slot_replay_before_its_frame_without_waiting():
    """TcpLink.send: the held frames, then the message, on the writer in that order;
    the buffer's high-water mark raised by the held bytes, so that no wait is due."""
    import asyncio
    from types import SimpleNamespace

    from mdi.engine.slots import SlotStage
    from mdi.model import GPTConfig
    from mdi.ring.protocol.wire import DType, Limits, decode_frame
    from mdi.ring.starter.tcp_link import TcpLink

    from conftest import scaled_random_model

    class Transport:
        def __init__(self):
            self.limits, self.buffered, self.closing = (16, 64), 0, False

        def get_write_buffer_limits(self):
            return self.limits

        def set_write_buffer_limits(self, high, low):
            self.limits = (low, high)

        def get_write_buffer_size(self):
            return 0

        def is_closing(self):
            return self.closing

    class Writer:
        def __init__(self):
            self.transport, self.data = Transport(), []

        def write(self, d):
            self.data.append(bytes(d))

        async def drain(self):
            pass

    stage = scaled_random_model(GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=1,
                                          n_embd=4))
    slots = SlotStage(stage, [2, 2])
    link = TcpLink.__new__(TcpLink)
    link.limits = Limits(9, 4, 32, 4, DType.FLOAT32, 2, sequences=True)
    link.slots, link.writer, link.failed, link.outstanding = slots, Writer(), None, 0
    link.hop = SimpleNamespace(decode_bytes=0, decode_tokens=0, prefill_bytes=0)
    link.timeout = 1.0
    link.client = SimpleNamespace(nodes=SimpleNamespace(ring=[None, SimpleNamespace(
        name="spare[0]", addr="127.0.0.1", port_in=1, describe=lambda: "spare[0]")]))
    link.hold_replay(replays(0, 3, 2) + replays(2, 2, 2))
    asyncio.run(link.send(Decode(0, (0, 1), torch.zeros(2, 1, 4), 3)))
    kinds = [decode_frame(d, link.limits) for d in link.writer.data]
    assert [(f.kind.name, f.sample, f.position) for f in kinds] == \
        [("REPLAY", 0, 0), ("REPLAY", 0, 2), ("DECODE", 0, 3)]
    held = sum(map(len, link.writer.data[:2]))
    assert link.writer.transport.limits == (16, 64 + held)
    asyncio.run(link.send(Retire(2)))  # slot 2's replay, then its frame
    assert [decode_frame(d, link.limits).kind.name for d in link.writer.data[3:]] == \
        ["REPLAY", "RETIRE"]
    assert not link.replay

    # the first node killed as a frame goes: its link is closing (uvloop then raises
    # RuntimeError on a write), the send fails as the link's failure, naming the node
    async def diagnose(http, run_id):
        return None, None, ()
    link.client.diagnose = diagnose
    link.client.opts = SimpleNamespace(recover=True, recovery="replay")
    link.http, link.writer.transport.closing = None, True
    link.hold_replay(replays(0, 3, 2))
    with pytest.raises(LinkClosed, match="spare.0. at 127.0.0.1:1 failed: the link is closed"):
        asyncio.run(link.send(Decode(0, (0, 1), torch.zeros(2, 1, 4), 3)))
    assert len(link.writer.data) == 5  # nothing more written
