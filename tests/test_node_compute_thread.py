"""A node's one compute thread (ring/node/compute_thread.py): its stage is loaded and
its frames computed by the same thread, and jobs submitted while a run's data loop
serves frames run between them, on that thread, in order."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import torch

from cluster_helpers import TOKEN, finisher_and_fake_starter
from mdi.ring.node import chunk_load, data_plane
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

    def on_frame(sock: socket.socket, _t0: float) -> bool:
        data = sock.recv(1)
        seen.append(("frame", threading.get_ident()))
        if data == b"j":  # a job submitted while the loop serves: it waits for this frame
            job = ct.submit(lambda: seen.append(("job", threading.get_ident())))
            served.set()
            assert not job.done()
        return data != b"q"

    link = DataLink(down, 5.0, "test", on_frame=on_frame, on_end=ended.append, name="t",
                    runner=ct)
    try:
        link.attach(up)
        up_peer.sendall(b"j")
        assert served.wait(5)
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
