"""Slow and small devices, emulated for real: a CPU quota per node with cgroup v1's CFS
bandwidth (`--node-cpu`) and a memory limit per node (`--node-mem`, below).

`--slow-at TOKEN:NODE:SHARE` changes node NODE's quota to SHARE once every
sample has TOKEN tokens (the worker writes it; the bench restores the shares
before the next run): a device that slows down mid-run.

`mdi bench --node-cpu 1,1,0.3` puts each node (starter first) in its own cgroup
under /sys/fs/cgroup/cpu with `cpu.cfs_quota_us / cpu.cfs_period_us` equal to
its share of one core: 0.3 runs 3 ms in every 10 ms. The period is 10 ms, not
the kernel's 100 ms, so a node's work is throttled in small slices (a decode
step of a small model takes milliseconds; a 100 ms period would let it run
at full speed for 30 ms and then stall for 70). Needs root and a cgroup v1
cpu hierarchy; without them `CpuCapsUnavailable` says why, and the bench
skips. The groups are removed on exit (their processes have ended by then,
or are moved back to the root group first).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000
MIN_SHARE = 0.1   # the kernel's least quota is 1 ms


class CgroupUnavailable(RuntimeError):
    """This machine or user cannot cap CPUs or memory with cgroup v1."""


CpuCapsUnavailable = CgroupUnavailable


def parse_shares(text: str) -> list[float]:
    """'1,1,0.3' -> [1.0, 1.0, 0.3]; each share in [0.1, number of cores]."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--node-cpu must be comma-separated CPU shares, e.g. 1,1,0.3; "
                         f"got {text!r}") from None
    cores = len(os.sched_getaffinity(0))
    bad = [s for s in shares if not MIN_SHARE <= s <= cores]
    if not shares or bad:
        raise ValueError(f"--node-cpu: every share must be between {MIN_SHARE} and {cores} "
                         f"(this machine's cores), got {text!r}")
    return shares


def parse_slow_at(text: str) -> tuple[int, int, float]:
    """'100:2:0.2' -> (token 100, node 2, share 0.2): `--slow-at`, node 0 the starter."""
    parts = text.split(":")
    try:
        token, node, share = int(parts[0]), int(parts[1]), float(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"--slow-at must be TOKEN:NODE:SHARE, e.g. 100:2:0.2 (at token 100, "
                         f"node 2's CPU share becomes 0.2 of a core); got {text!r}") from None
    if token < 1 or node < 0 or not MIN_SHARE <= share <= len(os.sched_getaffinity(0)):
        raise ValueError(f"--slow-at {text}: the token must be >= 1, the node >= 0 (0: the "
                         f"starter) and the share between {MIN_SHARE} and this machine's cores")
    return token, node, share


def quota_us(share: float) -> int:
    """A share of one core as cpu.cfs_quota_us over PERIOD_US."""
    return int(round(share * PERIOD_US))


