"""Who may talk to a node, and what happens to everyone else: the shared token on
the control plane (401, nothing changes), the HMAC handshake and header checks on
the data plane (the connection is dropped with a logged reason, the node keeps
serving), no unpickling anywhere, and listeners bound to the configured address.

The nodes are real processes on loopback; the test plays the starter, or the
finisher's previous and next node. (Hypothesis fuzzing of the frame decoder
lives in test_wire.py.)
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster_helpers import (TOKEN, auth, build_tiny_ckpt, child_env, closed_by_peer,
                             error_lines, fake_upstream, health, init_body, open_data, raw_frame,
                             raw_http, read_raw_frame, run_cli, start_ring, status, wait_state)
from mdi.ring.protocol.auth import AuthError, check_bearer, resolve_token
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import RunOptions
from mdi.ring.protocol.wire import HEADER, HEADER_SIZE, Frame, Kind
from mdi.generate.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=1)
WRONG = "wrong-token-0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """The intermediate reads the token from --token-file, the finisher from MDI_TOKEN."""
    root = tmp_path_factory.mktemp("security_ring")
    ckpt = build_tiny_ckpt(root / "ckpt")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    r = start_ring(root, ckpt, token_args=[["--token-file", str(token_file)], []],
                   envs=[child_env(), child_env(MDI_TOKEN=TOKEN)])
    yield r
    r.stop()


def run_async(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def snapshot(spec) -> dict:
    s = status(spec)
    return {k: s[k] for k in ("state", "run_id", "layers", "runs_completed", "pid")}


# ---- control plane: the token -----------------------------------------------------------
BAD_HEADERS = [{}, auth(WRONG), auth(TOKEN + "x"), auth(TOKEN[:-1]),
               {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
               {"Authorization": "Bearer"}, {"Authorization": "bearer " + TOKEN}]


@pytest.mark.slow
def test_every_route_but_health_needs_the_token(ring):
    fin = ring.fin.spec

    async def scenario():
        async with fake_upstream(ring, run_id=71):
            before = snapshot(fin)
            assert before["state"] == "ready" and before["run_id"] == 71
            async with httpx.AsyncClient(timeout=5.0) as http:
                r = await http.get(fin.url + "/health")
                assert r.status_code == 200 and r.json()["state"] == "ready"
                requests = [("GET", "/status", None), ("POST", "/init", {"run_id": 1}),
                            ("PUT", "/weights/71", None), ("POST", "/connect", {"run_id": 71}),
                            ("POST", "/stop", None), ("POST", "/stop", {"run_id": 71}),
                            ("POST", "/shutdown", None), ("GET", "/openapi.json", None),
                            ("GET", "/docs", None), ("GET", "/no-such-route", None)]
                for headers in BAD_HEADERS:
                    for method, path, body in requests:
                        r = await http.request(method, fin.url + path, json=body, headers=headers,
                                               content=b"x" * 10 if method == "PUT" else None)
                        assert r.status_code == 401, (method, path, headers, r.text)
                        assert r.json()["detail"] == "missing or wrong cluster token"
                        assert r.headers["www-authenticate"] == "Bearer"
            assert snapshot(fin) == before  # nothing changed, the node is still up
        ring.fin.wait_log("refused POST /shutdown from 127.0.0.1: missing or wrong token")

    run_async(scenario())
    wait_state(fin, "idle", 5.0)


@pytest.mark.slow
def test_a_stranger_cannot_make_a_node_buffer_a_body(ring):
    """The token and the size are checked before any body is read."""
    spec = ring.inter.spec

    def ask(headers: str) -> int:  # answered without the body ever being sent
        return raw_http(spec.addr, spec.port, "POST /init HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Type: application/json\r\n{headers}\r\n")[0]

    assert ask("Content-Length: 1000000000\r\n") == 401
    assert ask(f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000000000\r\n") == 413
    assert ask(f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n") == 411
    assert status(spec)["state"] == "idle"


@pytest.mark.slow
def test_token_sources_and_a_wrong_token(ring, tmp_path):
    # A whole run: the starter takes --token; the nodes took --token-file and MDI_TOKEN.
    rc, out, err = run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                           "--token", TOKEN, "--n-samples", "2", "--n-tokens", "5",
                           "--temperature", "0", "--timeout", "3")
    assert rc == 0, err
    before = [snapshot(n.spec) for n in ring.procs]
    rc, out, err = run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                           "--token", WRONG, "--n-tokens", "5", "--timeout", "3")
    assert rc not in (0, None)
    (line,) = error_lines(err)
    inter = ring.inter.spec
    # the first request that needs the token is the capabilities query, before any /init
    assert line == f"mdi starter: error: {inter.describe()} refused the cluster token (/capabilities)"
    assert [snapshot(n.spec) for n in ring.procs] == before

    # Where a token comes from: --token, else --token-file, else MDI_TOKEN.
    f = tmp_path / "t"
    f.write_text("from-file-0123456789abcdef\n")
    env = os.environ.pop("MDI_TOKEN", None)
    try:
        os.environ["MDI_TOKEN"] = "from-env-0123456789abcdef"
        assert resolve_token("from-flag-0123456789abcdef", str(f)) == "from-flag-0123456789abcdef"
        assert resolve_token(None, str(f)) == "from-file-0123456789abcdef"
        assert resolve_token(None, None) == "from-env-0123456789abcdef"
        del os.environ["MDI_TOKEN"]
        with pytest.raises(AuthError, match="no cluster token"):
            resolve_token(None, None)
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(AuthError, match="is empty"):
            resolve_token(None, str(tmp_path / "empty"))
        with pytest.raises(AuthError, match="printable ASCII"):
            resolve_token("secret with spaces", None)
    finally:
        os.environ.pop("MDI_TOKEN", None)
        if env is not None:
            os.environ["MDI_TOKEN"] = env


def test_bearer_tokens_are_compared_in_constant_time(monkeypatch):
    import mdi.ring.protocol.auth as auth_mod

    calls = []
    real = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert check_bearer(f"Bearer {TOKEN}", TOKEN)
    assert not check_bearer(f"Bearer {WRONG}", TOKEN)
    assert not check_bearer("Bearer x", TOKEN)
    assert len(calls) == 3


# ---- data plane -------------------------------------------------------------------------
@pytest.mark.slow
def test_data_plane_handshake_needs_the_token(ring):
    fin = ring.fin

    async def scenario():
        async with fake_upstream(ring, run_id=81):
            # the node closes the link, which our side of the mutual handshake reports
            with pytest.raises(AuthError, match="listener closed the link during the handshake"):
                await open_data(fin.spec, 81, token=WRONG)
            fin.wait_log("data-plane handshake failed: wrong token")
            assert status(fin.spec)["state"] == "ready"  # the run is untouched
            # The real previous node still gets in, and the run completes.
            reader, writer = await open_data(fin.spec, 81)
            writer.write(Frame(Kind.STOP, 81).encode())
            await writer.drain()
            assert await closed_by_peer(reader)
            writer.close()
        return status(fin.spec)

    runs = status(fin.spec)["runs_completed"]
    after = run_async(scenario())
    assert after["runs_completed"] == runs + 1 and after["last_run"]["reason"] == "run complete"


@pytest.mark.slow
def test_connection_from_another_address_is_refused(ring):
    """The previous node is configured as 192.0.2.1 (no traffic goes there); we connect
    from 127.0.0.1 with the right token and are refused before the handshake."""
    async def scenario():
        async with fake_upstream(ring, run_id=82, prev_addr="192.0.2.1"):
            reader, writer = await open_data(ring.fin.spec, 82, handshake=False)
            assert await closed_by_peer(reader)
            writer.close()
            assert status(ring.fin.spec)["state"] == "ready"

    run_async(scenario())
    ring.fin.wait_log("connection from 127.0.0.1, the previous node is 192.0.2.1")


PRE_HANDSHAKE = {  # what a stranger sends instead of the AUTH frame -> logged reason
    "random bytes": (os.urandom(64), "bad magic"),
    "truncated header": (b"MDI\x00\x01\x06", "truncated header"),
    "wrong magic": (raw_frame(Kind.AUTH, magic=b"XXXX", dtype=5, shape=(32,), payload=b"a" * 32),
                    "bad magic"),
    "wrong version": (raw_frame(Kind.AUTH, version=9, dtype=5, shape=(32,), payload=b"a" * 32),
                      "unsupported wire version 9"),
    "unknown kind": (raw_frame(99, dtype=5, shape=(32,), payload=b"a" * 32), "unknown frame kind 99"),
    "unknown dtype": (raw_frame(Kind.AUTH, dtype=77, shape=(32,), payload=b"a" * 32),
                      "unknown dtype code 77"),
    "huge handshake": (raw_frame(Kind.AUTH, dtype=5, shape=(1 << 30,), payload=b""),
                       "AUTH payload of 1073741824 bytes"),
    "activations first": (raw_frame(Kind.DECODE, 83), "DECODE frame before the handshake"),
    "pickle": (pickle.dumps(list(range(100))), "bad magic"),
}


async def send_and_wait_log(node, run_id: int, data: bytes, reason: str, name: str,
                            handshake: bool = True) -> str:
    """Send raw bytes on the node's data port; the node must close the link and log
    `reason`. Returns the log line."""
    mark = node.log_mark()
    reader, writer = await open_data(node.spec, run_id, handshake=handshake)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
    except OSError:  # the node refused the first bytes and closed before the rest: a race
        pass         # the node may win; what it logs and that it closes are checked below
    assert await closed_by_peer(reader), name
    writer.close()
    return node.wait_log(reason, since=mark)


@pytest.mark.slow
def test_garbage_instead_of_a_handshake_is_refused(ring):
    fin = ring.fin

    async def scenario():
        async with fake_upstream(ring, run_id=83):
            for name, (data, reason) in PRE_HANDSHAKE.items():
                line = await send_and_wait_log(fin, 83, data, reason, name, handshake=False)
                assert "refused data connection from 127.0.0.1" in line, (name, line)
                assert status(fin.spec)["state"] == "ready", name
            # ... and the previous node gets in afterwards.
            reader, writer = await open_data(fin.spec, 83)
            writer.write(Frame(Kind.STOP, 83).encode())
            await writer.drain()
            assert await closed_by_peer(reader)
            writer.close()

    run_async(scenario())
    wait_state(fin.spec, "idle", 5.0)


RUN = 84
BAD_FRAMES = {  # sent after a good handshake, on a run of 3 samples, n_embd 32, block 32
    "wrong magic": (raw_frame(run_id=RUN, magic=b"\x7fELF"), "bad magic"),
    "wrong version": (raw_frame(run_id=RUN, version=2), "unsupported wire version 2"),
    "unknown kind": (raw_frame(42, RUN), "unknown frame kind 42"),
    "unknown dtype": (raw_frame(run_id=RUN, dtype=200), "unknown dtype code 200"),
    "int64 activations": (raw_frame(run_id=RUN, dtype=4), "activation dtype INT64"),
    "wrong width": (raw_frame(run_id=RUN, shape=(1, 1, 31)), "activation width 31"),
    "2-D activations": (raw_frame(run_id=RUN, shape=(1, 32)), "must be 3-D"),
    "unused dim set": (HEADER.pack(b"MDI\x00", 1, Kind.DECODE, 1, 2, RUN, 0, 0, 1, 32, 7, 128)
                       + bytes(128), "unused shape dims must be 0, got (1, 32, 7) for ndim 2"),
    "too long a prefill": (raw_frame(Kind.PREFILL, RUN, shape=(1, 33, 32)), "block_size is 32"),
    "huge payload length": (raw_frame(run_id=RUN, length=1 << 60, payload=b""),
                            f"payload length {1 << 60} != 128"),
    "unknown sample": (raw_frame(run_id=RUN, sample=3), "outside the run's 3"),
    "another run": (raw_frame(run_id=RUN + 1), f"frame for run {RUN + 1}"),
    "position past the block": (raw_frame(run_id=RUN, position=32), "position 32 >= block_size"),
    "truncated payload": (raw_frame(run_id=RUN)[:HEADER_SIZE + 10], "truncated payload: 10 of 128"),
    "tokens on a node input": (raw_frame(Kind.TOKENS, RUN, dtype=4, shape=(1,), payload=b"\0" * 8),
                               "unexpected TOKENS frame"),
    "decode in a fixed batch": (raw_frame(run_id=RUN), "DECODE frame in a fixed-batch run"),
    "decode of half a group": (raw_frame(run_id=RUN, shape=(2, 1, 32)), "batch 2 outside 1..1"),
}


@pytest.mark.slow
def test_bad_frames_are_refused_and_the_node_keeps_serving(ring):
    fin = ring.fin

    async def one(name: str, data: bytes, reason: str) -> None:
        async with fake_upstream(ring, run_id=RUN):
            line = await send_and_wait_log(fin, RUN, data, reason, name)
            assert f"run {RUN}: bad frame from the previous node" in line, (name, line)
            wait_state(fin.spec, "idle", 5.0)  # the run is dropped, the node is not

    rss = status(fin.spec)["rss_bytes"]
    for name, (data, reason) in BAD_FRAMES.items():
        run_async(one(name, data, reason))
    assert status(fin.spec)["rss_bytes"] < rss + (64 << 20)  # nothing sized by a header
    r = Starter(ring.config, TOKEN, str(ring.ckpt), RunOptions(timeout=3)).run(
        [[1, 2], [3]], 5, GREEDY)
    assert [len(t) for t in r.tokens] == [5, 5]


# ---- nothing is unpickled -----------------------------------------------------------------
class _Evil:
    """Unpickling this creates a file."""
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickles(path: Path) -> list[bytes]:
    import io

    import torch

    payloads = [pickle.dumps(_Evil(str(path)), protocol=p) for p in (2, 4, 5)]
    buf = io.BytesIO()
    torch.save({"model": _Evil(str(path))}, buf)  # a torch checkpoint (zip holding a pickle)
    return payloads + [buf.getvalue()]


def _send_raw(addr: str, port: int, data: bytes, read_first: bool = False) -> None:
    try:
        with socket.create_connection((addr, port), timeout=3.0) as s:
            s.settimeout(3.0)
            if read_first:  # a data port speaks first (CHALLENGE)
                try:
                    read_raw_frame(s)
                except (EOFError, OSError, ValueError):
                    pass
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    except OSError:
        pass  # refused or reset: fine, as long as nothing runs


@pytest.mark.slow
def test_pickle_payloads_never_run_on_any_port(ring, tmp_path, caplog):
    marker = tmp_path / "pwned"
    payloads = _pickles(marker)
    fin, inter = ring.fin.spec, ring.inter.spec

    def control_plane(spec, run_id=None):
        with httpx.Client(timeout=5.0) as http:
            for data in payloads:
                for headers in ({}, auth()):
                    for ctype in ("application/json", "application/octet-stream",
                                  "application/python-pickle"):
                        h = {**headers, "content-type": ctype}
                        for method, path in (("POST", "/init"), ("POST", "/connect"),
                                             ("POST", "/stop"),
                                             ("PUT", f"/weights/{run_id or 1}")):
                            r = http.request(method, spec.url + path, content=data, headers=h)
                            assert r.status_code in (400, 401, 422), (path, r.status_code, r.text)
                _send_raw(spec.addr, spec.port, data)  # not even HTTP

    # Idle nodes: control and data ports.
    for spec in (inter, fin):
        control_plane(spec)
        for data in payloads:
            _send_raw(spec.addr, spec.port_in, data)

    async def configured():
        # A configured run: the data port reads the payload as its AUTH frame, /weights
        # gets it as the safetensors stream; then as frames after a good handshake.
        async with fake_upstream(ring, run_id=91):
            await asyncio.to_thread(control_plane, fin, 91)
            for data in payloads:
                await asyncio.to_thread(_send_raw, fin.addr, fin.port_in, data, True)
            reader, writer = await open_data(fin, 91)
            writer.write(payloads[1])
            await writer.drain()
            assert await closed_by_peer(reader)
            writer.close()

    run_async(configured())
    wait_state(fin, "idle", 5.0)

    # Mid-run: the starter's own data port is open too.
    result, errors = [], []

    def run() -> None:
        try:
            result.append(Starter(ring.config, TOKEN, str(ring.ckpt), RunOptions(timeout=5)).run(
                [[1], [2], [3]], 400, GREEDY))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    caplog.set_level(logging.WARNING, logger="mdi.ring.starter.client")
    t.start()
    try:
        wait_state(fin, "running", 30.0)
        st = ring.config.starter
        for data in payloads:
            for addr, port in ((st.addr, st.port_in), (inter.addr, inter.port_in),
                               (fin.addr, fin.port_in), (inter.addr, inter.port),
                               (fin.addr, fin.port)):
                _send_raw(addr, port, data, read_first=port in (st.port_in, inter.port_in,
                                                               fin.port_in))
    finally:
        t.join(60)
    assert not t.is_alive()
    assert not errors, errors
    assert [len(x) for x in result[0].tokens] == [400, 400, 400]  # the run was not disturbed
    refused = [r.getMessage() for r in caplog.records if "refused data connection" in r.getMessage()]
    assert len(refused) == len(payloads) and all("bad magic" in m for m in refused), refused
    time.sleep(0.2)
    assert not marker.exists(), "a pickle payload was unpickled"
    # Control check: the payload does create the file when unpickled.
    pickle.loads(payloads[0])
    assert marker.exists()


# ---- where nodes listen --------------------------------------------------------------------
@pytest.mark.slow
def test_nodes_bind_the_configured_address_not_all_interfaces(ring):
    import psutil

    from mdi.ring.node.runtime import NodeRuntime

    for n in ring.procs:
        listening = {c.laddr.port: c.laddr.ip for c in psutil.Process(n.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {n.spec.port: "127.0.0.1", n.spec.port_in: "127.0.0.1"}, listening
    spec = ring.fin.spec
    assert NodeRuntime(spec, TOKEN).bind_host == "127.0.0.1"
    assert NodeRuntime(spec, TOKEN, bind_any=True).bind_host == "0.0.0.0"
    rc, out, _ = run_cli("node", "--help")
    assert rc == 0 and "--bind-any" in out


# ---- the adversarial pass (issue 13): lock-out, body caps, logs ------------------------------
def _idle_sockets(spec, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((spec.addr, spec.port), timeout=5)
        socks.append(s)
    return socks


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_idle_connections_cannot_lock_out_the_control_plane(ring):
    """Issue 13.1: 63 idle connections made every request 503, /health included, for as
    long as they were held. Now 150 of them (more than MAX_CONNECTIONS) do not: /health
    and a real /init are answered while they are open, the oldest are evicted past the
    cap, and every one is closed after --timeout (3 s here) without complete headers."""
    from mdi.net.http_guard import MAX_CONNECTIONS, MAX_PER_CLIENT

    fin = ring.fin.spec
    mark = ring.fin.log_mark()
    socks = _idle_sockets(fin, 150)
    half_sent = socks[-1]
    half_sent.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # slow-loris: never finished
    try:
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0) as http:
            for _ in range(5):
                r = http.get(fin.url + "/health")
                assert r.status_code == 200 and r.json()["state"] == "idle", r.text
            r = http.post(fin.url + "/init", json=init_body(ring, 91), headers=auth())
            assert r.status_code == 200 and r.json()["state"] == "awaiting_weights", r.text
            r = http.post(fin.url + "/stop", json={"run_id": 91}, headers=auth())
            assert r.status_code == 200 and r.json()["state"] == "idle"
        assert time.monotonic() - t0 < 2.0, ring.fin.log()[mark:]
        evicted = sum(_closed(s) for s in socks[:40])
        assert evicted >= 150 - MAX_CONNECTIONS, evicted
        ring.fin.wait_log(f"more than {MAX_PER_CLIENT} connections open from", since=mark)
        deadline = time.monotonic() + 6.0  # --timeout 3 s from connecting, plus slack
        while not all(_closed(s) for s in socks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_closed(s) for s in socks)
        ring.fin.wait_log("no complete request headers within 3 s", since=mark)
    except BaseException:
        print(ring.fin.log()[mark:][-5000:])
        raise
    finally:
        for s in socks:
            s.close()
    assert health(fin)["state"] == "idle"


@pytest.mark.slow
def test_chunked_bodies_cannot_pass_the_json_cap(ring):
    """Issue 13.3: Transfer-Encoding: chunked with a small Content-Length read 100 MiB."""
    spec = ring.inter.spec
    rss = status(spec)["rss_bytes"]
    with socket.create_connection((spec.addr, spec.port), timeout=5) as s:
        s.sendall(f"POST /init HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 10\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        s.settimeout(5)
        answer = b""  # it comes before a byte of the body was sent
        while b'"}' not in answer:
            piece = s.recv(4096)
            if not piece:
                break
            answer += piece
        answer = answer.decode("latin-1")
        deadline = time.monotonic() + 5
        while not _closed(s) and time.monotonic() < deadline:  # and no more is read
            time.sleep(0.05)
        assert _closed(s)
    assert answer.startswith("HTTP/1.1 400 "), answer
    assert "body: Content-Length and Transfer-Encoding together" in answer
    assert status(spec)["rss_bytes"] - rss < 20 * 2**20
    assert status(spec)["state"] == "idle"


@pytest.mark.slow
def test_peer_strings_cannot_forge_or_flood_the_log(ring):
    """Issue 13.4: %0a in a path forged log lines; refused requests were logged without limit."""
    fin = ring.fin
    time.sleep(1.1)  # a fresh second for the log limiter (20 warnings a second)
    mark = fin.log_mark()
    code, _ = raw_http(fin.spec.addr, fin.spec.port,
                       "GET /a%0a2026-01-01%2000:00:00%20INFO%20forged HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 401
    line = fin.wait_log("refused GET /a", since=mark)
    assert "/a\\n2026-01-01 00:00:00 INFO forged from 127.0.0.1" in line
    assert not any(x.startswith("2026-01-01") for x in fin.log()[mark:].splitlines())

    time.sleep(1.1)  # a fresh second for the limiter
    mark = fin.log_mark()
    with httpx.Client(timeout=5.0) as http:
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 0.5:
            assert http.get(fin.spec.url + f"/status?{n}").status_code == 401
            n += 1
    time.sleep(1.1)
    httpx.get(fin.spec.url + "/after-the-flood", timeout=5.0)
    last = fin.wait_log("refused GET /after-the-flood", since=mark)
    lines = [x for x in fin.log()[mark:].splitlines() if "refused GET" in x]
    assert n > 40 and len(lines) <= 21, (n, len(lines))
    assert f"[{n - 20} warnings not logged: more than 20 a second]" in last, (n, last)
