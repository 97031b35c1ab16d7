"""The engine over a real ring (node processes on loopback): continuous batching
with a KV slot per sequence on every node. Slow: select with `-m slow`."""
from __future__ import annotations

import asyncio

import pytest

from mdi.checkpoint import load_model
from mdi.engine import EngineFailure, SeqParams
from mdi.generate import SamplingConfig, generate
from mdi.generate.sampling import sample_seed
from mdi.ring.cluster.local_cluster import LocalCluster
from mdi.ring.starter.ring_engine import RingEngine
from mdi.ring.starter.options import RunOptions
from test_engine import collect

from cluster_helpers import build_tiny_ckpt

pytestmark = pytest.mark.slow
GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(2, threads=1, node_timeout=30.0) as c:
        yield c


def test_ring_8_concurrent_sequences_equal_single_device(ckpt, cluster):
    """2 nodes, 8 sequences of different prompts and lengths (some past the context
    limit of 32) admitted at different times into 2 lanes of 3 slots: each greedy
    text equals the prompt run alone on one device. Then a second run on the same
    nodes: sampled sequences with their own seeds, and a stop string."""
    loaded = load_model(ckpt)
    model, info = loaded.model, loaded.checkpoint
    tok = info.tokenizer()
    prompts = [tok.encode(p) for p in ["First", "Be", "All: Spe", "hear me", "w", "Citizen:\n",
                                       "proceed any", "F"]]
    lengths = [12, 40, 7, 25, 3, 18, 33, 9]

    async def run_greedy():
        engine = RingEngine(cluster.nodes, cluster.token, str(ckpt), max_seqs=6,
                            opts=RunOptions(timeout=30.0))
        await engine.start()
        try:
            seqs = []
            for i, (p, n) in enumerate(zip(prompts, lengths)):
                seqs.append(engine.submit(p, SeqParams(max_tokens=n, temperature=0.0)))
                if i % 3 == 2:
                    await asyncio.sleep(0.05)
            out = await asyncio.gather(*(collect(s) for s in seqs))
            return out, engine.max_in_flight
        finally:
            await engine.close()

    results, in_flight = asyncio.run(run_greedy())
    assert in_flight == 2
    for p, n, (toks, text, reason) in zip(prompts, lengths, results):
        want = generate(model, [p], n, GREEDY)[0]
        assert toks == want and text == tok.decode(want) and reason == "length"

    sampled = [SamplingConfig(temperature=0.9, top_k=None, seed=s, top_p=q)
               for s, q in [(1, None), (2, 0.9), (3, None)]]

    async def run_sampled():
        engine = RingEngine(cluster.nodes, cluster.token, str(ckpt), max_seqs=3,
                            opts=RunOptions(timeout=30.0))
        await engine.start()
        try:
            seqs = [engine.submit(prompts[i], SeqParams(max_tokens=20, temperature=c.temperature,
                                                        top_p=c.top_p, seed=sample_seed(c.seed, 0)))
                    for i, c in enumerate(sampled)]
            ref = tok.decode(generate(model, [prompts[3]], 20, GREEDY)[0])
            stop = ref[5:7]
            seqs.append(engine.submit(prompts[3], SeqParams(max_tokens=20, temperature=0.0,
                                                            stop=(stop,))))
            out = await asyncio.gather(*(collect(s) for s in seqs))
            return out, ref[:ref.index(stop)]
        finally:
            await engine.close()

    results, want_text = asyncio.run(run_sampled())
    for i, c in enumerate(sampled):
        assert results[i][0] == generate(model, [prompts[i]], 20, c)[0]
    assert results[3][1] == want_text and results[3][2] == "stop"


def test_the_starter_loads_and_computes_its_stage_on_one_thread(ckpt, cluster, monkeypatch):
    """The starter's stage 0 is loaded, given its caches and computed (prefill chunks
    and decodes) on one thread that is not the event loop's (engine/compute_thread.py):
    libgomp spins between parallel regions only while one thread runs them."""
    import threading

    from mdi.ring.starter import ring_engine
    from test_compute_thread import threads_seen

    model = load_model(ckpt).model
    tok = load_model(ckpt).checkpoint.tokenizer()
    prompts = [tok.encode(p) for p in ["First Citizen:", "Be", "hear me, hear me"]]
    seen = threads_seen(monkeypatch, ring_engine, "first_stage")
    monkeypatch.setattr(ring_engine, "has_teams", lambda: True)  # as with --threads 2

    async def run():
        engine = RingEngine(cluster.nodes, cluster.token, str(ckpt), max_seqs=3,
                            opts=RunOptions(timeout=30.0, prefill_chunk=4))
        await engine.start()
        try:
            seqs = [engine.submit(p, SeqParams(max_tokens=10, temperature=0.0)) for p in prompts]
            return await asyncio.gather(*(collect(s) for s in seqs)), threading.get_ident()
        finally:
            await engine.close()

    results, loop = asyncio.run(run())
    assert [toks for toks, _, _ in results] == [generate(model, [p], 10, GREEDY)[0] for p in prompts]
    (compute,) = seen["load"]
    assert seen == {"load": {compute}, "caches": {compute}, "step": {compute}}
    assert compute != loop


def test_ring_failure_reaches_the_sequences_and_names_the_node(ckpt):
    with LocalCluster(2, threads=1, node_timeout=5.0) as c:
        async def fail():
            engine = RingEngine(c.nodes, c.token, str(ckpt), max_seqs=2,
                                opts=RunOptions(timeout=5.0, recover=False))
            await engine.start()
            try:
                seq = engine.submit([1, 2], SeqParams(max_tokens=10_000, temperature=0.0))
                got = 0
                with pytest.raises(EngineFailure) as e:
                    async for ev in seq.events():
                        got += 1
                        if got == 5:
                            c.procs[0].kill()
                return e.value
            finally:
                await engine.close()

        err = asyncio.run(fail())
        print(err, "|", err.node)
        assert err.node is not None and "finisher" in err.node
        assert "stopped answering" in str(err)
