"""One thread runs a process's torch work (engine/compute_thread.py): the ComputeThread
itself, and the ring's starter, whose stage is loaded, re-loaded and computed there and
never on the event loop. (mdi chat: test_chat.py; mdi serve: test_serve_engine.py; the
starter on a ring of nodes: test_engine_ring.py.)"""
from __future__ import annotations

import asyncio
import threading

import pytest

from cluster_helpers import build_tiny_ckpt
from mdi.checkpoint import load_model
from mdi.engine import SeqParams
from mdi.engine.compute_thread import ComputeThread
from mdi.generate import SamplingConfig, generate
from mdi.ring.cluster.local_cluster import free_ports
from mdi.ring.cluster.nodes_config import local_nodes_config
from test_engine import collect

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)


def test_call_and_run_use_the_same_thread_which_is_not_the_caller_s():
    with ComputeThread("t") as compute:
        where = compute.ident
        assert compute.call(threading.get_ident) == where != threading.get_ident()
        assert compute.call(lambda a, b=0: a + b, 2, b=3) == 5

        async def main():
            return await compute.run(threading.get_ident), threading.get_ident()
        ran, loop = asyncio.run(main())
        assert ran == where != loop
    with pytest.raises(RuntimeError):  # closed: joined, takes no more work
        compute.call(threading.get_ident)


def threads_seen(monkeypatch, module, name: str) -> dict[str, set[int]]:
    """Record the threads that call `name` of `module` (a stage's loader), build a
    SlotStage (the KV caches) and compute a step (SlotStage.first_step)."""
    from mdi.engine import slots

    seen: dict[str, set[int]] = {"load": set(), "caches": set(), "step": set()}

    def spy(what, f):
        def wrapped(*a, **k):
            seen[what].add(threading.get_ident())
            return f(*a, **k)
        return wrapped
    monkeypatch.setattr(module, name, spy("load", getattr(module, name)))
    monkeypatch.setattr(slots.SlotStage, "__init__", spy("caches", slots.SlotStage.__init__))
    monkeypatch.setattr(slots.SlotStage, "first_step", spy("step", slots.SlotStage.first_step))
    return seen


@pytest.mark.parametrize("teams", [True, False], ids=["threads", "one-thread"])
def test_the_starter_alone_loads_and_computes_on_one_thread_off_the_loop(tmp_path, monkeypatch,
                                                                         teams):
    """A ring of one node (the starter alone, as after every node is lost): the whole
    model is the starter's stage, loaded, given its caches and computed (prefill
    chunks, decodes) on the engine's compute thread; greedy texts as one device's.
    With one torch thread (no OpenMP teams) a short decode may run on the loop."""
    from mdi.ring.starter import ring_engine

    monkeypatch.setattr(ring_engine, "has_teams", lambda: teams)

    ckpt = build_tiny_ckpt(tmp_path / "tiny")
    loaded = load_model(ckpt)
    tok = loaded.checkpoint.tokenizer()
    prompts = [tok.encode(p) for p in ["First Citizen:", "Be", "hear me"]]
    want = [generate(loaded.model, [p], 9, GREEDY)[0] for p in prompts]
    seen = threads_seen(monkeypatch, ring_engine, "first_stage")

    async def main():
        engine = ring_engine.RingEngine(local_nodes_config(1, free_ports(2)), "", str(ckpt),
                                        max_seqs=2)
        engine.prefill_chunk = 4
        await engine.start()
        try:
            seqs = [engine.submit(p, SeqParams(max_tokens=9, temperature=0.0)) for p in prompts]
            return await asyncio.gather(*(collect(s) for s in seqs)), threading.get_ident()
        finally:
            await engine.close()
    got, loop = asyncio.run(main())
    assert [toks for toks, _, _ in got] == want
    (compute,) = seen["load"]
    assert compute != loop and seen["caches"] == {compute}
    assert seen["step"] == {compute} if teams else seen["step"] <= {compute, loop}
