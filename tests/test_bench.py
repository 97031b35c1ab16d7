"""mdi bench end to end on a tiny random model: files produced and consistent.

No timing assertions: only counts, shapes of the output, and the byte figures
that follow from the wire format.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdi.bench.netns import NetnsUnavailable, check_netns, tbf_args
from mdi.bench.report import mean_context
from mdi.bench.runner import BenchConfig, core_plan, variants
from mdi.ring.protocol.wire import HEADER_SIZE

TINY_EMBD = 32  # mdi.bench.models.SIZES["tiny"].n_embd


def run_bench(tmp_path, *extra: str, pids: list[int] | None = None) -> tuple[list[dict], str]:
    """The bench in a process of its own (its pid appended to `pids`)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "mdi.cli.main", "bench", "--model-size", "tiny", "--n-samples", "2",
           "--n-tokens", "6", "--runs", "1", "--out", str(out), *extra]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        if pids is not None:
            pids.append(proc.pid)
        try:
            _, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr[-3000:]
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, stderr


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
    # one machine, one environment: every process of the ring alike (y, or n without a compiler)
    assert by["single"]["fused_kernels"] == "" and by["mdi-2"]["fused_kernels"] in ("y/y", "n/n")
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
    pids: list[int] = []
    rows, _ = run_bench(tmp_path, "--nodes", "1,2", "--hosts", "netns", "--link-rate", "100mbit", pids=pids)
    assert {r["links"] for r in rows if r["config"] != "single"} == {"tcp/tcp"}  # other namespaces
    check_outputs(tmp_path / "bench", rows)
    assert {r["hosts"] for r in rows} == {"netns"}
    assert {r["link_rate"] for r in rows} == {"100mbit"}
    # only this bench's own namespaces and bridge (named by its pid): another suite may run beside
    tag = pids[0] % 10000
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [n for n in namespaces if n.startswith(f"mdi{tag}h")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"mdibr{tag}:" not in links


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
    pids: list[int] = []
    rows, err = run_bench(tmp_path, "--nodes", "3", "--node-cpu", "1,1,0.3",
                          "--partition", "auto,even", pids=pids)
    check_outputs(tmp_path / "bench", rows)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"mdi-3-auto", "mdi-3-even"}
    assert by["mdi-3-auto"]["partition"] == "auto" and by["mdi-3-even"]["partition"] == "even"
    assert by["mdi-3-even"]["layers"] == "1+2+1"  # the tiny model's 4 layers
    assert sum(int(x) for x in by["mdi-3-auto"]["layers"].split("+")) == 4
    assert {r["node_cpu"] for r in rows} == {"1,1,0.3"}
    assert "mdi-3-auto" in (tmp_path / "bench" / "summary.md").read_text()
    # its own groups are gone (another bench on the machine may hold groups of its own)
    assert not list(Path("/sys/fs/cgroup/cpu").glob(f"mdi-bench-{pids[0]}-*"))


# ---- a node slowed mid-run, live re-planning on and off side by side ----------------
def test_replan_variants_and_slow_at_checks():
    from mdi.bench.cgroup import parse_slow_at

    cfg = BenchConfig(model_size="tiny", nodes=[1, 3], replans=["on", "off"])
    assert [v.name for v in variants(cfg)] == ["single", "mdi-3-replan-on", "mdi-3-replan-off"]
    with pytest.raises(ValueError, match="--replan must list on and/or off"):
        BenchConfig(model_size="tiny", nodes=[3], replans=["maybe"])
    assert parse_slow_at("100:2:0.2") == (100, 2, 0.2)
    for bad in ("100:2", "x:2:0.2", "100:2:0.2:1", "0:2:0.2", "100:2:0.01"):
        with pytest.raises(ValueError, match="--slow-at"):
            parse_slow_at(bad)
    with pytest.raises(ValueError, match="--slow-at needs --node-cpu"):
        BenchConfig(model_size="tiny", nodes=[3], slow_at=(100, 2, 0.2))
    with pytest.raises(ValueError, match="below every --nodes count, got node 3"):
        BenchConfig(model_size="tiny", nodes=[3], node_cpu=[1.0] * 3, slow_at=(100, 3, 0.2))


