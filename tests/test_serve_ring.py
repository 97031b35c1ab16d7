"""The API server over a ring of real node processes: 32 concurrent greedy streams
equal the single-device engine's texts; a node that dies is replaced (the starter alone
here), started again and taken back into the ring, and later requests are served the same;
a node killed while 8 streams decode fails none of them (a spare replays its layers)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import scaled_random_model
from mdi.checkpoint.format import save_checkpoint
from mdi.model import GPTConfig
from mdi.serve import BackgroundServer, ServeConfig, create_app
from mdi.serve.backend import BackendOptions, open_backend

pytestmark = pytest.mark.slow
MODEL = "tiny-random"
PROMPTS = [f"Prompt {'abcdefgh'[i % 8]}{'ijklmnop'[i // 8]}:" for i in range(32)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, char_tokenizer):
    config = GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=4, n_head=2, n_embd=32)
    return save_checkpoint(tmp_path_factory.mktemp("ring_ckpt"), scaled_random_model(config, seed=5),
                           char_tokenizer, {"note": "random weights for the serve ring tests"})


def greedy(srv, prompts: list[str], concurrent: bool, max_tokens: int = 16) -> list[str]:
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def one(p: str) -> str:
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0, stream=True)
            if ch.choices)

    if not concurrent:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_ring_streams_equal_single_device_and_survive_a_dead_node(ckpt):
    with open_backend(BackendOptions(ckpt=str(ckpt), max_seqs=8)) as local:
        with BackgroundServer(create_app(local.factory, local.tokenizer, ServeConfig(MODEL))) as srv:
            alone = greedy(srv, PROMPTS, concurrent=False)
    with open_backend(BackendOptions(ckpt=str(ckpt), nodes=2, max_seqs=8, queue=64, timeout=5,
                                     threads=1)) as ring:
        app = create_app(ring.factory, ring.tokenizer, ServeConfig(MODEL, rebuild_retry_s=0.5))
        with BackgroundServer(app, start_timeout_s=120) as srv:
            assert greedy(srv, PROMPTS, concurrent=True) == alone
            # a node dies between requests: the engine re-plans over the starter alone and
            # the next requests are served as before; /health reports the recovery
            ring.cluster.procs[0].kill()
            ring.cluster.procs[0].wait()
            assert greedy(srv, PROMPTS[:4], concurrent=True) == alone[:4]
            health = httpx.get(srv.url + "/health").json()
            assert health["status"] == "ok" and health["engine_builds"] == 1, health
            rec = health["recoveries"][0]
            assert rec["failed"].startswith("finisher at ") and rec["ring"] == ["starter"], rec
            # the local cluster starts the dead node again and the ring takes it back
            # (issue 25.5): /health lists it as absent until then
            assert len(health["recoveries"]) == 2 or health["absent"] == ["finisher"], health
            t0 = time.monotonic()
            while len(health["recoveries"]) < 2 and time.monotonic() - t0 < 60:
                time.sleep(0.2)
                health = httpx.get(srv.url + "/health").json()
            rejoin = health["recoveries"][1]
            assert rejoin["recovery"] == "rejoin" and rejoin["ring"] == ["starter", "finisher"], health
            assert health["absent"] == [] and ring.cluster.restarts == 1
            assert greedy(srv, PROMPTS[4:8], concurrent=True) == alone[4:8]
            assert "mdi_ring_recoveries 2.0" in httpx.get(srv.url + "/metrics").text


def test_a_replan_mid_stream_fails_no_request_and_keeps_the_text(ckpt):
    """8 streams in flight while the ring is re-planned (a policy with no threshold, as in
    test_replan_ring.py): every request completes with the single device's text, and
    /health records the re-plan."""
    from mdi.ring.starter.replan import ReplanPolicy

    forced = ReplanPolicy(ratio=1.0, hold_steps=1, warmup_steps=1, min_gap_steps=25,
                          min_gain=0.0, poll_s=0.02)
    prompts = PROMPTS[:8]
    with open_backend(BackendOptions(ckpt=str(ckpt), max_seqs=8, batch_invariant=True)) as local:
        with BackgroundServer(create_app(local.factory, local.tokenizer, ServeConfig(MODEL))) as srv:
            alone = greedy(srv, prompts, concurrent=False, max_tokens=40)
    with open_backend(BackendOptions(ckpt=str(ckpt), nodes=2, max_seqs=8, timeout=5, threads=1,
                                     batch_invariant=True, replan_policy=forced)) as ring:
        app = create_app(ring.factory, ring.tokenizer, ServeConfig(MODEL))
        with BackgroundServer(app, start_timeout_s=120) as srv:
            assert greedy(srv, prompts, concurrent=True, max_tokens=40) == alone
            health = httpx.get(srv.url + "/health").json()
    replans = [r for r in health["recoveries"] if r["recovery"] == "replan"]
    assert replans and health["engine_builds"] == 1, health
    assert "slower than the plan predicted" in replans[0]["why"], replans[0]
    assert replans[0]["resumed"] > 0  # requests were in flight: paused, resumed
    assert replans[0]["plan"]["partition"] == "moved"  # with their caches: no re-prefill


def test_a_node_killed_with_8_streams_in_flight_fails_no_request_and_keeps_the_text(ckpt):
    """Issue 22's serve case: 8 streaming requests (the openai client, which raises on an
    error event) while the ring's intermediate node is SIGKILLed mid-decode: a spare
    takes its layers over from the starter's replay log, every stream completes with the undisturbed text
    (--batch-invariant), and /health records the recovery, no engine rebuilt."""
    import threading

    prompts = PROMPTS[8:16]
    with open_backend(BackendOptions(ckpt=str(ckpt), max_seqs=8, batch_invariant=True)) as local:
        with BackgroundServer(create_app(local.factory, local.tokenizer, ServeConfig(MODEL))) as srv:
            alone = greedy(srv, prompts, concurrent=False, max_tokens=48)
    with open_backend(BackendOptions(ckpt=str(ckpt), nodes=3, spares=1, max_seqs=8, timeout=5,
                                     threads=1, batch_invariant=True, replan=False,
                                     recovery="replay")) as ring:
        app = create_app(ring.factory, ring.tokenizer, ServeConfig(MODEL))
        with BackgroundServer(app, start_timeout_s=120) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
            lock, started, chunks = threading.Lock(), threading.Event(), [0] * len(prompts)

            def one(i: int) -> str:
                parts = []
                for ch in c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=48,
                                               temperature=0, stream=True):
                    parts += [x.text for x in ch.choices]
                    with lock:
                        chunks[i] += 1
                        if min(chunks) >= 4:  # every stream is decoding: kill now
                            started.set()
                return "".join(parts)

            with ThreadPoolExecutor(len(prompts)) as pool:
                futures = [pool.submit(one, i) for i in range(len(prompts))]
                assert started.wait(120), chunks
                victim = ring.cluster.procs[0]  # the first secondary: the intermediate
                victim.kill()
                victim.wait()
                texts = [f.result() for f in futures]  # an error event would raise here
            health = httpx.get(srv.url + "/health").json()
    assert texts == alone
    assert health["engine_builds"] == 1, health
    (rec,) = [r for r in health["recoveries"] if r["recovery"] != "rejoin"]
    assert rec["failed"].startswith("intermediate") and rec["resumed"] == 8, rec
    assert rec["recovery"] == "replay" and rec["ring"] == ["starter", "spare[0]", "finisher"], rec
