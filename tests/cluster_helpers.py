"""Helpers for the tests that run real node processes on loopback.

Everything is small and bounded: a 3-layer random char model (n_embd 32),
nodes started as `python -m mdi.cli.main node` with their log in a file, and
every wait, HTTP call and subprocess under a timeout, so a broken node fails
a test instead of hanging it.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import torch

from mdi.checkpoint.format import save_checkpoint
from mdi.ring.protocol.auth import answer, challenge
from mdi.ring.cluster import local_cluster
from mdi.ring.cluster.local_cluster import child_setup, free_ports
from mdi.ring.cluster.nodes_config import NodesConfig, NodeSpec, load_nodes_config, local_nodes_config
from mdi.ring.plan.partition import Shard
from mdi.checkpoint.stream import shard_bytes
from mdi.ring.protocol.wire import HEADER_SIZE, Frame, Kind, parse_header
from mdi.model import GPT, GPTConfig
from mdi.tokenizer import CharTokenizer

TOKEN = "test-token-0123456789abcdef0123456789abcdef"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n"
N_LAYER = 3
HTTP_TIMEOUT = 5.0


# ---- checkpoint -------------------------------------------------------------
def build_tiny_ckpt(out: Path) -> Path:
    """A random 3-layer char model: one layer per node on a 3-node ring."""
    tok = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=N_LAYER, n_head=2,
                       n_embd=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    return save_checkpoint(out, model, tok, {"note": "random weights for tests"})


# ---- processes ----------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MDI_TOKEN"}
    env.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def mdi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mdi.cli.main", *map(str, args)]


@dataclass
class NodeProc:
    spec: NodeSpec
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_mark(self) -> int:
        return len(self.log())

    def wait_log(self, needle: str, timeout: float = 5.0, since: int = 0) -> str:
        """Wait until the node's log (from offset `since`) holds needle; return the line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log()[since:].splitlines():
                if needle in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.spec.name} never logged {needle!r}; log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start_node(nodes_path: Path, spec: NodeSpec, log_dir: Path, token_args: list[str] | None = None,
               env: dict[str, str] | None = None, timeout: float = 3.0,
               chunk: Path | None = None) -> NodeProc:
    """`mdi node` for spec, as LocalCluster starts its children (own process group,
    SIGTERM if the test process dies), with its log in log_dir."""
    log_path = log_dir / f"{spec.name}.log"
    args = ["node", "--nodes-config", nodes_path, "--role", spec.role, "--index", spec.index,
            "--threads", "1", "--timeout", timeout]
    if chunk is not None:
        args += ["--chunk", chunk]
    env = env if env is not None else child_env(MDI_TOKEN=TOKEN)
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(mdi_cmd(*args, *(token_args or [])), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=child_setup(None))
    return NodeProc(spec, proc, log_path)


def wait_healthy(nodes: list[NodeProc], timeout: float = 60.0) -> None:
    """LocalCluster's health wait, failing the test (AssertionError) with the node's log."""
    try:
        local_cluster.wait_healthy([(n.spec, n.proc) for n in nodes], timeout,
                                   lambda i: nodes[i].log(), interval=0.05)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


@dataclass
class Ring:
    """Long-lived secondary nodes of a ring whose starter is the test (3 nodes unless
    started from another nodes file)."""
    dir: Path
    ckpt: Path | None
    nodes_path: Path
    config: NodesConfig
    procs: list[NodeProc] = field(default_factory=list)

    @property
    def inter(self) -> NodeProc:
        return self.procs[0]

    @property
    def fin(self) -> NodeProc:
        return self.procs[1]

    def assert_alive(self) -> None:
        for n in self.procs:
            assert n.proc.poll() is None, f"{n.spec.name} died:\n{n.log()}"

    def stop(self) -> None:
        for n in self.procs:
            if n.proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(n.spec.url + "/shutdown", headers=auth(), timeout=1.0)
        for n in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=5)
            n.kill()


def write_nodes_file(path: Path, config: NodesConfig, edit: Callable[[dict], None] | None = None
                     ) -> Path:
    data = config.to_dict()
    if edit:
        edit(data)
    path.write_text(json.dumps(data, indent=2))
    return path


