"""`mdi bench --vs-llamacpp`: each configuration's own peak memory, llama.cpp's
output read, the summary's ratios, and a whole run against stand-in llama.cpp
tools (shell scripts that print what the real ones print) on the shipped model."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdi.bench import vs_llamacpp
from mdi.bench.vs_llamacpp import (LlamaCppConfig, format_summary, llamacpp_rate, measured,
                                   summarize)
from mdi.model import fused_ops


@pytest.mark.slow
def test_measured_reports_the_child_s_own_peak_not_this_process_s():
    ballast = bytearray(300 * 2**20)  # this process is large; the child must not inherit that
    ballast[::4096] = b"x" * len(ballast[::4096])
    _, small = measured([sys.executable, "-S", "-c", "pass"])
    _, big = measured([sys.executable, "-S", "-c", "b = bytearray(120 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert small < 60 and 120 < big < 200, (small, big)


@pytest.mark.slow
def test_a_failing_command_is_named():
    with pytest.raises(RuntimeError, match="false failed"):
        measured(["false"])


def fake_tools(folder: Path) -> Path:
    """llama-bench and llama-batched-bench stand-ins: the JSON lines the real tools print."""
    bench = folder / "llama-bench"
    bench.write_text("#!/bin/sh\necho '[{\"avg_ts\": 97.5, \"n_gen\": 8}]'\n")
    batched = folder / "llama-batched-bench"
    batched.write_text("#!/bin/sh\necho 'main: n_kv_max = 512'\n"
                       "echo '{\"n_kv_max\": 512, \"pl\": 4, \"speed_tg\": 150.25, \"speed\": 140.0}'\n")
    for tool in (bench, batched):
        tool.chmod(0o755)
    return bench


@pytest.mark.slow
def test_llamacpp_output_is_read_and_missing_tools_named(tmp_path):
    cfg = LlamaCppConfig(gguf="x.gguf", llama_bench=str(fake_tools(tmp_path)), n_tokens=8)
    assert llamacpp_rate(cfg, 1)[0] == 97.5
    assert llamacpp_rate(cfg, 4)[0] == 150.25
    (tmp_path / "llama-batched-bench").unlink()
    with pytest.raises(ValueError, match="no executable llama-batched-bench"):
        cfg.tools()


def test_summary_takes_each_engine_s_best_run_and_the_memory_over_mdi_s_runtime():
    rows = [dict(engine="llama.cpp", weights="Q4_1", n_seqs=1, tokens_per_s=t, peak_rss_mb=130.0,
                 baseline_rss_mb="") for t in (90.0, 100.0)]
    rows += [dict(engine="mdi", weights="int4", n_seqs=1, tokens_per_s=t, peak_rss_mb=460.0,
                  baseline_rss_mb=300.0) for t in (50.0, 80.0)]
    (s,) = summarize(rows)
    assert (s["llamacpp_tokens_per_s"], s["mdi_tokens_per_s"], s["speed_ratio"]) == (100.0, 80.0, 0.8)
    assert (s["mdi_rss_over_runtime_mb"], s["memory_ratio"]) == (160.0, round(160 / 130, 3))
    assert "0.80" in format_summary([s]).splitlines()[1]


def test_each_mdi_dtype_and_the_prefill_get_a_row_beside_llamacpp_s_best():
    def row(engine, phase, n, t, dtype=""):
        return dict(engine=engine, weights="F32", phase=phase, n_seqs=n, tokens_per_s=t,
                    dtype=dtype, peak_rss_mb=500.0, baseline_rss_mb="" if dtype == "" else 250.0)
    rows = [row("llama.cpp", "decode", 1, 40.0), row("llama.cpp", "decode", 1, 50.0),
            row("mdi", "decode", 1, 60.0, "auto: bfloat16"), row("mdi", "decode", 1, 30.0, "float32"),
            row("llama.cpp", "prefill", 1, 500.0), row("mdi", "prefill", 1, 250.0, "float32"),
            row("llama.cpp", "decode", 4, 100.0), row("mdi", "decode", 4, 150.0, "float32")]
    got = [(s["phase"], s["n_seqs"], s["mdi_dtype"], s["llamacpp_tokens_per_s"], s["speed_ratio"])
           for s in summarize(rows)]
    assert got == [("decode", 1, "auto: bfloat16", 50.0, 1.2), ("decode", 1, "float32", 50.0, 0.6),
                   ("decode", 4, "float32", 100.0, 1.5), ("prefill", 1, "float32", 500.0, 0.5)]


@pytest.mark.slow
def test_a_whole_comparison_on_the_shipped_model(tmp_path):
    """mdi runs for real on the shipped Q4_1 file beside the stand-in tools: the CSVs,
    plots and printed table are written, and mdi's rate and memory are real figures."""
    from mdi.checkpoint.shipped import shipped_path

    gguf = shipped_path("smollm2-135m-instruct")
    tools = fake_tools(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    r = subprocess.run([sys.executable, "-m", "mdi.cli.main", "bench", "--vs-llamacpp",
                        "--ckpt", str(gguf), "--llama-bench", str(tools), "--seqs", "1,4",
                        "--n-tokens", "4", "--runs", "1", "--out", str(out),
                        "--llama-dtypes", "auto,float32", "--llama-prefill", "16"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["phase"], int(x["n_seqs"])) for x in rows] == [
        ("decode", 1), ("decode", 1), ("decode", 4), ("decode", 4), ("prefill", 1), ("prefill", 1)]
    assert [float(x["llamacpp_tokens_per_s"]) for x in rows] == [97.5] * 2 + [150.25] * 2 + [97.5] * 2
    assert [x["mdi_dtype"] for x in rows[:2]] == ["auto: float32", "float32"]  # MDI_AUTO_DTYPE
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert {int(r["n_prompt"]) for r in runs if r["phase"] == "prefill"} == {16}
    assert {r["omp_wait_policy"] for r in runs} == {"passive"}   # what both engines ran under
    assert all(float(r["load_avg"]) >= 0 for r in runs)
    for x in rows:
        assert x["mdi_weights"] == "int4" and float(x["mdi_tokens_per_s"]) > 0
        assert float(x["mdi_peak_rss_mb"]) > float(x["mdi_rss_over_runtime_mb"]) > 0
    assert (out / "tokens_per_s.png").stat().st_size > 1000 and (out / "peak_rss.png").is_file()
    assert "llama.cpp tok/s" in r.stdout


@pytest.mark.slow
def test_without_llama_cpp_it_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdi.cli.main", "bench", "--vs-llamacpp",
                        "--ckpt", "x.gguf", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no llama.cpp given" in r.stderr


def test_compiled_runs_are_rows_of_their_own_beside_the_eager_ones():
    def row(engine, t, compiled=""):
        return dict(engine=engine, weights="Q4_1", phase="decode", n_seqs=1, tokens_per_s=t,
                    dtype="" if engine == "llama.cpp" else "auto: float32", compile=compiled,
                    peak_rss_mb=400.0, baseline_rss_mb="" if engine == "llama.cpp" else 300.0)
    rows = [row("llama.cpp", 100.0), row("mdi", 60.0, "off"), row("mdi", 104.0, "on"),
            row("mdi", 98.0, "on")]
    got = [(s["mdi_dtype"], s["mdi_tokens_per_s"], s["speed_ratio"]) for s in summarize(rows)]
    assert got == [("auto: float32", 60.0, 0.6), ("auto: float32 compiled", 104.0, 1.04)]


def test_the_decode_rate_leaves_out_each_sample_s_first_two_tokens():
    from mdi.results import GenerationResult

    r = GenerationResult(tokens=[[1] * 6, [2] * 6], n_tokens=6, gen_time_s=3.0,
                         step_times=[1.0, 2.0, 2.5, 3.0, 3.5, 4.0], n_layers=2, block_size=16)
    assert r.decode_tokens_per_s == 2 * 4 / 2.0 and r.to_json()["decode_tokens_per_s"] == 4.0
    assert GenerationResult(tokens=[[1] * 3], n_tokens=3, gen_time_s=1.0, step_times=[0.1, 0.2, 0.3],
                            n_layers=2, block_size=16).decode_tokens_per_s is None


def test_the_decode_rate_of_staggered_samples_counts_only_tokens_inside_its_window():
    from mdi.results import GenerationResult

    # sample 0 made tokens 2 and 3 before step 1 ended (at 2.0 s): left out
    r = GenerationResult(tokens=[[1] * 5, [2] * 5], n_tokens=5, gen_time_s=4.0,
                         step_times=[1.0, 2.0, 3.0, 4.0], n_layers=2, block_size=16,
                         token_times=[[0.5, 0.8, 1.2, 1.5, 3.5], [1.0, 2.0, 2.5, 3.0, 4.0]])
    assert r.decode_tokens_per_s == 4 / 2.0


def test_mdi_s_kernels_are_built_before_any_timed_child(monkeypatch, tmp_path):
    """A child that built the kernels (g++, ~20 s, hundreds of MB) would report that as
    mdi's time and peak memory: the comparison builds them first, in its own process."""
    from mdi.checkpoint.shipped import shipped_path

    calls = []
    monkeypatch.setattr(fused_ops, "ops", lambda: calls.append("kernels"))

    def first_child(*args, **kwargs):
        calls.append("child")
        raise RuntimeError("stop here")
    monkeypatch.setattr(vs_llamacpp, "baseline_rss", first_child)
    cfg = LlamaCppConfig(str(shipped_path("smollm2-135m-instruct")), str(tmp_path),
                         out=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="stop here"):
        vs_llamacpp.run_vs_llamacpp(cfg)
    assert calls == ["kernels", "child"]
