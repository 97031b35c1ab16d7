"""Emulated hosts: one network namespace per node, veth pairs to a bridge, and
optionally a `tc tbf` rate cap on every link (netem is not available here).

Everything is created by this process under names unique to it and removed on
exit. Addresses come from 10.213.X.0/24, used only inside the namespaces this
module makes and on its bridge, so no traffic can leave the machine.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def check_netns() -> None:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsUnavailable("--hosts netns needs the `ip` and `tc` commands (iproute2)")
    if os.geteuid() != 0:
        raise NetnsUnavailable("--hosts netns needs root (it creates network namespaces)")
    name = f"mdichk{os.getpid() % 100000}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        raise NetnsUnavailable(f"cannot create a network namespace: {r.stderr.strip()}")
    _ip("netns", "del", name, check=False)


def tbf_args(rate: str) -> list[str]:
    """tbf settings for a rate like '100mbit': a burst that holds a GSO packet."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for suffix, mult in units.items():
        if rate.endswith(suffix):
            try:
                bits = float(rate[: -len(suffix)]) * mult
            except ValueError:
                break
            burst = max(65536 + 1514, int(bits / 8 / 100))  # >= 10 ms of traffic
            return ["tbf", "rate", rate, "burst", str(burst), "latency", "1s"]
    raise ValueError(f"--link-rate must look like 10mbit, 100mbit or 1gbit, got {rate!r}")


class NetnsHosts:
    """n hosts (namespaces) on a bridge; host i has address `addrs[i]`."""

    def __init__(self, n: int, link_rate: str | None = None) -> None:
        self.n = n
        self.link_rate = link_rate
        tag = os.getpid() % 10000
        self.subnet = 10 + tag % 200
        self.bridge = f"mdibr{tag}"
        self.namespaces = [f"mdi{tag}h{i}" for i in range(n)]
        self.addrs = [f"10.213.{self.subnet}.{i + 1}" for i in range(n)]
        self.host_addr = f"10.213.{self.subnet}.254"
        self._veths: list[str] = []

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    def __enter__(self) -> "NetnsHosts":
        check_netns()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addrs)):
            outer, inner = f"{self.bridge}v{i}", f"{self.bridge}p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._veths.append(outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.link_rate:
                shape = tbf_args(self.link_rate)
                subprocess.run(["tc", "qdisc", "add", "dev", outer, "root", *shape], check=True,
                               capture_output=True)
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner,
                                "root", *shape], check=True, capture_output=True)
        log.info("created %d namespaces on %s (%s), link rate %s", self.n, self.bridge,
                 ", ".join(self.addrs), self.link_rate or "unlimited")

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        for v in self._veths:
            _ip("link", "del", v, check=False)
        _ip("link", "del", self.bridge, check=False)
