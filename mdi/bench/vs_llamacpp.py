"""`mdi bench --vs-llamacpp`: mdi and llama.cpp on the same GGUF file, side by side.

Each configuration runs in its own process, so that its peak resident memory
(the kernel's ru_maxrss of that child, from os.wait4) is its own: llama.cpp's
`llama-bench` for one sequence and `llama-batched-bench` for several, and
`mdi sample --json` with `--quantize` as the file's precision asks (int4 for a
Q4 file, int8 for Q8_0, none for F32/F16). The rows interleave engine by
engine within each sequence count, so a machine that slows down slows both.
mdi's row also says the memory of a process that has only imported torch and
mdi (the runtime's own weight, `baseline_rss_mb`): peak minus that is what the
model and its caches cost. `dtypes` runs mdi at each --dtype (auto, float32: a
row each beside the same llama.cpp figure). llama.cpp's cache holds the
sequences' positions and no more (-c = sequences x (8 + new tokens)), so
`--seqs 16 --n-tokens 504` compares 16 sequences of 512 positions. `prefill`
N adds llama-bench's ppN beside mdi's first token of an N-token prompt (one
sequence, N / time to first token, the sampling of that token included).
mdi's decode rate is its tokens after each sequence's first two over their
time (`decode_tokens_per_s` of `mdi sample --json`), as llama.cpp's tgN counts
generated tokens only; the whole run's rate, prefill included, is in runs.csv
beside it (`run_tokens_per_s`). `compile` [False, True] adds mdi with
`--compile` (AOTInductor packages, model/aoti.py) as rows of their own: one
untimed run per sequence count first builds or loads the packages, so the
timed runs find them on disk, as every start after a user's first does.

OMP_WAIT_POLICY decides llama.cpp's speed, both ways. Its OpenMP threads spin at
every barrier by default: on a quiet machine that is its speed (SmolLM2 Q4_1, one
sequence, 2 threads, Sapphire Rapids: 101.7 tokens/s spinning, 33.0 under
`passive`), on a machine shared with other work they lose their cores (load ~7 on
2 cores: 1.3-7 tokens/s spinning, 43 passive). Both engines' children inherit the
variable; every row records it and the load average when it started
(`omp_wait_policy`, `load_avg`), and a `passive` run on a quiet machine is
warned about: it compares mdi with a slowed llama.cpp.

The llama.cpp tools are the user's own build (see docs/benchmarks.md); without
them this compares nothing and says so. Nothing is downloaded. mdi's kernels
(model/fused_ops.py) are built, where this machine has none, before any timed run.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.gguf_precision import main_weight_type, mode_for

log = logging.getLogger(__name__)
CSV_FIELDS = ["timestamp", "engine", "weights", "dtype", "phase", "n_seqs", "run", "n_prompt",
              "n_tokens", "threads", "tokens_per_s", "run_tokens_per_s", "peak_rss_mb",
              "baseline_rss_mb", "compile", "omp_wait_policy", "load_avg"]
PROMPT = "The history of the city begins"
NPP = 8  # llama-batched-bench's prompt tokens per sequence (mdi's PROMPT: 6 in SmolLM2's tokenizer)


@dataclass
class LlamaCppConfig:
    gguf: str                          # the GGUF file both engines read
    llama_bench: str                   # llama-bench, or the folder holding it
    seqs: list[int] = field(default_factory=lambda: [1, 4, 16])
    n_tokens: int = 64
    runs: int = 2
    threads: int = 2
    quantize: str | None = "auto"      # mdi's --quantize; "auto": from the file's type
    out: str = "bench-vs-llamacpp"
    kv_dtype: str | None = None        # mdi's --kv-dtype (None: its compute dtype)
    dtypes: list[str] = field(default_factory=lambda: ["auto"])  # mdi's --dtype, a row each
    prefill: int = 0                   # >0: also a prompt of this many tokens, 1 sequence
    compile: list[bool] = field(default_factory=lambda: [False])  # mdi eager and/or --compile

    def tools(self) -> tuple[Path, Path]:
        p = Path(self.llama_bench)
        folder = p if p.is_dir() else p.parent
        bench = p if p.is_file() else folder / "llama-bench"
        batched = folder / "llama-batched-bench"
        for tool in (bench, batched):
            if not (tool.is_file() and os.access(tool, os.X_OK)):
                raise ValueError(f"--llama-bench: no executable {tool.name} at {tool}")
        return bench, batched


# A small process that runs the command as its own child and reports that child's peak
# RSS (os.wait4). Not measured from here: a child forked from this process starts with
# this process's memory as its high-water mark (Linux keeps the pre-exec mark), so
# every figure would be at least this process's size.
LAUNCHER = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
sys.stderr.write("\\nMDI_MAXRSS_KB %d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(cmd: list[str], timeout: float = 1800) -> tuple[str, float]:
    """Run cmd to its end: its stdout and its own peak RSS in MB."""
    r = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    found = re.findall(r"^MDI_MAXRSS_KB (\d+)$", r.stderr, re.M)
    if not found:
        raise RuntimeError(f"{Path(cmd[0]).name}: no peak memory reported")
    return r.stdout, int(found[-1]) / 1024


def llamacpp_rate(cfg: LlamaCppConfig, n_seqs: int, prefill: int = 0) -> tuple[float, float]:
    """llama.cpp's generation tokens/s over all sequences (prefill > 0: its prompt
    processing of that many tokens) and its peak RSS (MB)."""
    bench, batched = cfg.tools()
    if n_seqs == 1 or prefill:
        out, rss = measured([str(bench), "-m", cfg.gguf, "-t", str(cfg.threads),
                             "-p", str(prefill), "-n", "0" if prefill else str(cfg.n_tokens),
                             "-r", "1", "-o", "json"])
        rows = json.loads(out)
        return float(rows[0]["avg_ts"]), rss
    ctx = n_seqs * (NPP + cfg.n_tokens)
    out, rss = measured([str(batched), "-m", cfg.gguf, "-t", str(cfg.threads), "-c", str(ctx),
                         "-b", "2048", "-ub", "512", "-npp", str(NPP), "-ntg", str(cfg.n_tokens),
                         "-npl", str(n_seqs), "--output-format", "jsonl"])
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            return float(row["speed_tg"]), rss
    raise RuntimeError(f"llama-batched-bench printed no result: {out[-400:]}")


def mdi_rate(cfg: LlamaCppConfig, n_seqs: int, quantize: str | None, dtype: str = "auto",
             prompt: tuple[str, int] | None = None, compiled: bool = False
             ) -> tuple[float, float, float, str]:
    """mdi sample's decode tokens/s over all sequences (prompt (text, its token count):
    that prompt's tokens / time to first token), the whole run's tokens/s, its peak RSS
    (MB) and its compute dtype."""
    text, n_tokens = (prompt[0], 1) if prompt else (PROMPT, cfg.n_tokens)
    cmd = [sys.executable, "-m", "mdi.cli.main", "sample", "--ckpt", cfg.gguf, "--json",
           "--n-samples", str(n_seqs), "--n-tokens", str(n_tokens), "--temperature", "0",
           "--ignore-eos", "--threads", str(cfg.threads), "--prompt", text, "--dtype", dtype,
           "--max-context", str(max(256, n_tokens + 64 + (prompt[1] if prompt else 0)))]
    cmd += ["--quantize", quantize or "none"]  # said outright: the default is the file's
    if cfg.kv_dtype:
        cmd += ["--kv-dtype", cfg.kv_dtype]
    if compiled:
        cmd.append("--compile")
    out, rss = measured(cmd)
    result = json.loads(out[out.index("{"):])
    ran = (result.get("compute") or {}).get("dtype", dtype)
    whole = float(result["tokens_per_s"])
    if prompt:
        return prompt[1] / float(result["first_token_s"]), whole, rss, ran
    return float(result.get("decode_tokens_per_s") or whole), whole, rss, ran


def prefill_prompt(gguf: str, n: int) -> tuple[str, int]:
    """A prompt text of about n tokens in the file's tokenizer (latency.PASSAGE repeated)
    and its token count as mdi encodes it."""
    from ..checkpoint.sources import open_checkpoint
    from .latency import prompt_ids

    tok = open_checkpoint(gguf).tokenizer()
    text = tok.decode(prompt_ids(tok, n))
    return text, len(tok.encode(text))


def baseline_rss(threads: int) -> float:
    """Peak RSS (MB) of a process that imports torch and mdi's commands and does nothing."""
    code = (f"import torch; torch.set_num_threads({threads}); import mdi.cli.main, "
            "mdi.checkpoint.gguf")
    return measured([sys.executable, "-c", code])[1]


