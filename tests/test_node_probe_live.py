"""POST /probe on a node that serves a run's ring: refused (409, naming why), since
the probe would run on the node's compute thread between two of the run's frames
and pause the ring for its whole length; the run goes on untouched. A speed the
node has cached is answered all the same (no compute), and once the run is over
the probe is served again. The starter asks a busy node again for a moment, then
reports the node's words."""
from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
import torch

from cluster_helpers import TOKEN, finisher_and_fake_starter
from mdi.ring.cluster.nodes_config import NodeSpec
from mdi.ring.node.control_app import create_control_app
from mdi.ring.plan import placement
from mdi.ring.plan.capability import Speed
from mdi.ring.protocol.auth import answer
from mdi.ring.protocol.wire import Frame, Kind, read_frame

torch.set_num_threads(1)


@contextlib.asynccontextmanager
async def control(rt):
    """The node's control app, over HTTP in this process."""
    transport = httpx.ASGITransport(app=create_control_app(rt))
    async with httpx.AsyncClient(transport=transport, base_url="http://node",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http


def inputs(config, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 2 + i, config.n_embd, generator=g) for i in range(n)]


async def upstream(cfg, run_id: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", cfg.finisher.port_in)
    await answer(reader, writer, TOKEN, run_id, 3.0)
    return reader, writer


async def step(rt, writer, back_r, run_id: int, x: torch.Tensor) -> list:
    """One CONTEXT frame through the finisher: the tokens it sends back."""
    limits = rt.run.limits
    writer.write(Frame(Kind.CONTEXT, run_id, 0, 0, x).encode())
    f = await asyncio.wait_for(read_frame(back_r, limits), 10)
    assert f.kind == Kind.TOKENS
    return f.tensor.tolist()


async def finish(rt, writer, back_r, run_id: int) -> None:
    limits = rt.run.limits
    writer.write(Frame(Kind.STOP, run_id).encode())
    f = await asyncio.wait_for(read_frame(back_r, limits), 10)
    assert f.kind == Kind.STOP


def test_a_probe_during_a_live_run_is_refused_and_the_run_goes_on(tiny_ckpt):
    async def scenario() -> None:
        async with finisher_and_fake_starter(tiny_ckpt) as (rt, cfg, config, start_run):
            rt.probes.min_time = 0.02
            xs = inputs(config)
            body = {"model": config.to_dict(), "batch": 1, "dtype": "float32"}
            timed: list = []
            real_get = rt.probes.get
            rt.probes.get = lambda *a: timed.append(a) or real_get(*a)

            # the reference: the same frames, no probe
            back_r, back_w = await start_run(1)
            _, writer = await upstream(cfg, 1)
            expected = [await step(rt, writer, back_r, 1, x) for x in xs]
            await finish(rt, writer, back_r, 1)
            writer.close()
            back_w.close()

            back_r, back_w = await start_run(2)
            async with control(rt) as http:
                # ready (connected to the next node, its loop serving): refused already
                r = await http.post("/probe", json=body)
                assert r.status_code == 409, r.text
                assert "serving a live run (run 2)" in r.json()["detail"]
                assert "probe it before the run starts" in r.json()["detail"]
                _, writer = await upstream(cfg, 2)
                got = [await step(rt, writer, back_r, 2, xs[0])]
                for fresh in (False, True):
                    r = await http.post("/probe", json={**body, "fresh": fresh})
                    assert r.status_code == 409 and "live run" in r.json()["detail"], r.text
                    assert (await http.get("/health")).json()["state"] == "running"
                got += [await step(rt, writer, back_r, 2, x) for x in xs[1:]]
                assert timed == []  # nothing was timed on the compute thread
                await finish(rt, writer, back_r, 2)
                assert got == expected
                await asyncio.wait_for(wait_idle(rt), 10)
                assert rt.runs_completed == 2 and rt.last_stats["reason"] == "run complete"

                r = await http.post("/probe", json=body)  # the run is over: served
                assert r.status_code == 200 and r.json()["cached"] is False, r.text
                speed = r.json()["block_ms"]
                assert len(timed) == 1
                writer.close()
                back_w.close()

                # a cached speed is answered during a run (no compute), a fresh one is not
                back_r, back_w = await start_run(3)
                _, writer = await upstream(cfg, 3)
                assert await step(rt, writer, back_r, 3, xs[0]) == expected[0]
                r = await http.post("/probe", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["cached"] is True and r.json()["block_ms"] == speed
                r = await http.post("/probe", json={**body, "fresh": True})
                assert r.status_code == 409
                assert len(timed) == 1
                assert await step(rt, writer, back_r, 3, xs[1]) == expected[1]
                writer.close()
                back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def wait_idle(rt) -> None:
    """Until the node dropped its completed run (the data loop reports it on its way out)."""
    while rt.run is not None:
        await asyncio.sleep(0.01)


class FakeNode:
    """A node's POST /probe answers, in turn (httpx.MockTransport)."""

    def __init__(self, answers: list[tuple[int, dict]]) -> None:
        self.answers = answers
        self.asked = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        status, body = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return httpx.Response(status, json=body)


SPEED = {"block_ms": 1.5, "embed_ms": 0.1, "head_ms": 0.2, "frame_ms": 0.3}
BUSY = {"detail": "node is serving a live run (run 7); probe it before the run starts"}


@pytest.mark.parametrize("busy_answers,ok", [(2, True), (placement.BUSY_RETRIES + 1, False)])
def test_the_starter_asks_a_busy_node_again_then_names_it(monkeypatch, busy_answers, ok):
    monkeypatch.setattr(placement, "BUSY_DELAY_S", 0.0)
    node = FakeNode([(409, BUSY)] * busy_answers + [(200, SPEED)])
    spec = NodeSpec("finisher", 0, "127.0.0.1", 1, 2, 3)

    async def probe():
        async with httpx.AsyncClient(transport=httpx.MockTransport(node)) as http:
            return await placement._probe(http, spec, {"batch": 1})

    if ok:
        assert asyncio.run(probe()) == Speed(1.5, 0.1, 0.2, frame_ms=0.3)
        assert node.asked == busy_answers + 1
    else:
        with pytest.raises(RuntimeError, match=r"refused /probe \(HTTP 409\).*serving a live run"):
            asyncio.run(probe())
        assert node.asked == placement.BUSY_RETRIES + 1
