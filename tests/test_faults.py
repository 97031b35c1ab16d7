"""Faults on a real ring of processes on loopback: a node killed or frozen mid-run,
a node that never comes up or refuses its configuration, the starter killed
mid-run, `mdi run` interrupted, and 20 runs in a row against the same nodes.

Each fault must be detected within a bounded time, name the node, keep the text
produced so far, and leave no process, port or run state behind.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cluster_helpers import (TOKEN, build_tiny_ckpt, child_env, error_lines, find_nodes_file,
                             finisher_and_fake_starter,
                             health, mdi_cmd, port_released, resume_all, run_cli, start_ring,
                             status, wait_gone, wait_state, write_nodes_file)
from mdi.ring.cluster.local_cluster import free_ports
from mdi.ring.cluster.nodes_config import load_nodes_config, local_nodes_config
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import EXIT_NODE_FAILURE, RunOptions
from mdi.generate.sampling import SamplingConfig
from mdi.ring.protocol.wire import Kind

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=1)
PROMPTS = [[1, 2, 3], [4, 5], [6]]
LONG_RUN = "100000"  # tokens: a run that only ends when the test ends it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_ckpt(tmp_path_factory.mktemp("faults_ckpt"))


@pytest.fixture(scope="module")
def ring(tmp_path_factory, ckpt):
    r = start_ring(tmp_path_factory.mktemp("faults_ring"), ckpt)
    yield r
    r.stop()


def starter_run(ring, n_tokens: int = 8, timeout: float = 3.0):
    return Starter(ring.config, TOKEN, str(ring.ckpt), RunOptions(timeout=timeout)).run(
        PROMPTS, n_tokens, GREEDY)


# ---- `mdi run` with a node that dies or freezes ---------------------------------
def start_mdi_run(tmp_path: Path, ckpt: Path, *extra: str, n_tokens: str = LONG_RUN
                  ) -> subprocess.Popen:
    """`mdi run` on 3 nodes with its temp files under tmp_path (to find its nodes file).
    The failure tests pass --no-recover (test_recovery.py has the runs that go on)."""
    return subprocess.Popen(
        mdi_cmd("run", "--ckpt", ckpt, "--nodes", "3", "--n-tokens", n_tokens, "--threads", "1",
                "--temperature", "0", "--json", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(TMPDIR=str(tmp_path)))


def running_cluster(tmp_path: Path, proc: subprocess.Popen, timeout: float = 60.0):
    """Wait until `mdi run`'s nodes are mid-run; returns (nodes config, pids by role)."""
    try:
        nodes = load_nodes_config(find_nodes_file(tmp_path, timeout))
        for spec in nodes.secondaries:
            wait_state(spec, "running", timeout)
    except AssertionError:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"mdi run did not reach a running ring:\n{err[-3000:]}") from None
    pids = {spec.name: health(spec)["pid"] for spec in nodes.secondaries}
    return nodes, pids


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"mdi run hung for {timeout} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err, time.monotonic() - t0


def assert_all_released(nodes, pids: dict[str, int]) -> None:
    assert wait_gone(list(pids.values()), 10.0) == [], "a node process outlived `mdi run`"
    for spec in nodes.ring:
        for port in (spec.port, spec.port_in):
            ok, holders = port_released(spec.addr, port)
            assert ok, f"{spec.name} port {port} still bound: {holders}"


@pytest.mark.slow
@pytest.mark.parametrize("role", ["intermediate[0]", "finisher"])
def test_node_killed_mid_run_is_named_and_partial_text_kept(tmp_path, ckpt, role):
    proc = start_mdi_run(tmp_path, ckpt, "--timeout", "3", "--no-recover")
    nodes, pids = running_cluster(tmp_path, proc)
    time.sleep(0.3)  # let some tokens come back
    os.kill(pids[role], signal.SIGKILL)
    rc, out, err, elapsed = finish(proc, 30)

    assert rc == EXIT_NODE_FAILURE, err[-3000:]
    assert elapsed < 3 + 2 + 10, f"took {elapsed:.1f} s to notice and clean up"
    spec = next(s for s in nodes.secondaries if s.name == role)
    result = json.loads(out)
    assert f"{role} at {spec.addr}:{spec.port}" in result["error"]
    assert "stopped answering" in result["error"]
    assert result["failed_node"] == {"role": spec.role, "index": spec.index, "addr": spec.addr,
                                     "port": spec.port, "port_in": spec.port_in}
    assert len(result["samples"]) == 3 and any(result["samples"]), "the text so far is lost"
    assert 0 < result["n_tokens"] < int(LONG_RUN)
    (line,) = error_lines(err)
    assert line.startswith("mdi run: error: ") and f"{role} at {spec.addr}:{spec.port}" in line
    assert "Traceback" not in err
    assert_all_released(nodes, pids)


