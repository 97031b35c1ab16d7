"""`mdi run`: secondary nodes as child processes on this machine.

The cluster picks free loopback ports, writes a nodes file, generates a token,
starts `mdi node` children and waits until they answer. Leaving the `with`
block (normally, on Ctrl-C, SIGTERM or an error) shuts every child down: a
polite /shutdown to all, then SIGTERM, then SIGKILL, each to the child's whole
process group (a command prefix may have started more than one process), with
one shared deadline per step, so a child that ignores /shutdown or is frozen
costs seconds, not minutes. SIGINT and SIGTERM are held back while stopping,
so a second Ctrl-C cannot leave children behind. Children also get SIGTERM
from the kernel if the thread that started them dies (PR_SET_PDEATHSIG), so
none are orphaned even when this process is SIGKILLed.

With `restart=True` (`mdi serve`) a child that dies while the cluster runs is
started again on the same ports after a pause (RESTART_DELAY_S, doubling up to
RESTART_MAX_DELAY_S while it keeps dying): the ring engine sees it answer again
and takes it back (ring_engine.py, "nodes that come back").
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import httpx

from ..protocol.auth import ENV_VAR, new_token
from .nodes_config import NodesConfig, NodeSpec, local_nodes_config

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# What one idle `mdi node` process takes before any weights (Python, torch, the node
# runtime): 49 of them took 5 GB on this machine, ~105 MB each; rounded up.
NODE_PROCESS_BYTES = 128 * 2**20
RESTART_DELAY_S = 1.0        # a dead local node is started again after this (restart=True) ...
RESTART_MAX_DELAY_S = 60.0   # ... doubling while it keeps dying, up to this
RESTART_STABLE_S = 60.0      # a node that ran this long starts from RESTART_DELAY_S again


def check_local_ring(n_nodes: int, n_layer: int, spares: int = 0, weight_bytes: int = 0,
                     available_bytes: int | None = None) -> None:
    """What can be known before any node process starts: ValueError naming the option.

    Each node of the ring holds at least one layer; the local ring's processes and the
    model's weights (weight_bytes, in the run's dtype) must fit the memory the machine
    reports (available_bytes; None: not checked).
    """
    if n_nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {n_nodes}")
    if n_nodes > n_layer:
        raise ValueError(f"--nodes {n_nodes}: the model has {n_layer} layers and every node holds "
                         f"at least one; use --nodes 1 to {n_layer}")
    if spares < 0 or (spares and n_nodes < 2):
        raise ValueError(f"--spares must be 0, or positive with --nodes 2 or more; got "
                         f"{spares} with --nodes {n_nodes}")
    processes = n_nodes - 1 + spares
    need = weight_bytes + processes * NODE_PROCESS_BYTES
    if available_bytes is not None and need > available_bytes:
        raise ValueError(f"--nodes {n_nodes}: {processes} node process(es) and the model's "
                         f"weights need about {need / 2**20:,.0f} MiB, the machine reports "
                         f"{available_bytes / 2**20:,.0f} MiB available")


def free_ports(n: int, addr: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free on addr now.

    They are drawn outside the kernel's ephemeral range when there is room: a
    port from that range, once released here, can be taken as the source port
    of any outgoing connection on the machine before the node that should
    listen on it has started.
    """
    lo, _ = _ephemeral_range()
    pool = range(10000, lo) if lo - 10000 >= 1000 else None
    rng = random.Random()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    socks: list[socket.socket] = []
    ports: list[int] = []
    tries = 0
    try:
        while len(ports) < n:
            tries += 1
            port = rng.choice(pool) if pool is not None and tries <= 50 * n else 0
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.bind((addr, port))
            except OSError:
                s.close()
                if tries > 100 * n:
                    raise
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def child_setup(cpus: list[int] | None) -> Callable[[], None]:
    """A preexec_fn for a child of this process: its own process group (so it can be
    signalled as a whole), SIGTERM when this thread dies, pinned to cpus if given."""
    parent = os.getpid()

    def setup() -> None:  # runs in the child between fork and exec
        os.setpgid(0, 0)  # its own process group: stop() signals the group
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def wait_healthy(nodes: Sequence[tuple[NodeSpec, subprocess.Popen]], timeout: float,
                 log_tail: Callable[[int], str], interval: float = 0.1,
                 on_ready: Callable[[int], None] | None = None) -> None:
    """Wait until every node process answers /health (on_ready(i) as nodes[i] does).
    RuntimeError, with the tail of its log (log_tail(i) for nodes[i]), when one exits or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    for i, (spec, proc) in enumerate(nodes):
        if i and on_ready is not None:
            on_ready(i - 1)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"local {spec.name} exited with status {proc.returncode}:\n"
                                   + log_tail(i))
            try:
                if httpx.get(spec.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"local {spec.describe()} did not start within "
                                   f"{timeout:g} s:\n" + log_tail(i))
            time.sleep(interval)
    if nodes and on_ready is not None:
        on_ready(len(nodes) - 1)


def default_threads(n_nodes: int) -> int:
    """Divide this machine's cores among the local nodes (starter included)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // n_nodes)