def test_cpu_caps_restore_every_share_after_a_slowed_run(tmp_path, monkeypatch):
    from mdi.bench.cgroup import CpuCaps, quota_us
    from mdi.bench.worker import _slow_at

    (tmp_path / "cpu.cfs_quota_us").write_text("-1")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with CpuCaps([1.0, 0.5], root=tmp_path) as caps:
        on_step = _slow_at(f"3:{caps.quota_file(1)}:{quota_us(0.2)}")
        for k in range(2):  # steps 0 and 1: every sample has 1, then 2 tokens
            on_step(k)
        assert caps.quota_file(1).read_text() == str(quota_us(0.5))
        on_step(2)          # 3 tokens: slowed
        assert caps.quota_file(1).read_text() == str(quota_us(0.2)) == "2000"
        caps.restore()
        assert [caps.quota_file(i).read_text() for i in (0, 1)] == ["10000", "5000"]
        for x in caps.dirs:
            for f in x.iterdir():
                f.unlink()


@pytest.mark.slow
def test_bench_slow_at_with_replan_on_and_off_side_by_side(tmp_path):
    _cgroup_v1_or_skip()
    pids: list[int] = []
    rows, err = run_bench(tmp_path, "--nodes", "3", "--node-cpu", "1,1,1", "--slow-at", "3:2:0.5",
                          "--replan", "on,off", "--temperature", "0", pids=pids)
    by = {r["config"]: r for r in rows}
    assert set(by) == {"mdi-3-replan-on", "mdi-3-replan-off"}
    assert {r["slow_at"] for r in rows} == {"3:2:0.5"}
    assert by["mdi-3-replan-on"]["tokens_sha"] == by["mdi-3-replan-off"]["tokens_sha"]
    assert by["mdi-3-replan-off"]["replans"] == "0"
    assert "## Re-planning" in (tmp_path / "bench" / "summary.md").read_text()
    # its own groups are gone (another bench on the machine may hold groups of its own)
    assert not list(Path("/sys/fs/cgroup/cpu").glob(f"mdi-bench-{pids[0]}-*"))


# ---- time to first token and inter-token latency by prompt length -------------------
def test_prompt_ids_are_the_models_tokens_at_the_length_asked(char_tokenizer):
    from mdi.bench.latency import PASSAGE, prompt_ids

    n = 2 * len(PASSAGE) + 3  # a char tokenizer: a token per character
    ids = prompt_ids(char_tokenizer, n)
    assert len(ids) == n and ids == prompt_ids(char_tokenizer, n)  # deterministic
    assert char_tokenizer.decode(ids[:len(PASSAGE)]) == PASSAGE  # the passage, then again
    assert ids[len(PASSAGE):2 * len(PASSAGE)] == ids[:len(PASSAGE)]
    assert prompt_ids(char_tokenizer, 3) == ids[:3]
    with pytest.raises(ValueError, match="--prompt-tokens"):
        prompt_ids(char_tokenizer, 0)


def test_latency_stats_from_token_times():
    from mdi.bench.latency import latency_stats

    s = latency_stats([[0.5, 0.6, 0.8], [1.5, 1.6], []])  # the empty one made no token
    assert s["ttft_count"] == 2 and s["itl_count"] == 3
    assert s["ttft_p50_s"] == pytest.approx(1.0) and s["ttft_p99_s"] == pytest.approx(1.49)
    assert s["itl_p50_s"] == pytest.approx(0.1) and s["itl_p99_s"] == pytest.approx(0.198)


def test_prompt_lengths_and_prefill_chunks_are_variants():
    cfg = BenchConfig(model_size="tiny", nodes=[1, 2], prompt_tokens=[16, 32],
                      prefill_chunks=[0, 8], resend_context=True)
    assert [v.name for v in variants(cfg)] == [
        "single-chunk0-p16", "single-chunk8-p16", "mdi-2-chunk0-p16", "mdi-2-chunk8-p16",
        "single-chunk0-p32", "single-chunk8-p32", "mdi-2-chunk0-p32", "mdi-2-chunk8-p32",
        "mdi-2-resend-p16", "mdi-2-resend-p32"]
    assert {v.series for v in variants(cfg) if v.prompt_tokens == 32} == {
        "single-chunk0", "single-chunk8", "mdi-2-chunk0", "mdi-2-chunk8", "mdi-2-resend"}
    with pytest.raises(ValueError, match="--prompt-tokens"):
        BenchConfig(model_size="tiny", prompt_tokens=[0])
    with pytest.raises(ValueError, match="--prefill-chunk"):
        BenchConfig(model_size="tiny", prefill_chunks=[8, 8])
    with pytest.raises(ValueError, match="--temperature"):
        BenchConfig(model_size="tiny", temperature=-1)


