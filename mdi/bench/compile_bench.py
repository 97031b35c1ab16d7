"""`mdi bench --compile off,on`: the eager and the compiled decode step side by side.

Each configuration runs in its own process (mdi.bench.worker, single device,
greedy): `off` eager; `on` compiled twice in a row with the same, initially
empty, Inductor cache directory under --out, so that the first `on` run pays the
whole compile ("cold") and the second finds every graph on disk ("cached", what
every later start of the same model and shapes costs). The rows interleave by
sequence count, so a machine that slows down slows all of them.

Reported per run: decode tokens/s after the first two steps (the first compiled
step compiles or loads its graph; prefill is eager in both), the whole run's
tokens/s, `compile_s` (the first call of each compiled graph: compile, or load
from the cache) and the process's wall time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .report import write_rows

FIELDS = ["timestamp", "ckpt", "weights", "compile", "n_seqs", "n_tokens", "threads",
          "decode_tokens_per_s", "tokens_per_s", "compile_s", "graphs", "wall_s", "tokens_sha"]
MODES = ("off", "on")


@dataclass
class CompileBenchConfig:
    ckpt: str
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seqs: list[int] = field(default_factory=lambda: [1, 16])
    n_tokens: int = 64
    threads: int = 2
    quantize: str | None = None
    out: str = "bench-compile"

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--compile takes a comma-separated list of off and on, got "
                             f"{','.join(self.modes)!r}")
        if self.n_tokens < 4:
            raise ValueError(f"--compile needs --n-tokens of at least 4, got {self.n_tokens}")


def decode_rate(step_times: list[float], n_seqs: int, skip: int = 2) -> float:
    """tokens/s of the steps after the first `skip` (step_times: seconds since the
    start at the end of each step)."""
    t = step_times
    if skip < 1 or len(t) <= skip:
        raise ValueError(f"{len(t)} steps: too few to skip {skip}")
    return n_seqs * (len(t) - skip) / (t[-1] - t[skip - 1])


def one_run(cfg: CompileBenchConfig, n_seqs: int, compiled: bool, cache_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "mdi.bench.worker", "--ckpt", cfg.ckpt, "--n-samples",
           str(n_seqs), "--n-tokens", str(cfg.n_tokens), "--threads", str(cfg.threads),
           "--temperature", "0"]
    if cfg.quantize:
        cmd += ["--quantize", cfg.quantize]
    if compiled:
        cmd.append("--compile")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"decode_tokens_per_s": round(decode_rate(r["step_times"], n_seqs), 2),
            "tokens_per_s": round(r["tokens_per_s"], 2), "compile_s": r.get("compile_s", ""),
            "graphs": r.get("graphs", ""), "wall_s": round(wall, 1), "tokens_sha": r["tokens_sha"]}


def run_compile_bench(cfg: CompileBenchConfig) -> list[dict]:
    """Every sequence count: off, on (cold), on (cached); runs.csv under cfg.out."""
    out = Path(cfg.out)
    rows = []
    for n in cfg.seqs:
        cache_dir = out / f"inductor-cache-seqs{n}"  # each count's first compiled run is cold
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        runs = [("off", False)] if "off" in cfg.modes else []
        if "on" in cfg.modes:
            runs += [("on (cold)", True), ("on (cached)", True)]
        for name, compiled in runs:
            r = one_run(cfg, n, compiled, cache_dir)
            rows.append({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "ckpt": cfg.ckpt,
                         "weights": cfg.quantize or "float32", "compile": name, "n_seqs": n,
                         "n_tokens": cfg.n_tokens, "threads": cfg.threads, **r})
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    write_rows(rows, out / "runs.csv", FIELDS)
    return rows


def format_row(r: dict) -> str:
    return (f"{r['weights']:<8} {r['n_seqs']:>4} {r['compile']:<12} "
            f"{r['decode_tokens_per_s']:>9.1f} {r['tokens_per_s']:>9.1f} "
            f"{str(r['compile_s']):>9} {r['wall_s']:>7.1f}  {r['tokens_sha']}")


def format_summary(rows: list[dict]) -> str:
    head = (f"{'weights':<8} {'seqs':>4} {'compile':<12} {'decode t/s':>9} {'run t/s':>9} "
            f"{'compile_s':>9} {'wall_s':>7}  tokens")
    return "\n".join([head] + [format_row(r) for r in rows])