def start_ring(root: Path, ckpt: Path, token_args: list[list[str]] | None = None,
               envs: list[dict[str, str]] | None = None, timeout: float = 3.0) -> Ring:
    """Start the ring's intermediate and finisher; on a busy shared machine a port picked
    free can be taken before a node binds it, so a node that exits at startup gets a
    second try on new ports."""
    for attempt in (1, 2):
        nodes_path = write_nodes_file(root / "nodes.json", local_nodes_config(3, free_ports(6)))
        try:
            return start_nodes(nodes_path, root, ckpt, token_args, envs, timeout)
        except NodesStartError as e:
            if attempt == 2 or not e.exited:
                raise
            print(f"ring start failed, retrying on new ports: {e}", file=sys.stderr)
    raise AssertionError("unreachable")


class NodesStartError(AssertionError):
    """A node of a ring did not come up; `exited` when one of them exited."""

    def __init__(self, message: str, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def start_nodes(nodes_path: Path, root: Path, ckpt: Path | None = None,
                token_args: list[list[str]] | None = None, envs: list[dict[str, str]] | None = None,
                timeout: float = 3.0, chunks: list[Path] | None = None) -> Ring:
    """Start every secondary node of a nodes file (logs in root) and wait until they
    answer; on failure all of them are stopped."""
    config = load_nodes_config(nodes_path)
    ring = Ring(root, ckpt, nodes_path, config)
    try:
        for i, spec in enumerate(config.secondaries):
            ring.procs.append(start_node(nodes_path, spec, root,
                                         token_args[i] if token_args else None,
                                         envs[i] if envs else None, timeout,
                                         chunks[i] if chunks else None))
        wait_healthy(ring.procs)
        return ring
    except AssertionError as e:
        ring.stop()
        raise NodesStartError(str(e), any(n.proc.poll() is not None for n in ring.procs)) from None
    except BaseException:
        ring.stop()
        raise


# ---- control plane ------------------------------------------------------------
def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def resume_all(pids) -> None:
    """SIGCONT every process of pids that still exists: never leave a stopped one behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def health(spec: NodeSpec, timeout: float = HTTP_TIMEOUT) -> dict:
    return httpx.get(spec.url + "/health", timeout=timeout).json()


def status(spec: NodeSpec) -> dict:
    r = httpx.get(spec.url + "/status", headers=auth(), timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def wait_state(spec: NodeSpec, state: str, timeout: float = 10.0) -> float:
    """Wait until a node reports state; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if health(spec, 1.0)["state"] == state:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{spec.name} not {state!r} after {timeout} s: {health(spec)}")
        time.sleep(0.02)


def init_body(ring: Ring, run_id: int, role: str = "finisher", start: int = 2, stop: int = 3,
              groups: list[list[int]] | None = None, prev_addr: str = "127.0.0.1",
              next_spec: NodeSpec | None = None, **over) -> dict:
    """A valid /init body for the finisher of the ring, sending back to the test."""
    from mdi.checkpoint import read_info

    nxt = next_spec or ring.config.starter
    body = {"run_id": run_id, "role": role, "start": start, "stop": stop,
            "model": read_info(ring.ckpt).config.to_dict(), "dtype": "float32",
            "groups": groups or [[0, 1], [1, 2], [2, 3]],
            "next": {"addr": nxt.addr, "port": nxt.port_in}, "prev_addr": prev_addr,
            "sampling": {"temperature": 0.0, "top_k": None, "seed": 1} if role == "finisher" else None,
            "weights": "upload"}
    body.update(over)
    return body


def weights_for(ring: Ring, start: int = 2, stop: int = 3) -> bytes:
    return shard_bytes(ring.ckpt, Shard(start, stop, N_LAYER))


# ---- in-process: a finisher NodeRuntime with this test in the starter's place -----
@contextlib.asynccontextmanager
async def finisher_and_fake_starter(ckpt: Path, start: int = 1, local_next: bool = False,
                                    prev_local: bool = False, next_name: str | None = None):
    """A finisher NodeRuntime in this process (layers [start, n_layer) of ckpt) and
    listeners in the starter's place: TCP on its data port and a Unix socket
    (ring/local_link.py). Yields (runtime, nodes config, model config, start_run);
    `await start_run(run_id)` configures a greedy fixed-batch run of one group of
    two samples, connects it, and returns the starter's end of the link back.
    local_next: the finisher's next hop is the Unix socket (next_name, or the one
    listening here); prev_local: /init's prev_local."""
    from mdi.checkpoint import read_info
    from mdi.ring.protocol.local_link import listen_local, new_name
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime

    cfg = local_nodes_config(2, free_ports(4))
    config = read_info(ckpt).config
    weights = shard_bytes(ckpt, Shard(start, config.n_layer, config.n_layer))
    rt = NodeRuntime(cfg.finisher, TOKEN, timeout=2.0)
    await rt.start_data_server()
    got: asyncio.Queue = asyncio.Queue()
    current: dict[str, int] = {}

    async def next_node(reader, writer):  # the starter's listeners
        await challenge(reader, writer, TOKEN, current["run_id"], 2.0)
        await got.put((reader, writer))

    name = new_name()
    servers = [await asyncio.start_server(next_node, "127.0.0.1", cfg.starter.port_in),
               await asyncio.start_unix_server(next_node, sock=listen_local(name))]

    async def start_run(run_id: int):
        current["run_id"] = run_id
        nxt: dict = {"addr": "127.0.0.1", "port": cfg.starter.port_in}
        if local_next:
            nxt["local"] = next_name or name
        await rt.init(InitRequest(run_id=run_id, role="finisher", start=start,
                                  stop=config.n_layer, model=config.to_dict(), groups=[[0, 1]],
                                  next=nxt, prev_addr="127.0.0.1", prev_local=prev_local,
                                  sampling={"temperature": 0.0, "top_k": None, "seed": 1}))
        return await _load_and_connect(rt, run_id, weights, got)

    try:
        yield rt, cfg, config, start_run
    finally:
        for server in servers:
            server.close()
        await rt.close()


async def _load_and_connect(rt, run_id: int, weights: bytes, got: asyncio.Queue):
    """Load an /init-ed run's weights into rt, connect it, and return the link the test's
    listener accepted in the next node's place."""
    await rt.load_weights(run_id, weights)
    await rt.connect(run_id)
    return await asyncio.wait_for(got.get(), 5)


@contextlib.asynccontextmanager
async def intermediate_and_fake_finisher(ckpt: Path):
    """An intermediate NodeRuntime in this process (layer 1 of ckpt's 3, a sequence run
    of one group of two slots) and a listener in the finisher's place. Yields
    (runtime, nodes config, model config, start_run); `await start_run(run_id,
    **init_fields)` configures (init_fields override /init's), loads and connects a
    run and returns the finisher's end of the link; with connect=False it only /inits
    and returns None."""
    from mdi.checkpoint import read_info
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime

    cfg = local_nodes_config(3, free_ports(6))
    inter, fin = cfg.intermediate[0], cfg.finisher
    config = read_info(ckpt).config
    weights = shard_bytes(ckpt, Shard(1, 2, 3))
    rt = NodeRuntime(inter, TOKEN, timeout=2.0)
    await rt.start_data_server()
    got: asyncio.Queue = asyncio.Queue()
    current: dict[str, int] = {}

    async def next_node(reader, writer):  # the finisher's data port
        await challenge(reader, writer, TOKEN, current["run_id"], 2.0)
        await got.put((reader, writer))

    server = await asyncio.start_server(next_node, "127.0.0.1", fin.port_in)

    async def start_run(run_id: int, connect: bool = True, **init_fields):
        current["run_id"] = run_id
        fields = dict(run_id=run_id, role="intermediate", start=1, stop=2,
                      model=config.to_dict(), groups=[[0, 2]], sequences=True,
                      next={"addr": "127.0.0.1", "port": fin.port_in}, prev_addr="127.0.0.1")
        await rt.init(InitRequest(**{**fields, **init_fields}))
        return await _load_and_connect(rt, run_id, weights, got) if connect else None

    try:
        yield rt, cfg, config, start_run
    finally:
        server.close()
        await rt.close()


# ---- data plane: the test as the finisher's previous node and next node ---------
@contextlib.asynccontextmanager
async def fake_upstream(ring: Ring, run_id: int, token: str = TOKEN, **init_over):
    """Configure the ring's finisher for a run whose previous and next node are this
    test: listen where the starter would (answering nothing but the handshake), /init,
    /weights, /connect. Yields an httpx client; the finisher is left ready for a data
    connection. On exit the run is stopped."""
    fin = ring.fin.spec
    back: list[asyncio.StreamWriter] = []

    async def on_finisher(reader, writer):
        try:
            await challenge(reader, writer, TOKEN, run_id, 3.0)
            back.append(writer)
        except Exception:  # noqa: BLE001 - the test will see the /connect fail
            writer.close()

    server = await asyncio.start_server(on_finisher, ring.config.starter.addr,
                                        ring.config.starter.port_in)
    try:
        async with httpx.AsyncClient(headers=auth(), timeout=HTTP_TIMEOUT) as http:
            r = await http.post(fin.url + "/init", json=init_body(ring, run_id, **init_over))
            assert r.status_code == 200, r.text
            r = await http.put(f"{fin.url}/weights/{run_id}", content=weights_for(ring))
            assert r.status_code == 200, r.text
            r = await http.post(fin.url + "/connect", json={"run_id": run_id})
            assert r.status_code == 200, r.text
            try:
                yield http
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    await http.post(fin.url + "/stop", json={"run_id": run_id})
    finally:
        for w in back:
            w.close()
        server.close()


async def open_data(spec: NodeSpec, run_id: int, token: str = TOKEN, handshake: bool = True):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(spec.addr, spec.port_in), 3.0)
    if handshake:
        await answer(reader, writer, token, run_id, 3.0)
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the peer closes the connection (EOF or reset) within timeout."""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                return True
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False


def raw_frame(kind: int = Kind.DECODE, run_id: int = 1, *, magic: bytes = b"MDI\x00",
              version: int = 1, dtype: int = 1, shape: tuple[int, ...] = (1, 1, 32), sample: int = 0,
              position: int = 0, length: int | None = None, payload: bytes | None = None) -> bytes:
    """A frame with any header field set by hand (float32 payload of the shape by default)."""
    from mdi.ring.protocol.wire import HEADER

    n = 1
    for d in shape:
        n *= d
    if payload is None:
        payload = b"\x00" * (4 * n)
    dims = list(shape) + [0] * (3 - len(shape))
    header = HEADER.pack(magic, version, kind, dtype, len(shape), run_id, sample, position, *dims,
                         len(payload) if length is None else length)
    return header + payload


def read_raw_frame(sock: socket.socket) -> Frame:
    """Blocking read of one frame without run limits (handshake frames)."""
    from mdi.ring.protocol.wire import build_frame, check_header

    head = _recv_exact(sock, HEADER_SIZE)
    h = parse_header(head)
    check_header(h, None)
    return build_frame(h, _recv_exact(sock, h.length))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


# ---- the CLI in this process ---------------------------------------------------
def run_cli(*argv) -> tuple[int, str, str]:
    """mdi.cli.main.main(argv) with stdout/stderr captured: (exit code, stdout, stderr)."""
    from mdi.cli.main import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:
                rc = e.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return rc, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """The `mdi ...: error:` lines of a command's stderr (log lines left out)."""
    return [line for line in err.splitlines() if line.startswith("mdi ")]


