"""`mdi bench --vs-llamacpp`: mdi and llama.cpp on the same GGUF file, side by side.

Each configuration runs in its own process, so that its peak resident memory
(the kernel's ru_maxrss of that child, from os.wait4) is its own: llama.cpp's
`llama-bench` for one sequence and `llama-batched-bench` for several, and
`mdi sample --json` with `--quantize` as the file's precision asks (int4 for a
Q4 file, int8 for Q8_0, none for F32/F16). The rows interleave engine by
engine within each sequence count, so a machine that slows down slows both.
mdi's row also says the memory of a process that has only imported torch and
mdi (the runtime's own weight, `baseline_rss_mb`): peak minus that is what the
model and its caches cost.

The llama.cpp tools are the user's own build (see docs/benchmarks.md); without
them this compares nothing and says so. Nothing is downloaded.
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

log = logging.getLogger(__name__)
CSV_FIELDS = ["timestamp", "engine", "weights", "n_seqs", "run", "n_tokens", "threads",
              "tokens_per_s", "peak_rss_mb", "baseline_rss_mb"]
PROMPT = "The history of the city begins"


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


def file_weights(gguf: str) -> str:
    """The GGUF file's main weight type (the type of most of its tensor bytes)."""
    from gguf import GGUFReader

    sizes: dict[str, int] = {}
    for t in GGUFReader(gguf).tensors:
        name = t.tensor_type.name
        sizes[name] = sizes.get(name, 0) + int(t.n_bytes)
    return max(sizes, key=sizes.get)


def mdi_quantize(weights: str) -> str | None:
    """mdi's --quantize that keeps a file's precision."""
    if weights.startswith("Q4") or weights.startswith("IQ4"):
        return "int4"
    if weights.startswith(("Q8", "Q5", "Q6")):
        return "int8"
    return None


def llamacpp_rate(cfg: LlamaCppConfig, n_seqs: int) -> tuple[float, float]:
    """llama.cpp's generation tokens/s over all sequences and its peak RSS (MB)."""
    bench, batched = cfg.tools()
    if n_seqs == 1:
        out, rss = measured([str(bench), "-m", cfg.gguf, "-t", str(cfg.threads), "-p", "0",
                             "-n", str(cfg.n_tokens), "-r", "1", "-o", "json"])
        rows = json.loads(out)
        return float(rows[0]["avg_ts"]), rss
    ctx = n_seqs * (cfg.n_tokens + 16)
    out, rss = measured([str(batched), "-m", cfg.gguf, "-t", str(cfg.threads), "-c", str(ctx),
                         "-b", "2048", "-ub", "512", "-npp", "8", "-ntg", str(cfg.n_tokens),
                         "-npl", str(n_seqs), "--output-format", "jsonl"])
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            return float(row["speed_tg"]), rss
    raise RuntimeError(f"llama-batched-bench printed no result: {out[-400:]}")


def mdi_rate(cfg: LlamaCppConfig, n_seqs: int, quantize: str | None) -> tuple[float, float]:
    """mdi sample's tokens/s over all sequences and its peak RSS (MB)."""
    cmd = [sys.executable, "-m", "mdi.cli.main", "sample", "--ckpt", cfg.gguf, "--json",
           "--n-samples", str(n_seqs), "--n-tokens", str(cfg.n_tokens), "--temperature", "0",
           "--ignore-eos", "--threads", str(cfg.threads), "--prompt", PROMPT,
           "--max-context", str(max(256, cfg.n_tokens + 64))]
    if quantize:
        cmd += ["--quantize", quantize]
    if cfg.kv_dtype:
        cmd += ["--kv-dtype", cfg.kv_dtype]
    out, rss = measured(cmd)
    result = json.loads(out[out.index("{"):])
    return float(result["tokens_per_s"]), rss


def baseline_rss(threads: int) -> float:
    """Peak RSS (MB) of a process that imports torch and mdi's commands and does nothing."""
    code = (f"import torch; torch.set_num_threads({threads}); import mdi.cli.main, "
            "mdi.checkpoint.gguf")
    return measured([sys.executable, "-c", code])[1]


