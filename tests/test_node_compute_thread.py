"""A node's one compute thread (ring/node/compute_thread.py): its stage is loaded and
its frames computed by the same thread, and jobs submitted while a run's data loop
serves frames run between them, on that thread, in order; a job queued behind a
frame its sender cut short runs once the node's timeout gives up on that frame."""
from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
import torch

from cluster_helpers import TOKEN, finisher_and_fake_starter
from mdi.ring.node import chunk_load, data_plane
from mdi.ring.node.control_app import create_control_app
from mdi.ring.node.compute_thread import NodeComputeThread
from mdi.ring.node.data_link import DataLink
from mdi.ring.protocol.auth import answer
from mdi.ring.protocol.wire import Frame, Kind, read_frame

torch.set_num_threads(1)


def test_jobs_run_in_order_on_one_thread_and_errors_reach_the_caller():
    ct = NodeComputeThread("test-compute")
    try:
        ids = [ct.submit(threading.get_ident).result(5) for _ in range(3)]
        assert len(set(ids)) == 1 and ids[0] == ct.ident != threading.get_ident()
        order: list[int] = []
        futures = [ct.submit(order.append, i) for i in range(20)]
        for f in futures:
            f.result(5)
        assert order == list(range(20))
        with pytest.raises(ZeroDivisionError):
            ct.submit(lambda: 1 / 0).result(5)
        assert ct.submit(lambda: 42).result(5) == 42  # the thread survives a failed job
    finally:
        ct.shutdown()
    with pytest.raises(RuntimeError):
        ct.submit(lambda: None)


def test_a_data_loop_runs_on_the_compute_thread_and_jobs_between_its_frames():
    ct = NodeComputeThread("test-compute")
    down, down_peer = socket.socketpair()
    up, up_peer = socket.socketpair()
    seen: list[tuple[str, int]] = []
    served = threading.Event()
    ended: list = []
    jobs: list = []

    def on_frame(sock: socket.socket, _t0: float) -> bool:
        data = sock.recv(1)
        seen.append(("frame", threading.get_ident()))
        if data == b"j":  # a job submitted while the loop serves: it waits for this frame
            job = ct.submit(lambda: seen.append(("job", threading.get_ident())))
            jobs.append(job)
            served.set()
            assert not job.done()
        return data != b"q"

    link = DataLink(down, 5.0, "test", on_frame=on_frame, on_end=ended.append, name="t",
                    runner=ct)
    try:
        link.attach(up)
        up_peer.sendall(b"j")
        assert served.wait(5)
        jobs[0].result(5)  # (the next frame only then: one that is already waiting goes first)
        up_peer.sendall(b"q")
        link.join(5)
        assert not link.alive() and ended == [None]
        assert [what for what, _ in seen] == ["frame", "job", "frame"]
        assert {ident for _, ident in seen} == {ct.ident}
        assert ct.submit(threading.get_ident).result(5) == ct.ident  # serving jobs again
    finally:
        link.close()
        ct.shutdown()
        down_peer.close()
        up_peer.close()


def test_a_nodes_stage_is_loaded_and_computed_by_one_thread(tiny_ckpt, monkeypatch):
    """Loading (configure_stage, which packs the weights) and the frames' compute of a
    node run on its compute thread: one thread of the process runs all its OpenMP
    regions, so libgomp keeps spinning between them."""
    loaded: list[int] = []
    computed: list[int] = []
    configure, compute = chunk_load.configure_stage, data_plane.NodeRun.compute

    def configure_here(*args, **kwargs):
        loaded.append(threading.get_ident())
        return configure(*args, **kwargs)

    def compute_here(self, frame):
        computed.append(threading.get_ident())
        return compute(self, frame)

    monkeypatch.setattr(chunk_load, "configure_stage", configure_here)
    monkeypatch.setattr(data_plane.NodeRun, "compute", compute_here)

    async def scenario() -> None:
        async with finisher_and_fake_starter(tiny_ckpt) as (rt, cfg, config, start_run):
            back_r, back_w = await start_run(9)
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.finisher.port_in)
            await answer(reader, writer, TOKEN, 9, 3.0)
            for _ in range(2):
                writer.write(Frame(Kind.CONTEXT, 9, 0, 0, torch.zeros(1, 3, config.n_embd)).encode())
                tok = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
                assert tok.kind == Kind.TOKENS
            assert loaded and len(computed) == 2
            assert set(loaded) == set(computed) == {rt.executor.ident}
            writer.close()
            back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_job_queued_behind_a_frame_cut_short_runs_once_the_node_gives_up_on_it(
        tiny_ckpt, monkeypatch):
    """A previous node that sends half a frame and stalls (frozen, or hostile with the
    token) held the data loop, and every job queued on the compute thread behind it,
    for good: the read inside a frame now fails within the node's --timeout, the
    run is dropped naming why, the queued job runs, and the node serves the next
    run with the same tokens as before."""
    reads: list[int] = []
    second = threading.Event()  # the data loop has begun to read the second frame
    real_recv = data_plane.recv_frame

    def recv(sock, limits, header):
        reads.append(1)
        if len(reads) == 2:
            second.set()
        return real_recv(sock, limits, header)

    monkeypatch.setattr(data_plane, "recv_frame", recv)

    async def scenario() -> None:
        async with finisher_and_fake_starter(tiny_ckpt) as (rt, cfg, config, start_run):
            x = torch.randn(1, 3, config.n_embd, generator=torch.Generator().manual_seed(5))
            back_r, back_w = await start_run(9)
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.finisher.port_in)
            await answer(reader, writer, TOKEN, 9, 3.0)
            writer.write(Frame(Kind.CONTEXT, 9, 0, 0, x).encode())
            first = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
            data = Frame(Kind.CONTEXT, 9, 0, 0, x).encode()
            writer.write(data[:len(data) // 2])  # the header and part of the payload: no more
            await writer.drain()
            assert await asyncio.to_thread(second.wait, 5)  # the loop is inside that frame
            job = asyncio.get_running_loop().run_in_executor(rt.executor, threading.get_ident)
            transport = httpx.ASGITransport(app=create_control_app(rt))
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
                assert (await http.get("/health")).json()["state"] == "running"
            # done within the node's timeout (2 s) of the stall; this bound only keeps
            # a regression from hanging the suite
            assert await asyncio.wait_for(job, 10 * rt.timeout) == rt.executor.ident
            assert rt.run is None
            assert rt.last_stats["run_id"] == 9
            assert rt.last_stats["reason"].startswith("the previous node stalled")
            assert "stopped inside a frame" in rt.last_stats["reason"]
            assert await reader.read() == b""  # the stalled link was closed
            writer.close()
            back_w.close()

            back_r, back_w = await start_run(10)  # the node serves on
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.finisher.port_in)
            await answer(reader, writer, TOKEN, 10, 3.0)
            writer.write(Frame(Kind.CONTEXT, 10, 0, 0, x).encode())
            again = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
            assert again.kind == first.kind == Kind.TOKENS
            assert again.tensor.tolist() == first.tensor.tolist()
            writer.close()
            back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