# ---- processes and ports after a run ---------------------------------------------
def port_free(addr: str, port: int) -> bool:
    """Can a server bind this port now (with SO_REUSEADDR, as asyncio and uvicorn do)?"""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
        s.listen(1)
        return True
    except OSError:
        return False
    finally:
        s.close()


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of pids is alive; return those still alive after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def find_nodes_file(tmpdir: Path, timeout: float = 60.0) -> Path:
    """The nodes.json that `mdi run` (with TMPDIR=tmpdir) wrote for its cluster."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(tmpdir.glob("mdi-run-*/nodes.json"))
        if found and found[0].stat().st_size > 0:
            with contextlib.suppress(json.JSONDecodeError):
                json.loads(found[0].read_text())
                return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"mdi run wrote no nodes file under {tmpdir}")
        time.sleep(0.05)


def raw_http(addr: str, port: int, head: str, timeout: float = 5.0) -> tuple[int, str]:
    """Send a request head (no body) on a raw socket; return (status, body) of the answer,
    which must come without the body ever being sent."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head_part, _, body = data.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:])
                       if k.lower() == "content-length"), 0)
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), body.decode(errors="replace")


def port_released(addr: str, port: int) -> tuple[bool, list[str]]:
    """Is a port free for a new server? A bind (with SO_REUSEADDR, as asyncio and uvicorn
    do) succeeds, or whatever holds it is not a process of ours. On a shared machine a
    freed port in the ephemeral range may at once be taken by any connect() or bind(0)
    of other programs, some in other PID namespaces (psutil shows them with pid None);
    that says nothing about us. A listener of a process we can see is a failure."""
    if port_free(addr, port):
        return True, []
    holders = port_holders(port)
    return not any(h.startswith("LISTEN") and " pid None " not in h for h in holders), holders


def port_holders(port: int) -> list[str]:
    """Who has this local port (for failure messages)."""
    import psutil

    out = []
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port:
            name = "?"
            if c.pid:
                try:
                    name = " ".join(psutil.Process(c.pid).cmdline())[:120]
                except psutil.Error:
                    pass
            out.append(f"{c.status} {c.laddr} -> {c.raddr or '-'} pid {c.pid} {name}")
    return out
