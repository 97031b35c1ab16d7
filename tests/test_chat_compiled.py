"""`mdi chat --compile` readies its package (the graph of its one sequence: 1 row) after
the load and before the first prompt (engine/compiled_start.py), so that no answer waits
for a build.

The fast test replaces AOTInductor's build and load with test_serve_compiled's stand-in
and drives the chat through main() with input() replaced: what was built is looked at
when the first prompt is asked for and after the answer. The slow ones build a real
package of the bundled model (the answer is `mdi sample --compile`'s text) and press
Ctrl-C while a build is held (the chat quits at once, 130).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from mdi.cli.chat import PLAIN_STOP
from mdi.cli.main import main
from mdi.model import aoti
from test_chat import BUNDLED, REPO, interrupted, open_gate, shut
from test_serve_compiled import cache_dir, needs_compiler, stand_in  # noqa: F401 - fixtures

CHAT = ["chat", "--ckpt", str(BUNDLED), "--compile", "--temperature", "0", "--dtype", "float32"]


def chat_once(monkeypatch, argv: list[str], line: str, at_prompt) -> int:
    """Run the chat on `argv`, type `line` at its first prompt and quit at the second;
    at_prompt(k) is called as prompt k (0, 1) is asked for."""
    asked = []

    def fake_input(prompt: str = "") -> str:
        at_prompt(len(asked))
        asked.append(prompt)
        if len(asked) == 1:
            return line
        raise EOFError  # Ctrl-D
    monkeypatch.setattr("builtins.input", fake_input)
    rc = main(argv)
    assert len(asked) == 2
    return rc


@needs_compiler
def test_chat_builds_its_package_before_the_first_prompt_and_none_in_the_answer(
        cache_dir, stand_in, monkeypatch, capsys, caplog):  # noqa: F811 - fixtures
    built, ran, threads = stand_in
    seen: list[tuple[list, set]] = []
    argv = CHAT + ["--n-tokens", "16"]
    with caplog.at_level(logging.INFO, logger="mdi.compile"):
        rc = chat_once(monkeypatch, argv, "Who goes there?",
                       lambda k: seen.append((list(built), set(ran))))
    assert rc == 0
    # at the first prompt: one sequence, one package (1 row), built and not yet run
    assert seen[0] == ([(1, True)], set())
    # after the answer: nothing more built, and its decode steps ran that package
    assert seen[1] == ([(1, True)], {(1, True)}) and built == [(1, True)]
    assert len(list(cache_dir.glob("decode-*.pt2"))) == 1
    assert {name.split("_")[0] for name in threads} == {"mdi-chat-engine"}  # the engine's thread
    answer = capsys.readouterr().out
    assert len(answer.strip()) > 0
    said = [r.getMessage() for r in caplog.records if r.name == "mdi.compile"]
    assert any("building 1 of the decode step's 1 package(s) (row buckets 1) before the first "
               "prompt" in m for m in said), said
    assert any(m.endswith("the decode step for 1 row: building (about 60 s)") for m in said), said
    caplog.clear()
    built.clear()
    seen.clear()
    with caplog.at_level(logging.INFO, logger="mdi.compile"):  # a second start: loaded
        assert chat_once(monkeypatch, argv, "Who goes there?", lambda k: seen.append(list(built))) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "mdi.compile"]
    assert built == [] and seen == [[], []]
    assert sum("the decode step for 1 row: loaded from cache" in m for m in said) == 1, said
    assert capsys.readouterr().out == answer  # the same greedy answer from the loaded package


def test_chat_without_compile_prepares_nothing(stand_in, monkeypatch):  # noqa: F811 - fixture
    built, ran, _ = stand_in
    argv = ["chat", "--ckpt", str(BUNDLED), "--temperature", "0", "--n-tokens", "4"]
    assert chat_once(monkeypatch, argv, "hi", lambda k: None) == 0
    assert built == [] and ran == set()


@pytest.mark.slow
@needs_compiler
def test_chat_compiled_answer_is_mdi_sample_compiles(cache_dir, monkeypatch, capsys):  # noqa: F811
    """A real package of the bundled model, built at start (before the first prompt);
    the answer builds nothing, and its text is that of `mdi sample --compile` on the
    prompt the chat renders (whose cache of one row loads the same package)."""
    packages = []

    def at_prompt(k: int) -> None:
        if k == 0:
            packages.extend(cache_dir.glob("decode-*.pt2"))

            def no_build(*args, **kwargs):
                raise AssertionError("a package was built after the start")
            monkeypatch.setattr(aoti, "build_package", no_build)
    assert chat_once(monkeypatch, CHAT + ["--n-tokens", "40"], "hi", at_prompt) == 0
    assert len(packages) == 1
    answer = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(BUNDLED), "--compile", "--n-samples", "1", "--prompt",
                 "User: hi\nAssistant:", "--n-tokens", "40", "--temperature", "0", "--dtype", "float32", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"][0]
    # the answer's line, then Ctrl-D's
    assert answer == sampled.split(PLAIN_STOP)[0] + "\n\n" and len(answer) > 10


# The chat's process with AOTInductor's build held: it waits until the test closes its
# end of a fifo. A hook of the test (nothing in mdi waits for it), set before the CLI runs.
HELD_BUILD = """import sys
import mdi.model.aoti as aoti
def held(*args, **kwargs):
    with open(sys.argv[1], "rb") as gate:
        gate.read()  # until the test closes its end
    raise AssertionError("the build went on after Ctrl-C")
aoti.build_package = held
from mdi.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@needs_compiler
def test_ctrl_c_while_the_package_builds_quits_at_once(tmp_path):
    """Ctrl-C while --compile builds (the engine's thread, before the first prompt): the
    chat exits with 130 and a clean message while the build is still held."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MDI_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.Popen([sys.executable, "-c", HELD_BUILD, str(fifo), *CHAT],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    gate = None
    try:
        gate = open_gate(fifo, proc)  # the build has begun
        err = interrupted(proc)
        assert "the decode step for 1 row: building (about" in err, err
    finally:
        shut(gate, proc)
