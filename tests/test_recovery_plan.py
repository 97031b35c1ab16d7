"""RingEngine._recover without processes: every node of the ring is gone and no
spare is listed, so the starter is left alone. It takes the whole model when it
fits (and then generates what one device does), and refuses with the numbers
when it does not, which fails the run as before recovery existed."""
from __future__ import annotations

import asyncio
import time

import pytest

from cluster_helpers import build_tiny_ckpt
from mdi.checkpoint import load_model
from mdi.engine import SeqParams
from mdi.engine.link import LinkClosed
from mdi.generate import SamplingConfig, generate
from mdi.ring.starter import rejoin, ring_engine
from mdi.ring.cluster.local_cluster import free_ports
from mdi.ring.cluster.nodes_config import local_nodes_config
from mdi.ring.starter.ring_engine import RingEngine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_ckpt(tmp_path_factory.mktemp("recovery_plan"))


def lost_everything(engine: RingEngine) -> LinkClosed:
    e = LinkClosed("finisher stopped answering", node="finisher")
    e.spec = engine.nodes.finisher
    e.silent = tuple(s.name for s in engine.nodes.secondaries)
    return e


def test_starter_alone_takes_the_whole_model_and_generates_as_one_device(ckpt):
    nodes = local_nodes_config(3, free_ports(6))  # nothing listens there
    engine = RingEngine(nodes, "token", str(ckpt), max_seqs=2)
    assert engine.first.stage.stop == 1 and not engine.first.stage.has_head

    async def main():
        assert await engine._recover(lost_everything(engine))
        await engine.start()
        try:
            seq = engine.submit([1, 2, 3], SeqParams(max_tokens=12, temperature=0.0))
            return [ev.token async for ev in seq.events() if ev.token is not None]
        finally:
            await engine.close()

    got = asyncio.run(main())
    assert engine.link is None and engine.first.stage.has_head
    (rec,) = engine.recoveries
    assert rec["ring"] == ["starter"] and rec["failed"] == nodes.finisher.describe()
    assert rec["plan"]["nodes"] == [{"node": "starter", "layers": [0, 3]}]
    model = load_model(str(ckpt)).model
    assert got == generate(model, [[1, 2, 3]], 12, SamplingConfig(temperature=0.0, top_k=None))[0]


def test_no_room_for_the_whole_model_fails_the_recovery_with_the_numbers(ckpt, monkeypatch, caplog):
    from mdi.ring.plan import placement
    from mdi.ring.plan.limits import DeviceMemory

    monkeypatch.setattr(placement, "free_memory", lambda device: DeviceMemory(0, 1, "test"))
    nodes = local_nodes_config(3, free_ports(6))
    engine = RingEngine(nodes, "token", str(ckpt), max_seqs=2)
    assert not asyncio.run(engine._recover(lost_everything(engine)))
    assert engine.recoveries == []
    assert "the starter alone would need" in caplog.text and "MiB" in caplog.text


def test_a_node_lost_again_soon_after_it_came_back_waits_longer_and_does_not_count(ckpt):
    """The starter alone after every node is lost (nothing listens): the lost nodes are
    absent. One that came back and fails again within the window doubles the answers it
    needs next time (up to REJOIN_MAX_AFTER), and such failures never count towards the
    recoveries that make the engine give up; others do."""
    nodes = local_nodes_config(3, free_ports(6))
    engine = RingEngine(nodes, "token", str(ckpt), max_seqs=2)
    assert asyncio.run(engine._recover(lost_everything(engine)))
    assert sorted(engine.absent) == ["finisher", "intermediate[0]"]
    absent = engine._absent
    assert not absent.lost_again({"finisher"})             # never came back
    absent.rejoined["finisher"] = time.monotonic()
    assert absent.lost_again({"finisher"}) and absent.need["finisher"] == 2 * rejoin.REJOIN_AFTER
    assert not absent.lost_again({"finisher", "intermediate[0]"})  # one of them is new trouble
    for _ in range(10):
        absent.lost_again({"finisher"})
    assert absent.need["finisher"] == rejoin.REJOIN_MAX_AFTER
    assert absent.due({"finisher": 31, "intermediate[0]": 2}) == [nodes.intermediate[0]]
    absent.rejoined["finisher"] -= ring_engine.RECOVERY_WINDOW_S + 1
    assert not absent.lost_again({"finisher"})             # long after: a failure like any


def test_a_reform_queued_as_the_engine_closes_is_dropped(ckpt):
    """Nodes that came back ask for a new ring (a Reform in the inbox) just as the engine
    closes: it is dropped, the sequences end as cancelled, the engine has no failure."""
    from mdi.engine import LocalEngine
    from mdi.engine.link import Reform

    loaded = load_model(str(ckpt))
    engine = LocalEngine(loaded.model, loaded.tokenizer, max_seqs=2)

    async def main():
        await engine.start()
        seq = engine.submit([1, 2, 3], SeqParams(max_tokens=10_000, temperature=0.0))
        events = seq.events()
        await events.__anext__()
        engine._inbox.put_nowait(Reform("nodes answer again"))
        await engine.close()
        return [ev async for ev in events][-1]

    last = asyncio.run(main())
    assert engine.failure is None and last.finish_reason == "cancelled"