def run_vs_llamacpp(cfg: LlamaCppConfig) -> list[dict]:
    """Both engines at every sequence count, `runs` times, interleaved; writes
    runs.csv, summary.csv and tokens_per_s.png / peak_rss.png under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = file_weights(cfg.gguf)
    quantize = mdi_quantize(weights) if cfg.quantize == "auto" else cfg.quantize
    base = baseline_rss(cfg.threads)
    log.info("%s: %s weights; mdi runs with --quantize %s; an idle mdi process: %.0f MB",
             Path(cfg.gguf).name, weights, quantize or "none", base)
    rows = []
    for n in cfg.seqs:
        for run in range(cfg.runs):
            for engine in ("llama.cpp", "mdi"):
                t0 = time.time()
                if engine == "mdi":
                    rate, rss = mdi_rate(cfg, n, quantize)
                else:
                    rate, rss = llamacpp_rate(cfg, n)
                rows.append({"timestamp": round(t0, 1), "engine": engine,
                             "weights": quantize or "float" if engine == "mdi" else weights,
                             "n_seqs": n, "run": run, "n_tokens": cfg.n_tokens,
                             "threads": cfg.threads, "tokens_per_s": round(rate, 2),
                             "peak_rss_mb": round(rss, 1),
                             "baseline_rss_mb": round(base, 1) if engine == "mdi" else ""})
                log.info("%-9s %2d seq(s) run %d: %7.1f tokens/s, peak RSS %.0f MB", engine, n,
                         run, rate, rss)
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


def summarize(rows: list[dict]) -> list[dict]:
    """Per sequence count: each engine's best tokens/s and its peak RSS, and the ratios."""
    out = []
    for n in sorted({r["n_seqs"] for r in rows}):
        best = {e: max((r for r in rows if r["n_seqs"] == n and r["engine"] == e),
                       key=lambda r: r["tokens_per_s"]) for e in ("llama.cpp", "mdi")}
        m, l = best["mdi"], best["llama.cpp"]
        over = m["peak_rss_mb"] - m["baseline_rss_mb"]
        out.append({"n_seqs": n, "llamacpp_weights": l["weights"], "mdi_weights": m["weights"],
                    "llamacpp_tokens_per_s": l["tokens_per_s"], "mdi_tokens_per_s": m["tokens_per_s"],
                    "speed_ratio": round(m["tokens_per_s"] / l["tokens_per_s"], 3),
                    "llamacpp_peak_rss_mb": l["peak_rss_mb"], "mdi_peak_rss_mb": m["peak_rss_mb"],
                    "mdi_rss_over_runtime_mb": round(over, 1),
                    "memory_ratio": round(over / l["peak_rss_mb"], 3)})
    return out


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [s["n_seqs"] for s in summary]
    for key, what, name in (("tokens_per_s", "tokens/s (all sequences)", "tokens_per_s.png"),
                            ("peak_rss_mb", "peak RSS (MB)", "peak_rss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for engine, col in (("llama.cpp", "llamacpp_"), ("mdi", "mdi_")):
            ax.plot(ns, [s[col + key] for s in summary], marker="o", label=engine)
        if key == "peak_rss_mb":
            ax.plot(ns, [s["mdi_rss_over_runtime_mb"] for s in summary], marker="o",
                    linestyle="--", label="mdi minus its idle runtime")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel(what)
        ax.set_title(f"{summary[0]['llamacpp_weights']} file: mdi vs llama.cpp")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def format_summary(summary: list[dict]) -> str:
    lines = [f"{'seqs':>4}  {'llama.cpp tok/s':>15}  {'mdi tok/s':>9}  {'ratio':>5}  "
             f"{'llama.cpp RSS':>13}  {'mdi RSS':>7}  {'mdi-runtime':>11}  {'ratio':>5}"]
    for s in summary:
        lines.append(f"{s['n_seqs']:>4}  {s['llamacpp_tokens_per_s']:>15.1f}  "
                     f"{s['mdi_tokens_per_s']:>9.1f}  {s['speed_ratio']:>5.2f}  "
                     f"{s['llamacpp_peak_rss_mb']:>10.0f} MB  {s['mdi_peak_rss_mb']:>4.0f} MB  "
                     f"{s['mdi_rss_over_runtime_mb']:>8.0f} MB  {s['memory_ratio']:>5.2f}")
    return "\n".join(lines)

