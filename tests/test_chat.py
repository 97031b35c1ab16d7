"""`mdi chat` driven through a pseudo-terminal (stdlib pty): answers streamed, the
conversation kept between turns, /reset and /system, Ctrl-C stopping an answer, Ctrl-D
quitting. The expected answers are computed here, in-process, from the same model and
template: the terminal must show exactly the greedy answer to the whole conversation."""
from __future__ import annotations

import contextlib
import errno
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster_helpers import wait_gone
from mdi.checkpoint import load_model
from mdi.cli.chat import PLAIN_STOP, PLAIN_TEMPLATE, Conversation
from mdi.engine.api import SeqParams
from mdi.engine.batch import generate_local
from mdi.engine.local import LocalEngine
from mdi.generate.chat_template import ChatTemplate
from mdi.generate.sampling import SamplingConfig
from mdi.generate.stops import Stops

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "models" / "shakespeare-char"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """A command on a pseudo-terminal: send lines and keys, wait for text."""

    def __init__(self, *argv: str, timeout: float = 120) -> None:
        env = {**os.environ, "TERM": "dumb", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execvpe(sys.executable, [sys.executable, "-m", "mdi.cli.main", *argv], env)
        self.timeout = timeout
        self.text = ""

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match:
        """Wait until the output since the last match has `pattern` (a regex)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = re.search(pattern, self.text)
            if m:
                self.text = self.text[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in the output: {self.text[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child has exited
                    data = b""
                if not data:
                    raise AssertionError(f"exited before {pattern!r}: {self.text[-2000:]!r}")
                self.text += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n")

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                select.select([self.fd], [], [], 0.2) and os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the chat did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED)


def greedy_answer(loaded, messages: list[dict], n_tokens: int) -> str:
    """What the chat must answer: the plain template over the messages, greedy."""
    ids = loaded.tokenizer.encode(ChatTemplate(PLAIN_TEMPLATE).render(messages))
    result = generate_local(lambda: LocalEngine(loaded.model, loaded.tokenizer, max_seqs=1), [ids],
                            n_tokens, SamplingConfig(temperature=0.0, top_k=None),
                            stops=Stops(strings=(PLAIN_STOP,)))
    return loaded.tokenizer.decode(result.tokens[0]).split(PLAIN_STOP)[0]


def answer_after(term: Terminal, line: str) -> str:
    term.send(line + "\n")
    term.expect(re.escape(line) + "\n")  # the terminal's echo
    answer = term.expect(r"(?s)(.*?)\n>>> ").group(1)
    # readline may show the prompt and the line once more when the line arrived before it
    # had the terminal (a loaded machine): that redisplay is not part of the answer
    return re.sub(r"\A(?:>>> )?" + re.escape(line) + "\n", "", answer)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", ["1", "2"])  # one device; a ring of two local nodes
def test_two_turns_history_reset_and_system(bundled, nodes):
    term = Terminal("chat", "--ckpt", str(BUNDLED), "--temperature", "0", "--n-tokens", "20",
                    "--nodes", nodes)
    try:
        term.expect(">>> ")
        first = answer_after(term, "hi")
        assert first == greedy_answer(bundled, [{"role": "user", "content": "hi"}], 20)
        second = answer_after(term, "hi")  # the same words, after the first exchange
        history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first.strip()},
                   {"role": "user", "content": "hi"}]
        assert second == greedy_answer(bundled, history, 20) != first
        term.send("/reset\n")
        term.expect(r"\(conversation cleared\)\n>>> ")  # the prompt: readline has the terminal
        assert answer_after(term, "hi") == first
        term.send("/system Speak.\n")  # the conversation so far is kept
        term.expect(r"\(system message set\)\n>>> ")
        assert answer_after(term, "hi") == greedy_answer(
            bundled, [{"role": "system", "content": "Speak."}, *history], 20)
        term.send("\x04")  # Ctrl-D
        assert term.wait() == 0
    finally:
        term.close()


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(bundled):
    term = Terminal("chat", "--ckpt", str(BUNDLED), "--temperature", "0", "--n-tokens", "1000000",
                    "--max-context", "64")
    try:
        term.expect(">>> ")
        term.send("hi\n")
        term.expect("hi\n")
        term.expect(r"\w{3}")  # the answer is streaming
        term.send("\x03")      # Ctrl-C: SIGINT to the chat
        term.expect(r"\[stopped\]\n>>> ", timeout=30)
        term.send("/reset\n")  # the chat goes on
        term.expect(r"\(conversation cleared\)\n>>> ")  # the prompt: readline has the terminal
        term.send("/bye\n")
        assert term.wait() == 0
    finally:
        term.close()


def test_conversation_leaves_out_the_oldest_turns_when_the_context_is_full(bundled):
    conv = Conversation(ChatTemplate(PLAIN_TEMPLATE), bundled.tokenizer, context=128, answer_tokens=20)
    conv.add("a" * 40, "b" * 40)
    conv.add("c" * 10, "d" * 10)
    ids = conv.prompt("hi")
    assert bundled.tokenizer.decode(ids) == f"User: {'c' * 10}\nAssistant: {'d' * 10}\nUser: hi\nAssistant:"
    assert conv.turns == [{"role": "user", "content": "c" * 10}, {"role": "assistant", "content": "d" * 10}]
    with pytest.raises(ValueError, match="the context holds 128"):
        conv.prompt("x" * 200)


@pytest.mark.slow
def test_smollm2_answers_paris_without_sampling_flags():
    pytest.importorskip("gguf")
    from mdi.checkpoint.shipped import shipped_path

    try:
        shipped_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    term = Terminal("chat", "--ckpt", "smollm2-135m-instruct", "--n-tokens", "40", timeout=300)
    try:
        term.expect(">>> ")
        assert "Paris" in answer_after(term, "What is the capital of France?")
        term.send("\x04")
        assert term.wait() == 0
    finally:
        term.close()


def test_one_device_loads_and_computes_on_the_engine_s_thread(bundled, monkeypatch):
    """Issue 21: once two threads of a process have run OpenMP regions, libgomp stops
    spinning between them (~310 context switches a token). The chat loaded the model on
    the terminal's thread and computed on the engine's (decodes on its loop, prefills on
    a worker): now the engine's thread loads, builds the caches and computes every step,
    and the answer is still the greedy one."""
    import threading

    from mdi.cli import chat
    from mdi.cli.main import build_parser
    from test_compute_thread import threads_seen

    seen = threads_seen(monkeypatch, chat, "load_model")
    args = build_parser().parse_args(["chat", "--ckpt", str(BUNDLED), "--dtype", "float32",
                                      "--temperature", "0", "--prefill-chunk", "8"])
    ids = bundled.tokenizer.encode(ChatTemplate(PLAIN_TEMPLATE).render(
        [{"role": "user", "content": "Who goes there?"}]))
    params = SeqParams(max_tokens=12, temperature=0.0, top_k=None)
    with chat._engine(args, str(BUNDLED), bundled.tokenizer, ring=False) as engine:
        answer, reason = engine.answer(ids, params, lambda text: None)
        engine_thread = engine.thread.ident
    threads = {what: set(idents) for what, idents in seen.items()}
    want = generate_local(lambda: LocalEngine(bundled.model, bundled.tokenizer, max_seqs=1), [ids],
                          12, SamplingConfig(temperature=0.0, top_k=None))
    assert (answer, reason) == (bundled.tokenizer.decode(want.tokens[0]), "length")
    assert threads == {"load": {engine_thread}, "caches": {engine_thread}, "step": {engine_thread}}
    assert engine_thread != threading.get_ident()


# The chat's process with its weights file gated: the load's first open of a
# safetensors file (checkpoint/st_io.py:open_file) waits until the test closes its end
# of a fifo. A hook of the test (nothing in mdi waits for it), set before the CLI runs.
GATED_CHAT = """import sys
import mdi.checkpoint.st_io as st
real = st.open_file
def gated(path):
    with open(sys.argv[1], "rb") as gate:
        gate.read()  # until the test closes its end
    return real(path)
st.open_file = gated
from mdi.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def interrupted(proc: subprocess.Popen) -> str:
    """SIGINT to a chat held at its gate: it quits at once (130, 'mdi: interrupted', no
    traceback, no prompt shown), the gate still shut. Returns its stderr."""
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "mdi: interrupted" in err and "Traceback" not in err, err
    assert ">>> " not in out
    return err


def shut(gate: int | None, proc: subprocess.Popen) -> None:
    """The test's end: the gate closed, the chat gone."""
    if gate is not None:
        os.close(gate)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def open_gate(fifo: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    """The fifo's write end, once the chat has opened its read end: it is in the load."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if time.monotonic() > deadline:
            raise AssertionError("the chat never began to load its weights")
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, err = proc.communicate(timeout=0.05)
            raise AssertionError(f"the chat exited ({proc.returncode}) before it loaded: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("nodes", ["1", "2"])  # the engine's thread loads; the starter's stage 0
def test_ctrl_c_while_the_model_loads_quits_at_once(tmp_path, nodes):
    """Ctrl-C during the load waited for the whole load (the engine's thread, or the
    ring starter's compute thread, was joined). Now the chat exits with 130 and a
    clean message while the load is still held at the gate: it cannot have waited."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", GATED_CHAT, str(fifo), "chat", "--ckpt",
                             str(BUNDLED), "--nodes", nodes], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    gate = None
    try:
        gate = open_gate(fifo, proc)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) == int(nodes) - 1  # a ring's local node, up before the load
        interrupted(proc)
        assert wait_gone(children) == []  # the local node was stopped
    finally:
        shut(gate, proc)
