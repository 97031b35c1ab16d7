"""`mdi serve --compile`: every package of the compiled decode step is loaded or built at
start (engine/compiled_start.py), so that no request waits for a build.

The fast test replaces AOTInductor's build and load with a stand-in (a file naming the
graph; its runner the traced function run eagerly), which keeps what is under test:
the packages start asks for are those the engine's steps look up (the same keys), for
every batch of 1..max_seqs rows, at one position or several. The slow one builds real
packages of the bundled model and compares the served text with `mdi sample --compile`'s.
"""
from __future__ import annotations

import json
import logging
import threading

import openai
import pytest

from conftest import REPO
from mdi.model import aoti
from mdi.model.compiled import CompiledDecode, compile_unavailable
from mdi.model.decode_graph import decode_graph
from mdi.serve import BackgroundServer, ServeConfig, create_app
from mdi.serve.backend import BackendOptions, open_backend

needs_compiler = pytest.mark.skipif(compile_unavailable() is not None,
                                    reason=f"cannot compile here: {compile_unavailable()}")
BUNDLED = REPO / "models" / "shakespeare-char"
# requests, one at a time, whose decode steps run every graph of 3 rows: 1 row, 2 and 3
# rows at one position (n copies of a prompt), 2 and 3 at several (prompts of other lengths)
REQUESTS = [("ab", 1), ("ab", 2), (["ab", "abc"], 1), ("ab", 3), (["a b", "ab", "abcd"], 1)]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MDI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the loader sets it
    return tmp_path / "inductor" / "mdi-aoti"


@pytest.fixture
def stand_in(monkeypatch):
    """aoti's build and load without Inductor; returns the graphs built and those run,
    as (rows, uniform), and the threads that built and ran them."""
    built: list[tuple[int, bool]] = []
    ran: set[tuple[int, bool]] = set()
    threads: set[str] = set()

    def build(stage, args, uniform, path, options=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"uniform": uniform}))
        built.append((args[0].shape[0], uniform))
        threads.add(threading.current_thread().name)

    def load(stage, path):
        uniform = json.loads(path.read_text())["uniform"]

        def run(x, pos, live, keys, kv):
            ran.add((x.shape[0], uniform))
            threads.add(threading.current_thread().name)
            return decode_graph(stage, x, pos, live, keys, kv, uniform)
        return run
    monkeypatch.setattr(aoti, "build_package", build)
    monkeypatch.setattr(aoti, "load_package", load)
    return built, ran, threads


def _complete(url: str, prompt, n: int, max_tokens: int = 5) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = c.completions.create(model="m", prompt=prompt, n=n, max_tokens=max_tokens, temperature=0)
    return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]


@pytest.mark.parametrize("rows, want", [
    (1, [(1, True)]),
    (2, [(1, True), (2, True), (2, False)]),
    (3, [(1, True), (2, True), (2, False), (3, True), (3, False)]),
    (8, [(1, True), (2, True), (2, False), (4, True), (4, False), (8, True), (8, False)]),
])
def test_the_graphs_of_a_cache_are_its_buckets_with_and_without_a_mask(rows, want):
    assert CompiledDecode.graphs(rows) == want


@needs_compiler
def test_serve_readies_every_bucket_at_start_and_builds_nothing_after(
        tiny_ckpt, cache_dir, stand_in, caplog):
    built, ran, threads = stand_in
    opts = BackendOptions(ckpt=str(tiny_ckpt), max_seqs=3, compile=True)
    with caplog.at_level(logging.INFO, logger="mdi.compile"):
        backend = open_backend(opts)
    with backend:
        graphs = CompiledDecode.graphs(3)
        assert sorted(built) == sorted(graphs)
        assert len(list(cache_dir.glob("decode-*.pt2"))) == len(graphs)
        said = [r.getMessage() for r in caplog.records if r.name == "mdi.compile"]
        assert sum(": building (about " in m for m in said) == len(graphs)
        assert any("building 5 of the decode step's 5 package(s) (row buckets 1, 2, 3)" in m
                   for m in said)
        built.clear()
        ran.clear()
        with BackgroundServer(create_app(backend.factory, backend.tokenizer, ServeConfig("m"))) as srv:
            for prompt, n in REQUESTS:
                rows = n * (len(prompt) if isinstance(prompt, list) else 1)
                assert len(_complete(srv.url, prompt, n)) == rows
        assert built == []  # every batch found its package ready
        assert ran == set(graphs)  # and the requests ran each of them
    # built and run on serve's compute thread (backend.py), neither the caller's nor the loop's
    assert {name.split("_")[0] for name in threads} == {"mdi-compute"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mdi.compile"), open_backend(opts):  # a second start
        said = [r.getMessage() for r in caplog.records if r.name == "mdi.compile"]
    assert built == []
    assert sum("loaded from cache" in m for m in said) == len(graphs)
    assert any("5 decode-step package(s) ready" in m and "(0 built, 5 loaded)" in m for m in said)


def test_serve_without_compile_prepares_nothing(tiny_ckpt, stand_in):
    built, _, _ = stand_in
    with open_backend(BackendOptions(ckpt=str(tiny_ckpt), max_seqs=2)):
        pass
    assert built == []


@needs_compiler
def test_a_stop_at_start_begins_no_further_package(tiny_ckpt, cache_dir, stand_in):
    from mdi.checkpoint import LoadOptions, load_model
    from mdi.engine.compiled_start import prepare_compiled

    built, _, _ = stand_in
    model = load_model(str(tiny_ckpt), LoadOptions(compile=True)).model
    stop = threading.Event()
    stop.set()
    assert prepare_compiled(model, 4, stop) == {} and built == []
    assert sorted(prepare_compiled(model, 2).values()) == ["built"] * 3
    assert sorted(prepare_compiled(model, 2).values()) == ["ready"] * 3  # held: nothing again


@pytest.mark.slow
@needs_compiler
def test_served_compiled_text_is_mdi_sample_compiles(cache_dir, monkeypatch, capsys):
    """Real packages of the bundled model, 2 sequence slots: start builds the three
    (1 row; 2 rows at one position and at several), requests build nothing, and the text
    of a prompt decoded twice (n=2) is `mdi sample --compile --n-samples 2`'s, which
    loads the same packages (its cache has the same 2 rows)."""
    from mdi.cli.main import main

    opts = BackendOptions(ckpt=str(BUNDLED), max_seqs=2, compile=True, dtype="float32")
    with open_backend(opts) as backend:
        assert len(list(cache_dir.glob("decode-*.pt2"))) == 3

        def no_build(*args, **kwargs):
            raise AssertionError("a package was built after start")
        monkeypatch.setattr(aoti, "build_package", no_build)
        with BackgroundServer(create_app(backend.factory, backend.tokenizer, ServeConfig("m"))) as srv:
            served = _complete(srv.url, "ROMEO:", 2, max_tokens=24)
            alone = _complete(srv.url, "ROMEO:", 1, max_tokens=24)
            mixed = _complete(srv.url, ["ROMEO:", "JULIET: O"], 1, max_tokens=24)
    assert main(["sample", "--ckpt", str(BUNDLED), "--compile", "--n-samples", "2", "--prompt",
                 "ROMEO:", "--n-tokens", "24", "--temperature", "0", "--dtype", "float32",
                 "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"]
    assert served == sampled and len(served[0]) == 24
    assert [len(t) for t in alone + mixed] == [24] * 3  # the other two packages, loaded
