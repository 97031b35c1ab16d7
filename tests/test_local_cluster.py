"""Local node processes (`mdi run --nodes N`, `mdi serve --nodes N`, the bench): one that
dies mid-run is reaped at once and its end logged, not left a zombie until the cluster ends."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from mdi.ring.cluster.local_cluster import LocalCluster

pytestmark = pytest.mark.slow


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), None once it is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _ended(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]


def test_a_node_killed_mid_run_is_reaped_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="mdi.ring.cluster.local_cluster"):
        with LocalCluster(2, threads=1) as cluster:
            (pid,) = cluster.pids
            assert _state(pid) not in (None, "Z")
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30  # a liveness bound on a loaded machine, not a timing
            while _state(pid) is not None or not _ended(caplog):
                assert time.monotonic() < deadline, f"node process {pid} left as {_state(pid)}"
                time.sleep(0.05)
            assert cluster.procs[0].returncode == -signal.SIGKILL
    assert _ended(caplog) == [f"local node finisher (pid {pid}) exited with code -9; its log: "
                     f"{cluster.dir / 'node1.log'}"]