def test_bench_refuses_a_prompt_that_fills_the_context(tmp_path):
    from mdi.bench.runner import Bench

    with pytest.raises(ValueError, match="--prompt-tokens 64 leaves no room.*64 positions"):
        Bench(BenchConfig(model_size="tiny", prompt_tokens=[8, 64], out=str(tmp_path)))


def _row(config, run, sha, ttft, chunk=""):
    return {"config": config, "run": run, "prompt_tokens": 10, "prefill_chunk": chunk,
            "temperature": 0.0, "tokens_sha": sha, "ttft_p50_s": ttft, "ttft_p99_s": 2 * ttft,
            "itl_p50_s": 0.01, "itl_p99_s": 0.02}


def test_latency_table_compares_with_chunk0_and_checks_tokens():
    from mdi.bench.report import latency_lines, token_mismatches

    rows = [_row("mdi-2-chunk0-p10", 0, "a", 4.0, 0), _row("mdi-2-chunk8-p10", 0, "a", 2.0, 8),
            _row("mdi-2-chunk0-p10", 1, "b", 6.0, 0), _row("mdi-2-chunk8-p10", 1, "b", 3.0, 8)]
    text = "\n".join(latency_lines(rows))
    assert "| mdi-2-chunk8-p10 | 10 | 8 | 2.500 | 5.000 | 10.0 | 20.0 | 0.50x |" in text
    assert "| mdi-2-chunk0-p10 | 10 | 0 | 5.000 | 10.000 | 10.0 | 20.0 | - |" in text
    assert "greedy): equal across all" in text
    rows[3]["tokens_sha"] = "c"  # run 1 of the chunked configuration differs
    assert token_mismatches(rows) == ["mdi-2-chunk8-p10"]
    assert "differ from the run's first configuration in mdi-2-chunk8-p10" in "\n".join(
        latency_lines(rows))


def test_worker_reports_latency_of_a_single_device_run(tiny_ckpt, capsys):
    import json

    import torch

    from mdi.bench import worker

    threads = torch.get_num_threads()
    try:
        assert worker.main(["--ckpt", str(tiny_ckpt), "--n-samples", "3", "--n-tokens", "4",
                            "--threads", str(threads), "--prompt-tokens", "12",
                            "--prefill-chunk", "5", "--temperature", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_tokens"] == 12 and res["tokens_total"] == 12
    assert res["ttft_count"] == 3 and res["itl_count"] == 3 * 3
    assert 0 < res["ttft_p50_s"] <= res["ttft_p99_s"] <= res["gen_time_s"]
    assert 0 < res["itl_p50_s"] <= res["itl_p99_s"]
    assert len(res["tokens_sha"]) == 12


@pytest.mark.slow
def test_bench_latency_by_prompt_length_and_chunk(tmp_path):
    rows, _ = run_bench(tmp_path, "--nodes", "1,2", "--prompt-tokens", "20,40",
                        "--prefill-chunk", "0,8", "--temperature", "0")
    out = tmp_path / "bench"
    assert (out / "ttft_by_prompt.png").stat().st_size > 0
    assert {(r["config"], r["prompt_tokens"], r["prefill_chunk"]) for r in rows} == {
        (f"{c}-chunk{k}-p{n}", str(n), str(k)) for c in ("single", "mdi-2") for n in (20, 40)
        for k in (0, 8)}
    for r in rows:
        assert int(r["ttft_count"]) == 2 and int(r["itl_count"]) == 2 * 5
        assert 0 < float(r["ttft_p50_s"]) <= float(r["ttft_p99_s"]) <= float(r["gen_time_s"])
        assert 0 < float(r["itl_p50_s"]) <= float(r["itl_p99_s"])
        assert float(r["first_token_s"]) == pytest.approx(float(r["ttft_p99_s"]), rel=0.2)
    # greedy: chunked prefill, one frame, one device and the ring make the same tokens
    for n in ("20", "40"):
        assert len({r["tokens_sha"] for r in rows if r["prompt_tokens"] == n}) == 1
    summary = (out / "summary.md").read_text()
    assert "## Latency by prompt length" in summary and "equal across all configurations" in summary
    assert "| mdi-2-chunk8-p40 | 40 | 8 |" in summary
