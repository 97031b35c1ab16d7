"""mdi bench end to end on a tiny random model: files produced and consistent.

No timing assertions: only counts, shapes of the output, and the byte figures
that follow from the wire format.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from mdi.bench.netns import NetnsUnavailable, check_netns, tbf_args
from mdi.bench.report import mean_context
from mdi.bench.runner import BenchConfig, core_plan, variants
from mdi.ring.protocol.wire import HEADER_SIZE

TINY_EMBD = 32  # mdi.bench.models.SIZES["tiny"].n_embd


def run_bench(tmp_path, *extra: str) -> tuple[list[dict], str]:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "mdi.cli.main", "bench", "--model-size", "tiny", "--n-samples", "2",
           "--n-tokens", "6", "--runs", "1", "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, r.stderr


def check_outputs(out, rows: list[dict]) -> None:
    for name in ("runs.csv", "summary.md", "tokens_time.png", "tokens_per_s_vs_nodes.png",
                 "bytes_vs_context.png", "memory_per_node.png"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    for r in rows:
        assert f"| {r['config']} |" in summary
        assert int(r["tokens_total"]) == int(r["n_samples"]) * int(r["n_tokens"]) == 12
        assert float(r["tokens_per_s"]) > 0
        for i in range(int(r["n_nodes"])):
            assert float(r[f"peak_rss_mb_node{i}"]) > 10
            assert float(r[f"cpu_s_node{i}"]) >= 0


@pytest.mark.slow
def test_bench_local_kv_and_resend(tmp_path):
    rows, _ = run_bench(tmp_path, "--nodes", "1,2", "--resend-context")
    check_outputs(tmp_path / "bench", rows)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"single", "mdi-2", "mdi-2-resend"}
    assert float(by["single"]["bytes_per_hop_per_token"]) == 0
    # local processes: both hops over Unix sockets, the engine run and the fixed batch
    assert by["single"]["links"] == "" and by["mdi-2"]["links"] == "unix/unix"
    assert by["mdi-2-resend"]["links"] == "unix/unix"
    assert "links=unix." in (tmp_path / "bench" / "summary.md").read_text()
    # 2 samples on 2 nodes: two groups of one sample; a DECODE frame per token
    assert float(by["mdi-2"]["bytes_per_hop_per_token"]) == HEADER_SIZE + 4 * TINY_EMBD
    # without the cache, every step carries the whole context: the mean follows the policy
    ctx = mean_context(1, 6, 64)
    want = HEADER_SIZE + 4 * TINY_EMBD * sum(ctx) / len(ctx)
    assert float(by["mdi-2-resend"]["bytes_per_hop_per_token"]) == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--isolate of 2 nodes needs 2 cores")
def test_bench_isolate(tmp_path):
    rows, _ = run_bench(tmp_path, "--nodes", "1,2", "--isolate")
    check_outputs(tmp_path / "bench", rows)
    assert all(r["isolate"] == "True" for r in rows)


@pytest.mark.slow
def test_bench_netns(tmp_path):
    try:
        check_netns()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces not permitted here: {e}")
    rows, _ = run_bench(tmp_path, "--nodes", "1,2", "--hosts", "netns", "--link-rate", "100mbit")
    assert {r["links"] for r in rows if r["config"] != "single"} == {"tcp/tcp"}  # other namespaces
    check_outputs(tmp_path / "bench", rows)
    assert {r["hosts"] for r in rows} == {"netns"}
    assert {r["link_rate"] for r in rows} == {"100mbit"}
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mdi" not in leftovers


def test_variants_and_core_plan():
    cfg = BenchConfig(model_size="tiny", nodes=[3, 1, 2], resend_context=True)
    assert [v.name for v in variants(cfg)] == ["single", "mdi-2", "mdi-3", "mdi-2-resend",
                                               "mdi-3-resend"]
    n = len(os.sched_getaffinity(0))
    if n >= 2:
        plan = core_plan(2, True, 2)
        assert len(plan) == 2 and not set(plan[0]) & set(plan[1])
        assert len(core_plan(1, True, 2)[0]) == 2 * (n // 2)
    with pytest.raises(ValueError, match="cores"):
        core_plan(2, True, n + 1)
    assert core_plan(2, False, 2) is None


def test_bench_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        BenchConfig(ckpt="x", model_size="tiny")
    with pytest.raises(ValueError, match="--link-rate needs --hosts netns"):
        BenchConfig(model_size="tiny", link_rate="10mbit")
    with pytest.raises(ValueError, match="--nodes"):
        BenchConfig(model_size="tiny", nodes=[0])
    with pytest.raises(ValueError, match="10mbit"):
        tbf_args("fast")
    assert tbf_args("10mbit")[:3] == ["tbf", "rate", "10mbit"]


def test_mean_context_follows_overflow_policy():
    # block 8: contexts 1..8, then the window keeps the newest 4 tokens and grows again
    assert mean_context(1, 12, 8) == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, 7]


# ---- slow devices: CPU quotas and partitions side by side -------------------------
def test_partitions_are_variants_of_distributed_configs():
    cfg = BenchConfig(model_size="tiny", nodes=[1, 3], partitions=["auto", "even"])
    assert [v.name for v in variants(cfg)] == ["single", "mdi-3-auto", "mdi-3-even"]
    with pytest.raises(ValueError, match="--partition must list auto and/or even"):
        BenchConfig(model_size="tiny", nodes=[3], partitions=["fast"])
    with pytest.raises(ValueError, match="--node-cpu gives 2 share"):
        BenchConfig(model_size="tiny", nodes=[3], node_cpu=[1.0, 0.5])


def test_parse_shares():
    from mdi.bench.cgroup import parse_shares

    assert parse_shares("1,1,0.3") == [1.0, 1.0, 0.3]
    for bad in ("1,x", "0.01", "", "1,999"):
        with pytest.raises(ValueError, match="--node-cpu"):
            parse_shares(bad)


def test_cpu_caps_write_quota_and_clean_up(tmp_path, monkeypatch):
    from mdi.bench.cgroup import PERIOD_US, CpuCaps

    (tmp_path / "cpu.cfs_quota_us").write_text("-1")
    (tmp_path / "cgroup.procs").write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with CpuCaps([1.0, 0.3], root=tmp_path) as caps:
        assert len(caps.dirs) == 2
        d = caps.dirs[1]
        assert (d / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
        assert (d / "cpu.cfs_quota_us").read_text() == str(int(0.3 * PERIOD_US))
        caps.join(1, 12345)
        assert (d / "cgroup.procs").read_text() == "12345"
        for x in caps.dirs:  # a real cgroup directory's files vanish with it
            for f in x.iterdir():
                f.unlink()
    assert not any(p.name.startswith("mdi-bench-") for p in tmp_path.iterdir())


def _cgroup_v1_or_skip() -> None:
    from mdi.bench.cgroup import CpuCaps, CpuCapsUnavailable

    try:
        CpuCaps([1.0]).check()
    except CpuCapsUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_bench_node_cpu_auto_and_even_side_by_side(tmp_path):
    _cgroup_v1_or_skip()
    rows, err = run_bench(tmp_path, "--nodes", "3", "--node-cpu", "1,1,0.3",
                          "--partition", "auto,even")
    check_outputs(tmp_path / "bench", rows)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"mdi-3-auto", "mdi-3-even"}
    assert by["mdi-3-auto"]["partition"] == "auto" and by["mdi-3-even"]["partition"] == "even"
    assert by["mdi-3-even"]["layers"] == "1+2+1"  # the tiny model's 4 layers
    assert sum(int(x) for x in by["mdi-3-auto"]["layers"].split("+")) == 4
    assert {r["node_cpu"] for r in rows} == {"1,1,0.3"}
    assert "mdi-3-auto" in (tmp_path / "bench" / "summary.md").read_text()
    assert not list(__import__("pathlib").Path("/sys/fs/cgroup/cpu").glob("mdi-bench-*"))
