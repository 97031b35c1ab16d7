"""What this process's control groups allow it: CPUs (a CFS quota) and memory (a
limit), cgroup v1 or v2, read from /proc/self/cgroup and the hierarchy under
/sys/fs/cgroup. A node in a container or a `systemd-run -p MemoryMax=` scope
sees the host's free memory in /proc/meminfo; what it may really take before
the kernel's OOM killer ends it is the group's limit less what the group uses.

Memory in use counts what the kernel cannot simply drop: usage less the
inactive file pages (the page cache a read of a checkpoint leaves behind is
reclaimed before the group goes out of memory), as `docker stats` and the
kubelet's working set count it. A limit set on an ancestor group binds too
(v1: memory.stat's hierarchical_memory_limit; v2: the least memory.max on
the path up to the root).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # v1 reports "no limit" as a number near 2**63


@dataclass(frozen=True)
class GroupMemory:
    limit: int   # bytes the group may hold
    used: int    # bytes it holds that reclaim cannot drop
    where: str   # the group, for messages

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)


def _groups(proc_cgroup: Path) -> list[tuple[list[str], str]]:
    """(controllers, path) of each line of /proc/self/cgroup ([] for v2's unified line)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append(([c for c in parts[1].split(",") if c], parts[2]))
    return out


def _v1_dir(root: Path, controller: str, controllers: list[str], path: str) -> Path:
    """A v1 hierarchy's group directory: mounted at ROOT/<controllers joined> or
    ROOT/<controller> (a symlink to it on most systems)."""
    base = root / ",".join(controllers)
    if not base.exists():
        base = root / controller
    return base / path.lstrip("/")


def _stat(d: Path, name: str) -> dict[str, int]:
    out = {}
    for line in (d / name).read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def cgroup_cpu_limit(root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """CPUs allowed by this process's cgroup CPU quota (v1 or v2), None when unlimited."""
    for controllers, path in _groups(proc_cgroup):
        try:
            if not controllers:  # cgroup v2
                quota, period = (root / path.lstrip("/") / "cpu.max").read_text().split()
                if quota != "max":
                    return int(quota) / int(period)
            elif "cpu" in controllers:
                d = _v1_dir(root, "cpu", controllers, path)
                quota = int((d / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    return quota / int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


def cgroup_memory(root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
                  ) -> GroupMemory | None:
    """This process's memory group's limit and use; None when no limit applies
    (or the files cannot be read: then the host's figures are all there is)."""
    for controllers, path in _groups(proc_cgroup):
        try:
            if not controllers:
                found = _v2_memory(root, path)
            elif "memory" in controllers:
                found = _v1_memory(_v1_dir(root, "memory", controllers, path))
            else:
                continue
        except (OSError, ValueError):
            continue
        if found is not None:
            return found
    return None


def _v1_memory(d: Path) -> GroupMemory | None:
    stat = _stat(d, "memory.stat")
    limit = stat.get("hierarchical_memory_limit", int((d / "memory.limit_in_bytes").read_text()))
    if limit >= UNLIMITED:
        return None
    usage = int((d / "memory.usage_in_bytes").read_text())
    used = usage - stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return GroupMemory(limit, max(0, used), f"cgroup {d}")


def _v2_memory(root: Path, path: str) -> GroupMemory | None:
    d = root / path.lstrip("/")
    if not (d / "memory.current").exists():
        return None  # no memory controller on this group
    limit = None
    here = d
    while True:  # the least limit on the way up binds
        f = here / "memory.max"
        if f.exists():
            text = f.read_text().strip()
            if text != "max":
                limit = int(text) if limit is None else min(limit, int(text))
        if here == root or root not in here.parents:
            break
        here = here.parent
    if limit is None:
        return None
    usage = int((d / "memory.current").read_text())
    used = usage - _stat(d, "memory.stat").get("inactive_file", 0)
    return GroupMemory(limit, max(0, used), f"cgroup {d}")