class LocalCluster:
    def __init__(self, n_nodes: int, threads: int | None = None, chunks: list[str] | None = None,
                 startup_timeout: float = 60.0, node_timeout: float = 10.0,
                 ports: list[int] | None = None, extra_env: dict[str, str] | None = None,
                 addrs: list[str] | None = None, prefixes: list[list[str]] | None = None,
                 affinity: list[list[int]] | None = None, spares: int = 0,
                 on_ready: Callable[[int, int], None] | None = None,
                 restart: bool = False) -> None:
        """addrs, prefixes and affinity are per node, index 0 being the starter (this
        process): node addresses, a command prefix that starts each secondary (e.g.
        `ip netns exec NS`), and the CPUs each node is pinned to. spares: extra
        nodes on loopback, listed as the nodes file's spares (they join the ring
        when a node fails). on_ready(ready, total) as the node processes start answering
        (a start-up takes seconds per node on a busy machine: say so). restart: start a
        node process that dies again, on the same ports (see the module's docstring)."""
        if n_nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {n_nodes}")
        self.n_nodes = n_nodes
        self.n_spares = spares
        self.threads = threads or default_threads(n_nodes)
        self.chunks = chunks
        self.startup_timeout = startup_timeout
        self.node_timeout = node_timeout
        self.token = new_token()
        self.ports = ports
        self.extra_env = extra_env or {}
        self.addrs = addrs
        self.prefixes = prefixes
        self.affinity = affinity
        self.on_ready = on_ready
        self.procs: list[subprocess.Popen] = []
        self.stopping = False
        self.restart = restart
        self.restarts = 0                    # node processes started again after dying
        self._lock = threading.Lock()        # procs and stopping, between restarts and stop()
        self._stopped = threading.Event()    # wakes the restart waits at once
        self._launch: list[Callable[[], subprocess.Popen]] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="mdi-run-")
        self.nodes: NodesConfig | None = None

    @property
    def dir(self) -> Path:
        return Path(self.tmp.name)

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        # loopback: free there, so free anywhere
        ports = self.ports or free_ports(2 * (self.n_nodes + self.n_spares))
        self.nodes = local_nodes_config(self.n_nodes, ports, self.addrs, self.n_spares)
        path = self.dir / "nodes.json"
        path.write_text(json.dumps(self.nodes.to_dict(), indent=2))
        env = {**os.environ, ENV_VAR: self.token, "OMP_WAIT_POLICY": "PASSIVE", **self.extra_env}
        for i, spec in enumerate(self.members, start=1):
            prefix = self.prefixes[i] if self.prefixes and i < len(self.prefixes) else []
            cmd = [*prefix, sys.executable, "-m", "mdi.cli.main", "node", "--nodes-config", str(path),
                   "--role", spec.role, "--index", str(spec.index), "--threads", str(self.threads),
                   "--timeout", str(self.node_timeout)]
            if self.chunks and i < len(self.chunks):
                cmd += ["--chunk", self.chunks[i]]
            cpus = self.affinity[i] if self.affinity and i < len(self.affinity) else None
            self._launch.append(lambda cmd=cmd, i=i, cpus=cpus: self._popen(cmd, i, env, cpus))
            self.procs.append(self._launch[-1]())
            self._watch(i - 1, spec)
        self._wait_ready()

    def _popen(self, cmd: list[str], i: int, env: dict[str, str], cpus: list[int] | None
               ) -> subprocess.Popen:
        with (self.dir / f"node{i}.log").open("ab") as logf:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, preexec_fn=child_setup(cpus))

    def _watch(self, k: int, spec: NodeSpec) -> None:
        threading.Thread(target=self._reap, args=(k, spec), daemon=True,
                         name=f"reap-{spec.name}").start()

    def _reap(self, k: int, spec: NodeSpec) -> None:
        """Wait for a child from the moment it starts: one that dies mid-run (killed, crashed)
        is reaped at once, not left a zombie until the cluster ends, and its end is logged;
        with restart, it is started again, from this thread (a child gets SIGTERM when the
        thread that started it ends: PR_SET_PDEATHSIG), after a delay that doubles each
        time it dies within RESTART_STABLE_S of its start."""
        proc, delay = self.procs[k], RESTART_DELAY_S
        while True:
            t0 = time.monotonic()
            code = proc.wait()
            if self.stopping:
                return
            log.warning("local node %s (pid %d) exited with code %d; its log: %s%s", spec.name,
                        proc.pid, code, self.dir / f"node{k + 1}.log",
                        f", ending:\n{self.log_tail(k + 1, 8)}" if code > 0 else "")
            if not self.restart:
                return
            delay = RESTART_DELAY_S if time.monotonic() - t0 >= RESTART_STABLE_S else delay
            while True:  # until it starts (a fork can fail when memory is short: retry)
                log.warning("starting local node %s again in %g s", spec.name, delay)
                if self._stopped.wait(delay):
                    return
                delay = min(2 * delay, RESTART_MAX_DELAY_S)
                with self._lock:
                    if self.stopping:
                        return
                    try:
                        proc = self.procs[k] = self._launch[k]()
                    except OSError as e:
                        log.error("could not start local node %s: %s", spec.name, e)
                        continue
                    self.restarts += 1
                    break

    @property
    def members(self) -> list[NodeSpec]:
        """The node processes' specs: the secondaries, then the spares."""
        assert self.nodes is not None
        return [*self.nodes.secondaries, *self.nodes.spares]

    def _wait_ready(self) -> None:
        members = list(zip(self.members, self.procs))
        t0 = time.monotonic()
        on_ready = self.on_ready
        wait_healthy(members, self.startup_timeout, lambda i: self.log_tail(i + 1),
                     on_ready=None if on_ready is None else lambda i: on_ready(i + 1, len(members)))
        log.info("%d local node process(es) answer after %.1f s", len(members), time.monotonic() - t0)

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:  # (the directory may be going with the cluster)
            text = (self.dir / f"node{i}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pids(self) -> list[int]:
        """The secondary nodes' process ids (index 0 is the first secondary)."""
        return [p.pid for p in self.procs]

    def stop(self, grace: float = 3.0) -> None:
        """End every child, whatever state it is in; safe to call more than once."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._stop(grace)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _stop(self, grace: float) -> None:
        with self._lock:  # no restart after this
            self.stopping = True
        self._stopped.set()
        polite = []  # children that took /shutdown: they get `grace` to exit on their own
        if self.nodes is not None:
            for spec, proc in zip(self.members, self.procs):
                if proc.poll() is None:
                    try:
                        r = httpx.post(spec.url + "/shutdown", timeout=0.5,
                                       headers={"Authorization": f"Bearer {self.token}"})
                        if r.status_code == 200:
                            polite.append(proc)
                    except httpx.HTTPError:
                        pass  # frozen, dead or busy: the signals below deal with it
        rude = [p for p in self.procs if p not in polite]
        _terminate(rude)
        _wait_all(self.procs, grace)
        _terminate(self.procs)
        _wait_all(self.procs, grace)
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
        _wait_all(self.procs, grace)
        for p in self.procs:
            if p.poll() is None:  # unkillable (e.g. in uninterruptible sleep): say so
                log.error("local node process %d did not exit", p.pid)
        self.procs = []
        self.tmp.cleanup()


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGCONT so that a stopped (frozen) child handles it now."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
            _signal_group(p, signal.SIGCONT)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a live (not yet reaped) child's process group, whose id is the child's pid."""
    try:
        os.killpg(proc.pid, sig)  # the child leads its own group (see child_setup)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.poll() is not None:
            continue
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