def run_vs_llamacpp(cfg: LlamaCppConfig) -> list[dict]:
    """Both engines at every sequence count (and mdi at every dtype), `runs` times,
    interleaved, then the prefill rows; writes runs.csv, summary.csv and
    tokens_per_s.png / peak_rss.png under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = main_weight_type(cfg.gguf)
    quantize = mode_for(weights) if cfg.quantize == "auto" else cfg.quantize
    quantize = None if quantize == "none" else quantize
    # mdi's kernels built now where this machine has none yet: a timed child that built
    # them counted g++'s seconds and memory as its own (594 MB of peak RSS against 384)
    from ..model import fused_ops
    fused_ops.ops()
    base = baseline_rss(cfg.threads)
    log.info("%s: %s weights; mdi runs with --quantize %s; an idle mdi process: %.0f MB",
             Path(cfg.gguf).name, weights, quantize or "none", base)
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    if policy.lower() == "passive" and os.getloadavg()[0] < (os.cpu_count() or 1):
        log.warning("OMP_WAIT_POLICY=passive on a machine with little other work: llama.cpp's "
                    "threads sleep at every barrier and it runs up to 3x slower than it would "
                    "(leave the variable unset where nothing else runs)")
    prompt = prefill_prompt(cfg.gguf, cfg.prefill) if cfg.prefill else None
    plan = [("decode", n, run) for n in cfg.seqs for run in range(cfg.runs)]
    plan += [("prefill", 1, run) for run in range(cfg.runs if prompt else 0)]
    variants = [("llama.cpp", "", False), *(("mdi", d, c) for c in cfg.compile for d in cfg.dtypes)]
    for n in cfg.seqs if True in cfg.compile else []:  # packages built or loaded, not timed
        for d in cfg.dtypes:
            log.info("mdi --compile, %d seq(s), dtype %s: an untimed run first (a package not "
                     "on disk is built now: about a minute per row bucket)", n, d)
            mdi_rate(cfg, n, quantize, d, compiled=True)
    rows = []
    for phase, n, run in plan:
        pre = prompt if phase == "prefill" else None
        for engine, dtype, compiled in variants:
            t0, load = time.time(), os.getloadavg()[0]
            if engine == "mdi":
                rate, whole, rss, ran = mdi_rate(cfg, n, quantize, dtype, pre, compiled)
            else:
                (rate, rss), ran = llamacpp_rate(cfg, n, cfg.prefill if pre else 0), ""
                whole = rate
            rows.append({"timestamp": round(t0, 1), "engine": engine,
                         "weights": quantize or "float" if engine == "mdi" else weights,
                         "dtype": f"auto: {ran}" if dtype == "auto" else dtype, "phase": phase,
                         "n_seqs": n, "run": run, "n_prompt": pre[1] if pre else "",
                         "n_tokens": 1 if pre else cfg.n_tokens, "threads": cfg.threads,
                         "tokens_per_s": round(rate, 2), "run_tokens_per_s": round(whole, 2),
                         "peak_rss_mb": round(rss, 1),
                         "baseline_rss_mb": round(base, 1) if engine == "mdi" else "",
                         "compile": ("on" if compiled else "off") if engine == "mdi" else "",
                         "omp_wait_policy": policy, "load_avg": round(load, 2)})
            log.info("%-9s %-8s%-9s %-7s %2d seq(s) run %d: %7.1f tokens/s, peak RSS %.0f MB",
                     engine, ran, " compiled" if compiled else "", phase, n, run, rate, rss)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    plot(summary, out)
    return summary


def variant(row: dict) -> str:
    """mdi's row label: its dtype, with "compiled" for --compile runs."""
    dtype = row.get("dtype", "")
    return f"{dtype} compiled" if row.get("compile") == "on" else dtype