@pytest.mark.slow
def test_frozen_node_is_named_within_the_default_timeout(tmp_path, ckpt):
    """SIGSTOP: alive but silent. The default --timeout (<= 10 s) applies."""
    from mdi.cli.main import build_parser

    for cmd in (["run", "--ckpt", "x"], ["starter", "--ckpt", "x", "--nodes-config", "n"]):
        assert build_parser().parse_args(cmd).timeout <= 10
    assert RunOptions().timeout <= 10

    proc = start_mdi_run(tmp_path, ckpt, "--no-recover")  # no --timeout: the default
    nodes, pids = running_cluster(tmp_path, proc)
    time.sleep(0.3)
    os.kill(pids["finisher"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        rc, out, err, _ = finish(proc, 60)
    finally:
        resume_all(pids.values())
    elapsed = time.monotonic() - t0
    assert rc == EXIT_NODE_FAILURE, err[-3000:]
    spec = nodes.finisher
    result = json.loads(out)
    assert f"finisher at {spec.addr}:{spec.port}" in result["error"], result["error"]
    assert "stopped answering" in result["error"] and "no answer" in result["error"]
    assert any(result["samples"])
    # 10 s of silence, a 2 s health check, and LocalCluster.stop ending a frozen child
    assert elapsed < 10 + 2 + 8, f"took {elapsed:.1f} s"
    assert_all_released(nodes, pids)


# ---- configure-time failures ---------------------------------------------------------
def test_node_that_never_comes_up_is_named(tmp_path, ckpt):
    nodes = write_nodes_file(tmp_path / "nodes.json", local_nodes_config(3, free_ports(6)))
    cfg = load_nodes_config(nodes)
    t0 = time.monotonic()
    rc, out, err = run_cli("starter", "--ckpt", ckpt, "--nodes-config", nodes, "--token", TOKEN,
                           "--n-tokens", "4", "--timeout", "3")
    elapsed = time.monotonic() - t0
    assert rc == EXIT_NODE_FAILURE
    (line,) = error_lines(err)
    spec = cfg.secondaries[0]
    assert f"{spec.name} at {spec.addr}:{spec.port} did not come up after" in line, line
    assert elapsed < 15, f"retries took {elapsed:.1f} s"
    assert out == "" and "Traceback" not in err


@pytest.mark.slow
def test_node_refusing_init_fails_the_starter_in_one_line(tmp_path, ring):
    def bad_device(d: dict) -> None:
        d["nodes"]["finisher"]["device"] = "no-such-device:0"

    nodes = write_nodes_file(tmp_path / "nodes.json", ring.config, bad_device)
    rc, out, err = run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", nodes,
                           "--token", TOKEN, "--n-tokens", "4", "--timeout", "3")
    assert rc not in (0, None)
    (line,) = error_lines(err)
    fin = ring.config.finisher
    assert f"finisher at {fin.addr}:{fin.port} refused /init (HTTP 400): device:" in line, line
    assert out == "" and "Traceback" not in err
    # The intermediate had been configured: the starter released it.
    for spec in ring.config.secondaries:
        wait_state(spec, "idle", 5.0)
    assert starter_run(ring).n_tokens == 8


# ---- the starter dies --------------------------------------------------------------
@pytest.mark.slow
def test_starter_killed_mid_run_ring_returns_to_idle(tmp_path, ring):
    before = {n.spec.name: n.pid for n in ring.procs}
    proc = subprocess.Popen(
        mdi_cmd("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                "--n-tokens", LONG_RUN, "--threads", "1", "--timeout", "3", "--json"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=child_env(MDI_TOKEN=TOKEN))
    try:
        for spec in ring.config.secondaries:
            wait_state(spec, "running", 60.0)
        time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=10)
        for spec in ring.config.secondaries:
            took = wait_state(spec, "idle", 5.0)
            assert took < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    for n in ring.procs:
        assert n.proc.poll() is None and before[n.spec.name] == health(n.spec)["pid"]
        last = status(n.spec)["last_run"]
        assert last["reason"] != "run complete" and last["frames_in"] > 0
        assert status(n.spec)["stats"] is None  # no run state kept
    ring.inter.wait_log("the previous node closed the link")
    assert starter_run(ring).n_tokens == 8  # no restart needed


# ---- 20 runs on the same nodes -------------------------------------------------------
@pytest.mark.slow
def test_twenty_runs_keep_memory_threads_and_fds_flat(ring):
    import psutil

    me = psutil.Process()
    figures = []
    for i in range(20):
        result = starter_run(ring, n_tokens=6)
        assert result.n_tokens == 6 and all(len(t) == 6 for t in result.tokens)
        if i in (0, 4, 19):
            figures.append({"run": i + 1,
                            **{n.spec.name: {k: status(n.spec)[k] for k in
                                             ("rss_bytes", "os_threads", "open_fds")}
                               for n in ring.procs},
                            "starter_fds": me.num_fds()})
    print("\nresource figures:", json.dumps(figures))
    first, fifth, last = figures
    for n in ring.procs:
        a, b, c = first[n.spec.name], fifth[n.spec.name], last[n.spec.name]
        assert c["os_threads"] == a["os_threads"], (n.spec.name, a, c)
        assert c["open_fds"] <= a["open_fds"] + 1, (n.spec.name, a, c)
        # After warm-up, allocator noise only (a leak of one run's caches and weights
        # per run would show as steady growth well past this).
        assert c["rss_bytes"] - b["rss_bytes"] < 8 << 20, (n.spec.name, b, c)
        assert status(n.spec)["runs_completed"] >= 20
    assert last["starter_fds"] <= first["starter_fds"] + 1


# ---- `mdi run` interrupted: no orphans, no bound ports ------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_mdi_run_interrupted_leaves_no_process_or_port(tmp_path, ckpt, sig):
    proc = start_mdi_run(tmp_path, ckpt, "--timeout", "3")
    nodes, pids = running_cluster(tmp_path, proc)
    proc.send_signal(sig)
    rc, _, err, elapsed = finish(proc, 30)
    assert rc != 0
    if sig != signal.SIGKILL:
        assert "mdi: interrupted" in err, err[-2000:]
        assert elapsed < 10, f"cleanup took {elapsed:.1f} s"
    # SIGKILL: the children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
    assert_all_released(nodes, pids)


# ---- in-process: no exception from a frame kills the node's task silently -------------
# (cluster_helpers.finisher_and_fake_starter: layers 1..3 of the tiny model on a finisher)


@pytest.mark.parametrize("exc", [KeyError(7), RuntimeError("shape mismatch"), IndexError("x")])
def test_any_compute_error_drops_the_run_and_is_logged(ckpt, caplog, exc):
    """A stand-in for errors the header checks cannot see: the node logs the reason,
    closes the link, drops the run, and takes the next one."""
    from cluster_helpers import closed_by_peer, open_data
    from mdi.ring.protocol.wire import Frame, Kind, read_frame

    async def scenario() -> None:
        async with finisher_and_fake_starter(ckpt) as (rt, cfg, config, start_run):
            for run_id, fail in ((11, True), (12, False)):
                back_r, back_w = await start_run(run_id)
                if fail:
                    def boom(frame):
                        raise exc
                    rt.run.compute = boom  # this run's only: the next one computes
                reader, writer = await open_data(cfg.finisher, run_id)
                h = torch.zeros(1, 2, config.n_embd)
                writer.write(Frame(Kind.CONTEXT, run_id, 0, 0, h).encode())
                if fail:
                    assert await closed_by_peer(reader)  # link dropped
                    assert rt.run is None and rt.state == "idle"
                    assert type(exc).__name__ in rt.last_stats["reason"]
                else:
                    tok = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
                    assert tok.kind == Kind.TOKENS and tok.tensor.shape == (1,)
                writer.close()
                back_w.close()

    with caplog.at_level(logging.WARNING, logger="mdi.ring.node.runtime"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert any("cannot process a frame" in r.getMessage() and type(exc).__name__ in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("kind", [Kind.PREFILL, Kind.DECODE])
def test_a_fixed_batch_takes_context_frames_only(ckpt, kind):
    """Review: a fixed-batch run (only --resend-context makes one now: CONTEXT frames, no
    cache) still allocated a KV cache per group on every node and computed PREFILL and
    DECODE frames that no starter sends. The node now keeps no cache for such a run and
    refuses those frames as bad frames, naming them; the node takes the next run."""
    from cluster_helpers import closed_by_peer, open_data
    from mdi.model import KVCache
    from mdi.ring.protocol.wire import Frame, read_frame

    async def scenario() -> None:
        async with finisher_and_fake_starter(ckpt) as (rt, cfg, config, start_run):
            for run_id, frame_kind in ((31, kind), (32, Kind.CONTEXT)):
                back_r, back_w = await start_run(run_id)
                assert not any(isinstance(c, KVCache) for v in vars(rt.run).values()
                               if isinstance(v, list) for c in v)  # no KV caches
                reader, writer = await open_data(cfg.finisher, run_id)
                h = torch.zeros(1, 2 if frame_kind != Kind.DECODE else 1, config.n_embd)
                writer.write(Frame(frame_kind, run_id, 0, 0, h).encode())
                if frame_kind == Kind.CONTEXT:
                    tok = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
                    assert tok.kind == Kind.TOKENS and tok.tensor.shape == (1,)
                else:
                    assert await closed_by_peer(reader)
                    assert rt.state == "idle"
                    assert rt.status()["last_run"]["reason"] == (
                        f"bad frame from the previous node: {kind.name} frame in a fixed-batch "
                        "run, which carries CONTEXT frames only (--resend-context)")
                writer.close()
                back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("field,bad", [("top_k", 2**31), ("temperature", float("nan")),
                                       ("seed", -1), ("top_p", 0.0)])
def test_a_bad_admit_is_refused_by_an_intermediate(ckpt, field, bad):
    """Review: ADMIT parameters were checked on their way through a node, but not all of
    them (top_k had no bound) and not on receipt: an intermediate forwarded what the
    finisher refuses. An intermediate now refuses the frame when it reads it, names the
    field in /status's last_run, forwards nothing, and takes the next run."""
    from cluster_helpers import closed_by_peer, intermediate_and_fake_finisher, open_data
    from mdi.ring.protocol.wire import Kind, admit_frame, read_frame

    good = dict(temperature=0.5, top_k=0, top_p=1.0, seed=7)

    async def scenario() -> None:
        async with intermediate_and_fake_finisher(ckpt) as (rt, cfg, config, start_run):
            for run_id, params in ((21, {**good, field: bad}), (22, good)):
                back_r, back_w = await start_run(run_id)
                reader, writer = await open_data(cfg.intermediate[0], run_id)
                writer.write(admit_frame(run_id, 1, **params).encode())
                if params is good:  # forwarded as it came
                    f = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
                    assert f.kind == Kind.ADMIT and f.sample == 1
                else:
                    assert await closed_by_peer(reader)  # the run is dropped, the node is not
                    assert rt.state == "idle"
                    reason = rt.status()["last_run"]["reason"]
                    assert reason.startswith(f"bad frame from the previous node: ADMIT for slot 1: "
                                             f"{field} must be"), reason
                    assert back_r.at_eof() or await closed_by_peer(back_r)  # nothing forwarded
                writer.close()
                back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_next_node_closing_its_link_drops_the_run(ckpt, caplog):
    """The finisher's downstream is the starter: when it goes away, the run is dropped
    even though no frame is being written."""
    from mdi.checkpoint import read_info
    from mdi.ring.protocol.auth import challenge
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime
    from mdi.ring.plan.partition import Shard
    from mdi.checkpoint.stream import shard_bytes

    cfg = local_nodes_config(2, free_ports(4))
    config = read_info(ckpt).config

    async def scenario() -> None:
        rt = NodeRuntime(cfg.finisher, TOKEN, timeout=2.0)
        links = []

        async def next_node(reader, writer):
            await challenge(reader, writer, TOKEN, 5, 2.0)
            links.append(writer)

        server = await asyncio.start_server(next_node, "127.0.0.1", cfg.starter.port_in)
        try:
            await rt.init(InitRequest(run_id=5, role="finisher", start=1, stop=3,
                                      model=config.to_dict(), groups=[[0, 1]],
                                      next={"addr": "127.0.0.1", "port": cfg.starter.port_in},
                                      prev_addr="127.0.0.1",
                                      sampling={"temperature": 0.0, "top_k": None, "seed": 1}))
            await rt.load_weights(5, shard_bytes(ckpt, Shard(1, 3, 3)))
            await rt.connect(5)
            assert rt.state == "ready"
            for _ in range(100):  # our side of the handshake may finish a moment later
                if links:
                    break
                await asyncio.sleep(0.02)
            links[0].close()
            for _ in range(100):
                if rt.run is None:
                    break
                await asyncio.sleep(0.02)
            assert rt.run is None and "closed the link" in rt.last_stats["reason"]
        finally:
            server.close()
            await rt.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
