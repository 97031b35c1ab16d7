"""A node's CPU and memory limits from its control groups (v1 and v2), read from
fake hierarchies; and, where this machine allows it, from a real v1 memory group."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdi.ring.plan.cgroups import cgroup_cpu_limit, cgroup_memory

MB = 1 << 20


def _write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc_cgroup"
    p.write_text(text)
    return p


def test_v1_memory_limit_less_the_working_set(tmp_path):
    root = tmp_path / "fs"
    _write(root / "memory" / "box", memory__limit_in_bytes=str(700 * MB),
           memory__usage_in_bytes=str(300 * MB),
           memory__stat=f"cache 1\nhierarchical_memory_limit {700 * MB}\n"
                        f"total_inactive_file {100 * MB}\n")
    proc = _proc(tmp_path, "4:memory:/box\n3:cpu,cpuacct:/\n")
    got = cgroup_memory(root, proc)
    assert (got.limit, got.used, got.free) == (700 * MB, 200 * MB, 500 * MB)
    assert "box" in got.where


def test_v1_parent_limit_binds(tmp_path):
    root = tmp_path / "fs"
    unlimited = str(9223372036854771712)
    _write(root / "memory" / "parent" / "child", memory__limit_in_bytes=unlimited,
           memory__usage_in_bytes=str(10 * MB),
           memory__stat=f"hierarchical_memory_limit {256 * MB}\n")
    got = cgroup_memory(root, _proc(tmp_path, "4:memory:/parent/child\n"))
    assert (got.limit, got.free) == (256 * MB, 246 * MB)


def test_v1_no_limit(tmp_path):
    root = tmp_path / "fs"
    unlimited = str(9223372036854771712)
    _write(root / "memory", memory__limit_in_bytes=unlimited, memory__usage_in_bytes="5",
           memory__stat=f"hierarchical_memory_limit {unlimited}\n")
    assert cgroup_memory(root, _proc(tmp_path, "4:memory:/\n")) is None


def test_v2_least_limit_on_the_way_up(tmp_path):
    root = tmp_path / "fs"
    _write(root / "a", memory__max=str(512 * MB))
    _write(root / "a" / "b", memory__max="max", memory__current=str(64 * MB),
           memory__stat=f"anon 1\ninactive_file {16 * MB}\n")
    got = cgroup_memory(root, _proc(tmp_path, "0::/a/b\n"))
    assert (got.limit, got.used, got.free) == (512 * MB, 48 * MB, 464 * MB)
    _write(root / "a" / "b", memory__max=str(128 * MB))
    assert cgroup_memory(root, _proc(tmp_path, "0::/a/b\n")).limit == 128 * MB


def test_v2_unlimited_or_unreadable(tmp_path):
    root = tmp_path / "fs"
    _write(root / "a", memory__max="max", memory__current="1", memory__stat="")
    assert cgroup_memory(root, _proc(tmp_path, "0::/a\n")) is None
    assert cgroup_memory(root, _proc(tmp_path, "0::/missing\n")) is None
    assert cgroup_memory(root, tmp_path / "no-such-file") is None


def test_cpu_quota_v1_and_v2(tmp_path):
    root = tmp_path / "fs"
    _write(root / "cpu,cpuacct" / "n", cpu__cfs_quota_us="30000", cpu__cfs_period_us="100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "3:cpu,cpuacct:/n\n")) == pytest.approx(0.3)
    _write(root / "v2", cpu__max="max 100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/v2\n")) is None
    _write(root / "v2", cpu__max="150000 100000")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "0::/v2\n")) == pytest.approx(1.5)


@pytest.mark.slow
def test_a_real_memory_group_caps_what_a_node_reports(tmp_path):
    base = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (base / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory")
    d = base / f"mdi-test-{os.getpid()}"
    try:
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(600 * MB))
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    try:
        code = ("from mdi.ring.plan.capability import node_capabilities as c; "
                "caps = c('cpu'); print(caps['budget_bytes'], caps['memory_total_bytes'])")
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
            preexec_fn=lambda: (d / "cgroup.procs").write_text(str(os.getpid())))
        budget, total = map(int, out.stdout.split())
        assert total == 600 * MB
        assert 0 < budget < 600 * MB  # the limit less what the interpreter and torch took
    finally:
        d.rmdir()


# ---- mdi bench --node-mem -------------------------------------------------------
def test_parse_mem_limits():
    from mdi.bench.cgroup import parse_mem_limits

    assert parse_mem_limits("700M,1GiB") == [700 * 10**6, 1 << 30]
    for bad in ("700M,x", "1M", ""):
        with pytest.raises(ValueError, match="--node-mem"):
            parse_mem_limits(bad)


def test_mem_caps_one_group_per_process_and_clean_up(tmp_path, monkeypatch):
    from mdi.bench.cgroup import MemCaps

    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712")
    (tmp_path / "cgroup.procs").write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with MemCaps([700 * MB, 300 * MB], root=tmp_path) as caps:
        caps.join("ring2-node1", 1, 111)
        caps.join("ring3-node1", 1, 222)  # another cluster's node 1: a group of its own
        a, b = caps.dirs["ring2-node1"], caps.dirs["ring3-node1"]
        assert a != b
        assert (a / "memory.limit_in_bytes").read_text() == str(300 * MB)
        assert (a / "cgroup.procs").read_text() == "111" and (b / "cgroup.procs").read_text() == "222"
        assert caps.group("single-run0", 0).name.endswith("single-run0")
        assert (caps.dirs["single-run0"] / "memory.limit_in_bytes").read_text() == str(700 * MB)
        for d in caps.dirs.values():  # a real cgroup directory's files vanish with it
            for f in d.iterdir():
                f.unlink()
    assert not any(p.name.startswith("mdi-bench-") for p in tmp_path.iterdir())


def test_bench_config_needs_a_limit_per_node():
    from mdi.bench.runner import BenchConfig

    with pytest.raises(ValueError, match="--node-mem gives 2 limit"):
        BenchConfig(model_size="tiny", nodes=[3], node_mem=[MB << 9, MB << 9])


# ---- one device refused up front, with the numbers ------------------------------
def test_a_model_larger_than_the_room_is_refused_before_loading(tiny_ckpt, monkeypatch):
    from mdi.checkpoint import open_checkpoint
    from mdi.cli.common import UsageError
    from mdi.cli.preflight import check_fits_here
    from mdi.ring.plan import placement
    from mdi.ring.plan.capability import stage_memory
    from mdi.ring.plan.limits import DeviceMemory

    ck = open_checkpoint(tiny_ckpt)
    mem = stage_memory(ck.config, 2)
    need = mem.embed_bytes + mem.head_bytes + ck.config.n_layer * mem.block_bytes
    room = DeviceMemory(need, 1 << 40, "memory left under the cgroup /x limit")
    monkeypatch.setattr(placement, "free_memory", lambda device: room)
    check_fits_here(ck, 2)  # exactly enough
    room = DeviceMemory(need - 1, 1 << 40, "memory left under the cgroup /x limit")
    with pytest.raises(UsageError, match=r"this device would need .* MiB .*2 sequence\(s\).* "
                                         r"it has .* MiB \(memory left under the cgroup /x limit\)"):
        check_fits_here(ck, 2)
    check_fits_here(ck, 1)  # one sequence's cache less: fits