def summarize(rows: list[dict]) -> list[dict]:
    """Per phase, sequence count and mdi dtype: each engine's best tokens/s and its
    peak RSS, and the ratios (llama.cpp's best of the same phase and count)."""
    out = []
    key = lambda r: (r.get("phase", "decode") != "decode", r["n_seqs"])  # noqa: E731
    for phase_n in sorted({key(r) for r in rows}):
        here = [r for r in rows if key(r) == phase_n]
        l = max((r for r in here if r["engine"] == "llama.cpp"), key=lambda r: r["tokens_per_s"])
        for dtype in dict.fromkeys(variant(r) for r in here if r["engine"] == "mdi"):
            m = max((r for r in here if r["engine"] == "mdi" and variant(r) == dtype),
                    key=lambda r: r["tokens_per_s"])
            over = m["peak_rss_mb"] - m["baseline_rss_mb"]
            out.append({"phase": m.get("phase", "decode"), "n_seqs": m["n_seqs"],
                        "llamacpp_weights": l["weights"], "mdi_weights": m["weights"],
                        "mdi_dtype": dtype, "llamacpp_tokens_per_s": l["tokens_per_s"],
                        "mdi_tokens_per_s": m["tokens_per_s"],
                        "speed_ratio": round(m["tokens_per_s"] / l["tokens_per_s"], 3),
                        "llamacpp_peak_rss_mb": l["peak_rss_mb"], "mdi_peak_rss_mb": m["peak_rss_mb"],
                        "mdi_rss_over_runtime_mb": round(over, 1),
                        "memory_ratio": round(over / l["peak_rss_mb"], 3)})
    return out


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [s for s in summary if s.get("phase", "decode") == "decode"]
    if not decode:
        return
    by = {d: [s for s in decode if s.get("mdi_dtype", "") == d]
          for d in dict.fromkeys(s.get("mdi_dtype", "") for s in decode)}
    first = next(iter(by.values()))
    for key, what, name in (("tokens_per_s", "tokens/s (all sequences)", "tokens_per_s.png"),
                            ("peak_rss_mb", "peak RSS (MB)", "peak_rss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s["n_seqs"] for s in first], [s["llamacpp_" + key] for s in first], marker="o",
                label="llama.cpp")
        for d, ss in by.items():
            label = f"mdi {d}".strip()
            ax.plot([s["n_seqs"] for s in ss], [s["mdi_" + key] for s in ss], marker="o",
                    label=label)
            if key == "peak_rss_mb":
                ax.plot([s["n_seqs"] for s in ss], [s["mdi_rss_over_runtime_mb"] for s in ss],
                        marker="o", linestyle="--", label=f"{label} minus its idle runtime")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel(what)
        ax.set_title(f"{first[0]['llamacpp_weights']} file: mdi vs llama.cpp")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def format_summary(summary: list[dict]) -> str:
    lines = [f"{'phase':>7}  {'seqs':>4}  {'mdi dtype':>24}  {'llama.cpp tok/s':>15}  "
             f"{'mdi tok/s':>9}  {'ratio':>5}  {'llama.cpp RSS':>13}  {'mdi RSS':>7}  "
             f"{'mdi-runtime':>11}  {'ratio':>5}"]
    for s in summary:
        lines.append(f"{s.get('phase', 'decode'):>7}  {s['n_seqs']:>4}  "
                     f"{s.get('mdi_dtype', ''):>24}  {s['llamacpp_tokens_per_s']:>15.1f}  "
                     f"{s['mdi_tokens_per_s']:>9.1f}  {s['speed_ratio']:>5.2f}  "
                     f"{s['llamacpp_peak_rss_mb']:>10.0f} MB  {s['mdi_peak_rss_mb']:>4.0f} MB  "
                     f"{s['mdi_rss_over_runtime_mb']:>8.0f} MB  {s['memory_ratio']:>5.2f}")
    return "\n".join(lines)
