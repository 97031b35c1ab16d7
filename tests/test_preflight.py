"""Every check that needs no process runs before `--nodes N` starts one: one line, exit 2,
nothing spawned (the process table is looked at, and spawning itself is made to fail)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from mdi.ring.plan.limits import DeviceMemory

from cluster_helpers import run_cli
from mdi.ring.cluster import local_cluster
from mdi.ring.cluster.local_cluster import NODE_PROCESS_BYTES, check_local_ring

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"  # 6 layers


@pytest.fixture
def no_spawn(monkeypatch):
    """Any child process is a failure; returns the process table's children check."""
    def refuse(*a, **kw):
        raise AssertionError(f"a process was started: {a[0] if a else kw}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(local_cluster.subprocess, "Popen", refuse)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield lambda: {p.pid for p in psutil.Process().children(recursive=True)} - before


@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("nodes, needle", [
    (0, "--nodes must be at least 1, got 0"),
    (50, "--nodes 50: the model has 6 layers and every node holds at least one; use --nodes 1 to 6"),
    (7, "--nodes 7: the model has 6 layers"),
])
def test_node_count_is_checked_before_any_process(no_spawn, command, nodes, needle):
    t0 = time.monotonic()
    rc, out, err = run_cli(command, "--ckpt", BUNDLED, "--nodes", nodes)
    assert time.monotonic() - t0 < 3
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mdi {command}: error: {needle}"), err
    assert not no_spawn()


def test_serve_checks_the_node_count_before_binding_or_spawning(no_spawn):
    rc, out, err = run_cli("serve", "--ckpt", BUNDLED, "--nodes", 7, "--port", 1)
    assert rc == 2 and "--nodes 7: the model has 6 layers" in err and len(err.splitlines()) == 1
    assert not no_spawn()


def test_a_prompt_outside_the_vocabulary_is_refused_before_the_nodes_start(no_spawn):
    rc, out, err = run_cli("run", "--ckpt", BUNDLED, "--nodes", 3, "--prompt", "ROMEO: é")
    assert rc == 2 and err.startswith("mdi run: error: prompt 0:") and len(err.splitlines()) == 1
    assert not no_spawn()


def test_an_unreadable_checkpoint_is_refused_before_the_nodes_start(no_spawn, tmp_path):
    rc, out, err = run_cli("run", "--ckpt", tmp_path / "missing", "--nodes", 3)
    assert rc == 1 and "checkpoint directory not found" in err and len(err.splitlines()) == 1
    assert not no_spawn()


def test_memory_check_counts_processes_and_weights():
    check_local_ring(3, 6, 0, weight_bytes=10 * 2**20, available_bytes=2 * NODE_PROCESS_BYTES + 10 * 2**20)
    with pytest.raises(ValueError, match=r"--nodes 3: 2 node process\(es\) and the model's weights "
                                         r"need about 266 MiB, the machine reports 265 MiB"):
        check_local_ring(3, 6, 0, weight_bytes=10 * 2**20,
                         available_bytes=2 * NODE_PROCESS_BYTES + 9 * 2**20)
    with pytest.raises(ValueError, match="--spares must be 0"):
        check_local_ring(1, 6, spares=1)


def test_memory_the_machine_reports_is_checked(no_spawn, monkeypatch):
    monkeypatch.setattr("mdi.ring.plan.limits.free_memory",
                        lambda device: DeviceMemory(100 * 2**20, 2**30, "free system memory"))
    rc, out, err = run_cli("run", "--ckpt", BUNDLED, "--nodes", 3)
    assert rc == 2 and "the machine reports 100 MiB available" in err
    assert not no_spawn()
