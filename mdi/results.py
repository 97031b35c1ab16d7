"""The outcome of a generation run, and the files a person reads afterwards:
one JSON object for scripts, a row per run in a --time-run CSV, and the
tokens-vs-time CSV and PNG of --plots."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIME_RUN_FIELDS = ["timestamp", "mode", "n_nodes", "n_samples", "n_layers", "block_size",
                   "n_tokens", "gen_time_s", "tokens_per_s"]


@dataclass
class GenerationResult:
    samples: list[str]                 # generated text per sample, prompt excluded
    prompts: list[str]
    n_tokens: int                      # new tokens per sample
    gen_time_s: float
    step_times: list[float]            # seconds since start when step i's tokens were known
    n_layers: int
    block_size: int
    tokens: list[list[int]] = field(default_factory=list)  # new token ids per sample
    mode: str = "single"
    n_nodes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(self.tokens) if self.tokens else len(self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.n_samples * self.n_tokens / self.gen_time_s if self.gen_time_s > 0 else 0.0

    @property
    def first_token_s(self) -> float:
        return self.step_times[0] if self.step_times else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "n_samples": self.n_samples, "n_tokens": self.n_tokens,
                "gen_time_s": round(self.gen_time_s, 6), "tokens_per_s": round(self.tokens_per_s, 3),
                "first_token_s": round(self.first_token_s, 6), "mode": self.mode,
                "n_nodes": self.n_nodes, **self.extra}

    def summary(self) -> str:
        return (f"{self.n_samples} sample(s) x {self.n_tokens} tokens in {self.gen_time_s:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s ({self.mode}, {self.n_nodes} node(s))")


def append_time_run(path: str | Path, r: GenerationResult) -> None:
    """Append one row; write the header when the file is new (the original's CSV, extended)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(TIME_RUN_FIELDS)
        w.writerow([time.strftime("%Y-%m-%dT%H:%M:%S"), r.mode, r.n_nodes, r.n_samples, r.n_layers,
                    r.block_size, r.n_tokens, f"{r.gen_time_s:.6f}", f"{r.tokens_per_s:.3f}"])


def write_plots(out_dir: str | Path, r: GenerationResult, name: str = "tokens_time") -> list[Path]:
    """Tokens generated (all samples) against time: CSV and PNG."""
    from .plots import plot_tokens_time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{name}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "time_s"])
        for i, t in enumerate(r.step_times):
            w.writerow([i + 1, (i + 1) * r.n_samples, f"{t:.6f}"])
    png = out / f"{name}.png"
    plot_tokens_time({f"{r.mode}, {r.n_nodes} node(s)": ([(i + 1) * r.n_samples for i in range(
        len(r.step_times))], r.step_times)}, png, title=f"{r.n_samples} samples x {r.n_tokens} tokens")
    return [csv_path, png]


def dump_json(r: GenerationResult) -> str:
    return json.dumps(r.to_json(), ensure_ascii=False)
