"""The API server over the real single-device engine (mdi.engine.local): concurrent
streams equal requests run alone, stop strings, disconnects free slots; and one real
`mdi serve` process on the bundled model."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import REPO, scaled_random_model
from mdi.checkpoint.format import save_checkpoint
from mdi.model import GPTConfig
from mdi.serve import BackgroundServer, ServeConfig, create_app
from mdi.serve.backend import BackendOptions, open_backend

MODEL = "tiny-random"
BUNDLED = REPO / "models" / "shakespeare-char"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, char_tokenizer):
    config = GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    return save_checkpoint(tmp_path_factory.mktemp("serve_ckpt"), scaled_random_model(config, seed=3),
                           char_tokenizer, {"note": "random weights for the serve tests"})


@pytest.fixture(scope="module")
def server(ckpt):
    with open_backend(BackendOptions(ckpt=str(ckpt), max_seqs=8, queue=64, batch_invariant=True)) as backend:
        # context far past the model's 64 positions: the engine's overflow window lets a
        # stream outlast them, so a disconnect can come mid-stream
        config = ServeConfig(MODEL, context=1 << 20)
        with BackgroundServer(create_app(backend.factory, backend.tokenizer, config)) as srv:
            yield srv


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_32_concurrent_streams_equal_each_alone(server):
    prompts = [f"Prompt {'abcdefgh'[i % 8]}{'ijklmnop'[i // 8]}:" for i in range(32)]
    c = client(server)
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0) for p in prompts]
    assert all(r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length" for r in alone)

    def streamed(p: str) -> str:
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True) if ch.choices)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == [r.choices[0].text for r in alone]
    assert len(set(together)) > 1


def test_stop_string_and_seeded_sampling(server):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    stop = full[10:12]
    cut = c.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, prompt="ROMEO:", max_tokens=16, temperature=1.0, seed=7, n=2)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]


def test_disconnect_frees_the_slot(server):
    engine = server.server.config.app.state.holder.engine
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "a", "max_tokens": 100000, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
            assert engine.running + engine.queued == 1
    deadline = time.monotonic() + 10
    while engine.running + engine.queued:
        assert time.monotonic() < deadline, "the disconnected stream's sequence was not retired"
        time.sleep(0.02)


@pytest.mark.parametrize("flag", [True, False])
def test_batch_invariant_is_applied_once_where_stages_load(ckpt, tmp_path, monkeypatch, flag):
    """Review: --batch-invariant was applied twice, by configure_stage at load and again
    as an engine argument (behind a signature check no engine fails). Now only the
    loaders set it: the local model, and the ring's RunOptions (its stages' loaders)."""
    import mdi.engine.local
    import mdi.ring.starter.ring_engine
    from cluster_helpers import write_nodes_file
    from mdi.ring.cluster.local_cluster import free_ports
    from mdi.ring.cluster.nodes_config import local_nodes_config

    made = []

    class LocalRecorder(mdi.engine.local.LocalEngine):
        def __init__(self, model, tok, **kwargs):
            made.append(kwargs)
            super().__init__(model, tok, **kwargs)
            assert model.batch_invariant is flag   # set at load, before the engine

    class RingRecorder:
        def __init__(self, nodes, token, ckpt, tok, opts, **kwargs):
            made.append(kwargs)
            assert opts.batch_invariant is flag    # what every loader of the ring applies

    monkeypatch.setattr(mdi.engine.local, "LocalEngine", LocalRecorder)
    monkeypatch.setattr(mdi.ring.starter.ring_engine, "RingEngine", RingRecorder)
    nodes = write_nodes_file(tmp_path / "nodes.json", local_nodes_config(2, free_ports(4)))
    for opts in (BackendOptions(ckpt=str(ckpt), batch_invariant=flag),
                 BackendOptions(ckpt=str(ckpt), batch_invariant=flag, nodes_config=str(nodes),
                                token="t" * 32)):
        with open_backend(opts) as backend:
            engine = backend.factory()
            if inspect.isawaitable(engine):  # the local engine is built on its compute thread
                asyncio.run(engine)
    assert len(made) == 2 and all("batch_invariant" not in kw for kw in made), made


def test_one_thread_loads_and_computes_every_step_off_the_event_loop(ckpt, monkeypatch):
    """Issue 21: once two threads of a process have run OpenMP regions, libgomp stops
    spinning between them (~310 context switches a token). The server loaded the model on
    the caller's thread, decoded on the event loop and prefilled on the engine's worker:
    now one compute thread loads it, builds the engine's caches and runs every step,
    short or long, and it is not the event loop's."""
    import threading

    import mdi.checkpoint
    from test_compute_thread import threads_seen

    seen = threads_seen(monkeypatch, mdi.checkpoint, "load_model")
    with open_backend(BackendOptions(ckpt=str(ckpt), max_seqs=4, prefill_chunk=8)) as backend:
        with BackgroundServer(create_app(backend.factory, backend.tokenizer,
                                         ServeConfig(MODEL))) as srv:
            c = client(srv)
            kw = dict(model=MODEL, max_tokens=20, temperature=0)
            with ThreadPoolExecutor(4) as pool:  # long prompts (chunks) beside decodes
                answers = list(pool.map(lambda p: c.completions.create(prompt=p, **kw),
                                        ["ROMEO: " * 5, "a", "Prompt ab:", "b" * 30]))
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                prompt="a", stream=True, **kw) if ch.choices)
            loop_thread = srv.thread.ident
    assert all(r.usage.completion_tokens == 20 for r in answers)
    assert streamed == answers[1].choices[0].text
    (compute,) = seen["load"]
    assert seen == {"load": {compute}, "caches": {compute}, "step": {compute}}
    assert compute not in (loop_thread, threading.get_ident())