class CpuCaps:
    """One cgroup per node; `with CpuCaps([1, 1, 0.3]) as caps: caps.join(i, pid)`."""

    def __init__(self, shares: list[float], root: Path = CPU_ROOT) -> None:
        self.shares = shares
        self.root = root
        self.dirs: list[Path] = []

    def check(self) -> None:
        if os.geteuid() != 0:
            raise CpuCapsUnavailable("--node-cpu needs root (it writes cgroup v1 files under "
                                     f"{self.root})")
        if not (self.root / "cpu.cfs_quota_us").exists():
            raise CpuCapsUnavailable(f"--node-cpu needs a cgroup v1 cpu hierarchy at {self.root} "
                                     "(cpu.cfs_quota_us not found; cgroup v2-only systems are "
                                     "not supported)")

    def __enter__(self) -> "CpuCaps":
        self.check()
        try:
            for i, share in enumerate(self.shares):
                d = self.root / f"mdi-bench-{os.getpid()}-node{i}"
                d.mkdir(exist_ok=True)
                self.dirs.append(d)
                (d / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (d / "cpu.cfs_quota_us").write_text(str(quota_us(share)))
        except OSError as e:
            self.__exit__()
            raise CpuCapsUnavailable(f"--node-cpu: cannot set up a cgroup under {self.root}: "
                                     f"{e}") from None
        log.info("CPU shares per node (starter first): %s", self.shares)
        return self

    def quota_file(self, i: int) -> Path:
        """Node i's cpu.cfs_quota_us (`--slow-at`: the worker writes it mid-run)."""
        return self.dirs[i] / "cpu.cfs_quota_us"

    def restore(self) -> None:
        """Every node back at its own share (after a run that slowed one)."""
        for i, share in enumerate(self.shares):
            self.quota_file(i).write_text(str(quota_us(share)))

    def join(self, i: int, pid: int) -> None:
        """Move process pid (all its threads) into node i's group."""
        (self.dirs[i] / "cgroup.procs").write_text(str(pid))

    def join_self(self, i: int) -> None:
        """For a child between fork and exec: put itself in node i's group."""
        self.join(i, os.getpid())

    def __exit__(self, *exc) -> None:
        remove_groups(self.dirs, self.root)
        self.dirs = []


def remove_groups(dirs, root: Path) -> None:
    """Remove our cgroup directories, moving any process still in one back to root's."""
    for d in dirs:
        try:
            procs = d / "cgroup.procs"
            for pid in procs.read_text().split() if procs.exists() else []:
                (root / "cgroup.procs").write_text(pid)  # still running: back to root
            d.rmdir()
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", d, e)


# ---- memory -------------------------------------------------------------------
MEM_ROOT = Path("/sys/fs/cgroup/memory")


def parse_mem_limits(text: str) -> list[int]:
    """'700M,700M,1G' -> bytes per node (starter first)."""
    from ..ring.plan.limits import parse_size

    try:
        sizes = [parse_size(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--node-mem must be comma-separated sizes, e.g. 700M,700M,700M: {e}") \
            from None
    if not sizes or any(s < 64 << 20 for s in sizes):
        raise ValueError(f"--node-mem: every limit must be at least 64M (a Python process "
                         f"with torch takes more), got {text!r}")
    return sizes


class MemCaps:
    """A cgroup v1 memory limit per node process: every process its own group (the
    clusters of a bench each have a node i; they must not share one limit), so
    `join(key, i, pid)` makes group `key` with node i's limit. Without swap a
    process past its limit is killed by the kernel's OOM killer (the run fails
    and the bench says so); `peak(key)` is the group's high-water mark."""

    def __init__(self, limits: list[int], root: Path = MEM_ROOT) -> None:
        self.limits, self.root = limits, root
        self.dirs: dict[str, Path] = {}

    def check(self) -> None:
        if os.geteuid() != 0:
            raise CgroupUnavailable(f"--node-mem needs root (it writes cgroup v1 files under "
                                     f"{self.root})")
        if not (self.root / "memory.limit_in_bytes").exists():
            raise CgroupUnavailable(f"--node-mem needs a cgroup v1 memory hierarchy at "
                                     f"{self.root} (cgroup v2-only systems are not supported)")

    def __enter__(self) -> "MemCaps":
        self.check()
        log.info("memory limit per node (starter first): %s MiB",
                 ",".join(str(x >> 20) for x in self.limits))
        return self

    def group(self, key: str, i: int) -> Path:
        """Node i's group named key, made with its limit on first use."""
        d = self.dirs.get(key)
        if d is None:
            d = self.root / f"mdi-bench-{os.getpid()}-{key}"
            try:
                d.mkdir(exist_ok=True)
                (d / "memory.limit_in_bytes").write_text(str(self.limits[i]))
            except OSError as e:
                raise CgroupUnavailable(f"--node-mem: cannot set up a cgroup under "
                                         f"{self.root}: {e}") from None
            self.dirs[key] = d
        return d

    def join(self, key: str, i: int, pid: int) -> None:
        (self.group(key, i) / "cgroup.procs").write_text(str(pid))

    def peak_mb(self, key: str) -> float:
        d = self.dirs.get(key)
        try:
            return int((d / "memory.max_usage_in_bytes").read_text()) / 2**20 if d else float("nan")
        except OSError:
            return float("nan")

    def __exit__(self, *exc) -> None:
        remove_groups(self.dirs.values(), self.root)
        self.dirs = {}
