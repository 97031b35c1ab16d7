"""`mdi run`: secondary nodes as child processes on this machine.

The cluster picks free loopback ports, writes a nodes file, generates a token,
starts `mdi node` children and waits until they answer. Leaving the `with`
block (normally, on Ctrl-C, SIGTERM or an error) shuts every child down: a
polite /shutdown, then SIGTERM, then SIGKILL. Children also get SIGTERM from
the kernel if this process dies (PR_SET_PDEATHSIG), so none are orphaned.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

from .auth import ENV_VAR, new_token
from .nodes_config import NodesConfig, local_nodes_config

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def free_ports(n: int, addr: str = "127.0.0.1") -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((addr, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def default_threads(n_nodes: int) -> int:
    """Divide this machine's cores among the local nodes (starter included)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // n_nodes)


class LocalCluster:
    def __init__(self, n_nodes: int, threads: int | None = None, chunks: list[str] | None = None,
                 startup_timeout: float = 60.0, node_timeout: float = 10.0,
                 ports: list[int] | None = None, extra_env: dict[str, str] | None = None,
                 addrs: list[str] | None = None, prefixes: list[list[str]] | None = None,
                 affinity: list[list[int]] | None = None) -> None:
        """addrs, prefixes and affinity are per node, index 0 being the starter (this
        process): node addresses, a command prefix that starts each secondary (e.g.
        `ip netns exec NS`), and the CPUs each node is pinned to."""
        if n_nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {n_nodes}")
        self.n_nodes = n_nodes
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
        self.procs: list[subprocess.Popen] = []
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
        ports = self.ports or free_ports(2 * self.n_nodes)  # loopback: free there, so free anywhere
        self.nodes = local_nodes_config(self.n_nodes, ports, self.addrs)
        path = self.dir / "nodes.json"
        path.write_text(json.dumps(self.nodes.to_dict(), indent=2))
        env = {**os.environ, ENV_VAR: self.token, "OMP_WAIT_POLICY": "PASSIVE", **self.extra_env}
        for i, spec in enumerate(self.nodes.secondaries, start=1):
            prefix = self.prefixes[i] if self.prefixes else []
            cmd = [*prefix, sys.executable, "-m", "mdi.cli.main", "node", "--nodes-config", str(path),
                   "--role", spec.role, "--index", str(spec.index), "--threads", str(self.threads),
                   "--timeout", str(self.node_timeout)]
            if self.chunks:
                cmd += ["--chunk", self.chunks[i]]
            logf = (self.dir / f"node{i}.log").open("wb")
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                               stderr=subprocess.STDOUT, env=env,
                                               preexec_fn=_child_setup(
                                                   self.affinity[i] if self.affinity else None)))
            logf.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.nodes is not None
        deadline = time.monotonic() + self.startup_timeout
        for i, (spec, proc) in enumerate(zip(self.nodes.secondaries, self.procs), start=1):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"local {spec.name} exited with status {proc.returncode}:\n"
                                       + self.log_tail(i))
                try:
                    if httpx.get(spec.url + "/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"local {spec.describe()} did not start within "
                                       f"{self.startup_timeout:g} s:\n" + self.log_tail(i))
                time.sleep(0.1)

    def log_tail(self, i: int, lines: int = 20) -> str:
        p = self.dir / f"node{i}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    def stop(self) -> None:
        if self.nodes is not None:
            for spec, proc in zip(self.nodes.secondaries, self.procs):
                if proc.poll() is None:
                    try:
                        httpx.post(spec.url + "/shutdown", timeout=1.0,
                                   headers={"Authorization": f"Bearer {self.token}"})
                    except httpx.HTTPError:
                        pass
        for proc in self.procs:
            _reap(proc)
        self.procs = []
        self.tmp.cleanup()


def _reap(proc: subprocess.Popen) -> None:
    for sig, wait in ((None, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