@pytest.mark.slow
def test_mdi_serve_process(tmp_path):
    """`mdi serve` as users start it: the bundled model, an API key from the environment,
    a chat template from a file; then SIGTERM stops it cleanly (status 0)."""
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MDI_API_KEY": "k3y", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mdi.cli.main", "serve", "--ckpt", str(BUNDLED),
                             "--port", str(port), "--max-seqs", "4", "--chat-template", str(template),
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mdi serve did not become healthy"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["shakespeare-char"]
        r = c.completions.create(model="shakespeare-char", prompt="ROMEO:", max_tokens=20, temperature=0)
        assert r.usage.completion_tokens == 20 and len(r.choices[0].text) == 20
        chunks = list(c.chat.completions.create(model="shakespeare-char", temperature=0, max_tokens=12,
                                                messages=[{"role": "user", "content": "Speak."}],
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert len(text) == 12 and chunks[-1].usage.completion_tokens == 12
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        metrics = httpx.get(url + "/metrics").text
        assert "mdi_generated_tokens_total 32.0" in metrics
        assert json.loads(httpx.get(url + "/health").text)["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out


@pytest.mark.slow
def test_smollm2_chat_answers_and_stops_at_end_of_turn():
    """The real model through its own chat template (from the GGUF) and its EOS ids."""
    from mdi.checkpoint import CheckpointError
    from mdi.checkpoint.shipped import shipped_path

    try:
        shipped_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))
    with open_backend(BackendOptions(ckpt="smollm2-135m-instruct", max_seqs=2)) as backend:
        assert backend.tokenizer.chat_template and backend.tokenizer.eos_ids
        app = create_app(backend.factory, backend.tokenizer, ServeConfig("smollm2"))
        with BackgroundServer(app) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
            ask = [{"role": "user", "content": "What is the capital of France?"}]
            r = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=40, temperature=0)
            assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens < 40
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="smollm2", messages=ask, max_tokens=40, temperature=0, stream=True) if ch.choices)
            assert streamed == r.choices[0].message.content

