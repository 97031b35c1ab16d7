"""Node capabilities: memory from the model's shape, a timed probe, and the endpoints."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from mdi.model import GPT, GPTConfig, KVCache
from mdi.ring.plan import capability
from mdi.ring.plan.capability import (ProbeCache, Speed, effective_cpus, node_capabilities,
                                 probe_speed, stage_memory)
from mdi.ring.node.control_app import create_control_app
from mdi.ring.node.runtime import NodeRuntime
from mdi.ring.cluster.nodes_config import NodeSpec

TOKEN = "capability-test-token-0123456789"
TINY = GPTConfig(vocab_size=48, block_size=16, n_layer=4, n_head=2, n_embd=32)


def _bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_stage_memory_matches_real_stages(dtype, size):
    mem = stage_memory(TINY, n_samples=3, dtype=dtype)
    block = _bytes(GPT(TINY, 1, 2))  # float32 parameters
    kv = 2 * 3 * TINY.block_size * TINY.n_embd * size  # k and v, 3 rows, block_size positions
    assert mem.block_bytes == block // 4 * size + kv
    assert mem.embed_bytes == (_bytes(GPT(TINY, 0, 1)) - block) // 4 * size
    assert mem.head_bytes == (_bytes(GPT(TINY, 3, 4)) - block) // 4 * size
    real_cache = GPT(TINY, 1, 2).new_cache(3)
    assert kv * 4 // size == real_cache.nbytes()


def test_probe_times_a_block():
    speed = probe_speed(TINY, batch=2, min_time=0.02)
    assert speed.block_ms > 0
    # a block 24x wider is slower (576x the weights: far beyond timing noise on a busy machine)
    wide = GPTConfig(vocab_size=48, block_size=16, n_layer=4, n_head=4, n_embd=768)
    assert probe_speed(wide, batch=2, min_time=0.05).block_ms > speed.block_ms


@pytest.mark.parametrize("first,one,two,last,want", [
    # a block: the second block's time; a frame: the rest of the one-block stage;
    # the end stages' extras: their time past the one-block stage
    (4.0, 1.5, 2.5, 6.0, Speed(1.0, 2.5, 4.5, 0.5)),
    (1.2, 1.5, 2.5, 1.75, Speed(1.0, 0.0, 0.25, 0.5)),  # an end stage below a middle: no extra
    (1.5, 1.5, 1.5, 1.5, Speed(1.5, 0.0, 0.0, 0.0)),    # noise hid the block: all of it per block
    (1.5, 1.5, 3.5, 1.5, Speed(1.5, 0.0, 0.0, 0.0)),    # a "block" over a whole stage: likewise
])
def test_probe_reports_a_block_a_frame_and_the_end_stages_extras(monkeypatch, first, one, two,
                                                                 last, want):
    timed = []

    def fake(stages, batch, device, min_time, context=None):
        timed.append([(s.start, s.stop, s.has_head) for s in stages] + [batch, context])
        return [[first], [one], [two], [last]]

    monkeypatch.setattr(capability, "time_stages", fake)
    assert probe_speed(TINY, batch=2, context=7) == want
    assert timed == [[(0, 1, False), (1, 2, False), (1, 3, False), (3, 4, True), 2, 7]]


def test_probe_takes_differences_within_rounds(monkeypatch):
    # the machine's load doubled during the second round: each stage's time with it,
    # so a block (the two-block stage past the one-block one) is read within a round
    rounds = {"first": [2.0, 4.0, 2.0, 2.0], "one": [1.5, 3.0, 1.5, 1.5],
              "two": [2.5, 5.0, 2.5, 2.5], "last": [2.0, 4.0, 2.0, 2.0]}
    monkeypatch.setattr(capability, "time_stages", lambda *a, **k: list(rounds.values()))
    assert probe_speed(TINY, batch=2) == Speed(1.0, 0.5, 0.5, 0.5)


def test_probe_cache_keys_on_shape_batch_dtype(monkeypatch):
    calls = []

    def fake(config, batch, dtype, device, min_time, context=None):
        calls.append((config.n_embd, batch, dtype, context))
        return Speed(1.0, 0.1, 0.2)

    monkeypatch.setattr("mdi.ring.plan.capability.probe_speed", fake)
    cache = ProbeCache()
    assert cache.get(TINY, 2, "float32", "cpu") == (Speed(1.0, 0.1, 0.2), False)
    assert cache.get(TINY, 2, "float32", "cpu")[1] is True
    cache.get(TINY, 3, "float32", "cpu")
    cache.get(TINY, 2, "bfloat16", "cpu")
    cache.get(TINY, 2, "float32", "cpu", 10)
    assert cache.get(TINY, 2, "float32", "cpu", 10)[1] is True
    assert calls == [(32, 2, "float32", None), (32, 3, "float32", None),
                     (32, 2, "bfloat16", None), (32, 2, "float32", 10)]


def test_a_fresh_probe_times_again_briefly_and_is_kept(monkeypatch):
    times = []

    def fake(config, batch, dtype, device, min_time, context=None):
        times.append(min_time)
        return Speed(float(len(times)), 0.1, 0.2)

    monkeypatch.setattr("mdi.ring.plan.capability.probe_speed", fake)
    cache = ProbeCache()
    assert cache.get(TINY, 2, "float32", "cpu") == (Speed(1.0, 0.1, 0.2), False)
    assert cache.get(TINY, 2, "float32", "cpu", None, True) == (Speed(2.0, 0.1, 0.2), False)
    assert cache.get(TINY, 2, "float32", "cpu") == (Speed(2.0, 0.1, 0.2), True)  # kept
    assert times == [capability.MIN_TIME_S, capability.FRESH_MIN_TIME_S]


def test_a_probe_times_blocks_at_the_context_it_is_given(monkeypatch):
    seen = []
    real = capability.GPT.forward

    def forward(self, idx, pos, cache=None, **kw):
        seen.append(int(pos.max()))
        return real(self, idx, pos, cache, **kw)

    monkeypatch.setattr(capability.GPT, "forward", forward)
    probe_speed(TINY, batch=2, min_time=0.0, context=5)
    assert 5 <= min(seen) and max(seen) < TINY.block_size  # from 5 on, wrapped within the cache
    seen.clear()
    probe_speed(TINY, batch=2, min_time=0.0)
    assert min(seen) == TINY.block_size // 4


def test_the_head_is_timed_with_the_sampling_of_every_row(monkeypatch):
    from mdi.engine import slots
    rows = []
    real = slots.sample_token

    def counting(logits, cfg, generator):
        rows.append((tuple(logits.shape), cfg.top_k, cfg.temperature))
        return real(logits, cfg, generator)

    monkeypatch.setattr(slots, "sample_token", counting)
    probe_speed(TINY, batch=3, min_time=0.0)
    # only the last stage samples, each of the 3 rows of every frame, at the CLI's defaults
    assert rows and len(rows) % 3 == 0 and set(rows) == {((TINY.vocab_size,), 200, 0.8)}


def test_frames_take_the_data_plane_path_and_wrap_within_the_cache(monkeypatch):
    from mdi.ring.plan import frame_probe
    sent, received = [], []
    real_send, real_recv = frame_probe.send_frame, frame_probe.recv_frame

    def send(sock, f):
        sent.append(f.kind.name)
        return real_send(sock, f)

    def recv(sock, limits, header):
        f = real_recv(sock, limits, header)
        received.append(f.kind.name)
        return f

    monkeypatch.setattr(frame_probe, "send_frame", send)
    monkeypatch.setattr(frame_probe, "recv_frame", recv)
    stages = [GPT(TINY, 0, 1), GPT(TINY, 1, 3), GPT(TINY, 3, 4)]
    # positions from near the cache's end: the slots wrap back instead of overflowing
    times = frame_probe.time_stages(stages, 2, "cpu", 0.0, context=TINY.block_size - 3)
    assert len(times) == 3 and all(len(t) == frame_probe.MIN_WINDOWS for t in times)
    assert all(x > 0 for t in times for x in t)
    # the starter's stage is fed tokens, the others activations; each answers with
    # what a node sends on (activations, or the finisher's tokens)
    assert set(sent) == set(received) == {"TOKENS", "SEQ_DECODE"}
    assert sent.count("TOKENS") >= 2 * (frame_probe.WARMUP_FRAMES + frame_probe.MIN_WINDOWS)


def test_capabilities_report_memory_and_cap():
    caps = node_capabilities("cpu")
    assert caps["memory_total_bytes"] >= caps["memory_free_bytes"] > 0
    assert caps["budget_bytes"] == caps["memory_free_bytes"] and caps["max_memory_bytes"] is None
    assert node_capabilities("cpu", max_memory=2**20)["budget_bytes"] == 2**20
    assert 0 < caps["cpus"] == effective_cpus() <= caps["cpu_count"]


def test_endpoints_need_the_token_and_cache_the_probe():
    spec = NodeSpec("finisher", 0, "127.0.0.1", 1, 2, 3)
    rt = NodeRuntime(spec, TOKEN)
    rt.probes.min_time = 0.02
    with TestClient(create_control_app(rt)) as client:
        assert client.get("/capabilities").status_code == 401
        assert client.post("/probe", json={"model": TINY.to_dict(), "batch": 1}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        caps = client.get("/capabilities", headers=auth).json()
        assert caps["device"] == "cpu" and caps["budget_bytes"] > 0
        body = {"model": TINY.to_dict(), "batch": 2, "dtype": "float32"}
        first = client.post("/probe", json=body, headers=auth).json()
        assert first["block_ms"] > 0 and first["cached"] is False
        again = client.post("/probe", json=body, headers=auth).json()
        assert again["cached"] is True and again["block_ms"] == first["block_ms"]
        fresh = client.post("/probe", json={**body, "fresh": True}, headers=auth).json()
        assert fresh["cached"] is False  # a live re-plan: timed again
        short = client.post("/probe", json={**body, "context": 3}, headers=auth).json()
        assert short["cached"] is False and short["context"] == 3
        r = client.post("/probe", json={**body, "context": 0}, headers=auth)
        assert r.status_code == 422 and "context" in r.json()["detail"]
        r = client.post("/probe", json={**body, "batch": 0}, headers=auth)
        assert r.status_code == 422 and "batch" in r.json()["detail"]
        r = client.post("/probe", json={**body, "model": {**TINY.to_dict(), "n_head": 3}},
                        headers=auth)
        assert r.status_code == 400 and r.json()["detail"].startswith("model:")
    rt.executor.shutdown()


def test_a_running_node_counts_its_paged_caches_unwritten_pages_once():
    """budget = free memory + what the current run holds: a paged cache's pages no row
    wrote are in free memory already, so they are not the run's held bytes too."""
    rt = NodeRuntime(NodeSpec("finisher", 0, "127.0.0.1", 1, 2, 3), TOKEN)
    cache = KVCache(2, 2, 2, 4096, 64)              # 8 MB planned, nothing written
    weights = 5 << 20
    rt.run = SimpleNamespace(mem_bytes=weights + cache.nbytes(), slots=SimpleNamespace(caches=[cache]),
                             incoming={})
    assert rt._held() == weights
    cache.rows(0, 1).update(0, torch.arange(4096)[None], torch.ones(2, 1, 2, 4096, 64), start=0)
    assert rt._held() == weights + 2 * 2 * 4096 * 64 * 4   # row 0 of layer 0, k and v
    rt.run = SimpleNamespace(mem_bytes=weights, slots=None, incoming={})  # a fixed batch
    assert rt._held() == weights
    rt.run.incoming = {(2, 4): SimpleNamespace(nbytes=7)}   # a move's layers, arrived
    assert rt._held() == weights + 7
    rt.run = None
    assert rt._held() == 0
