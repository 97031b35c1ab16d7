"""The node-side watchdog: a run whose starter goes silent without closing its link
is dropped after --idle-timeout, and the node takes the next run."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from cluster_helpers import (TOKEN, build_tiny_ckpt, closed_by_peer, fake_upstream, open_data,
                             run_cli, start_ring, status, wait_state)

IDLE = 1.5


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    root = tmp_path_factory.mktemp("watchdog")
    r = start_ring(root, build_tiny_ckpt(root / "ckpt"),
                   token_args=[["--idle-timeout", str(IDLE)]] * 2)
    yield r
    r.stop()


def _real_run(ring) -> None:
    rc, out, err = run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                           "--token", TOKEN, "--n-tokens", "4", "--temperature", "0", "--json")
    assert rc == 0, err[-3000:]
    assert json.loads(out)["n_tokens"] == 4


@pytest.mark.slow
def test_frozen_starter_is_dropped_after_the_idle_timeout(ring):
    fin = ring.fin.spec
    # a real run first: the node takes it (the watchdog does not drop a live run,
    # however long it lasts), and its first upload is out of the way (seconds on a
    # busy machine, longer than the fake starter's HTTP timeout)
    _real_run(ring)

    async def frozen_starter() -> tuple[float, bool]:
        async with fake_upstream(ring, 71):
            # connect, prove the token, then send nothing and keep the link open
            reader, writer = await open_data(fin, 71)
            t0 = time.monotonic()
            assert status(fin)["state"] == "running"
            closed = await closed_by_peer(reader, timeout=IDLE + 8)
            writer.close()
            return time.monotonic() - t0, closed

    elapsed, closed = asyncio.run(frozen_starter())
    assert closed and IDLE <= elapsed < IDLE + 5, elapsed
    wait_state(fin, "idle", timeout=5)
    last = status(fin)["last_run"]
    assert last["run_id"] == 71
    assert last["reason"].startswith(f"no frame for {IDLE:g} s (--idle-timeout)")
    assert "no frame for" in ring.fin.log()
    _real_run(ring)  # and takes the next run


@pytest.mark.slow
def test_configured_run_waits_for_its_previous_node(ring):
    """Before the previous node connects (uploads to other nodes may take long) the
    clock does not run."""
    fin = ring.fin.spec

    async def slow_starter() -> str:
        async with fake_upstream(ring, 72):
            await asyncio.sleep(IDLE + 1.0)
            return status(fin)["state"]

    assert asyncio.run(slow_starter()) == "ready"


def test_negative_idle_timeout_is_refused(tmp_path):
    rc, out, err = run_cli("node", "--nodes-config", tmp_path / "none.json", "--role", "finisher",
                           "--idle-timeout", "-1", "--token", TOKEN)
    assert rc != 0


@pytest.mark.slow
def test_sigstopped_starter_is_dropped_by_every_node(ring):
    """A real starter (an engine run, sequences in flight) frozen with SIGSTOP mid-run:
    every node drops the run after the idle timeout, without the starter closing a link."""
    import os
    import signal
    import subprocess

    from cluster_helpers import child_env, mdi_cmd

    marks = [n.log_mark() for n in ring.procs]
    proc = subprocess.Popen(mdi_cmd("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                                    "--n-tokens", "100000", "--n-samples", "2", "--timeout", "60"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=child_env(MDI_TOKEN=TOKEN))
    try:
        for n in ring.procs:
            wait_state(n.spec, "running", timeout=60)
        proc.stdout.read(20)  # text is coming: sequences are in flight
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for n in ring.procs:
            wait_state(n.spec, "idle", timeout=IDLE + 10)
        assert time.monotonic() - t0 < IDLE + 10
        # one node times out first and closes its links; the others may see that first
        assert any("(--idle-timeout)" in n.log()[m:] for n, m in zip(ring.procs, marks))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
