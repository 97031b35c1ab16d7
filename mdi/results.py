"""The outcome of a generation run, and the files a person reads afterwards:
one JSON object for scripts, a row per run in a --time-run CSV, and the
tokens-vs-time CSV and PNG of --plots."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

TIME_RUN_FIELDS = ["timestamp", "mode", "n_nodes", "n_samples", "n_layers", "block_size",
                   "n_tokens", "gen_time_s", "tokens_per_s"]


@dataclass
class HopStats:
    """What one hop of the ring carried in a run (activations, or token ids back to the starter)."""
    src: str
    dst: str
    decode_bytes: int = 0
    decode_tokens: int = 0
    prefill_bytes: int = 0
    # Time per frame at the hop's source node, summed over `frames` frames (s):
    # waiting for input, the stage's compute, and the rest (the hop's overhead:
    # message conversion, copies, socket writes); other_cpu_s is the overhead's
    # CPU time (the rest of other_s: the node was ready but other processes held
    # the cores), send_s the socket writes alone.
    frames: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0
    other_s: float = 0.0
    other_cpu_s: float = 0.0
    send_s: float = 0.0
    link: str = ""  # "unix" (a local socket, ring/local_link.py) or "tcp"; "" unknown
    ring: int = 0   # which of the run's rings (0: the first; each recovery or re-plan forms one)

    @property
    def bytes_per_token(self) -> float:
        return self.decode_bytes / self.decode_tokens if self.decode_tokens else 0.0

    def per_frame_us(self, seconds: float) -> float:
        return round(seconds / self.frames * 1e6, 1) if self.frames else 0.0

    @property
    def overhead_us(self) -> float:
        return self.per_frame_us(self.other_s)

    def to_dict(self) -> dict:
        return {"from": self.src, "to": self.dst, "decode_bytes": self.decode_bytes,
                "decode_tokens": self.decode_tokens, "prefill_bytes": self.prefill_bytes,
                "bytes_per_token": round(self.bytes_per_token, 3), "frames": self.frames,
                "wait_us": self.per_frame_us(self.wait_s),
                "compute_us": self.per_frame_us(self.compute_s), "overhead_us": self.overhead_us,
                "overhead_cpu_us": self.per_frame_us(self.other_cpu_s),
                "send_us": self.per_frame_us(self.send_s), "link": self.link, "ring": self.ring}


@dataclass(frozen=True)
class FailedNode:
    """The node a failed run blames, as the nodes file names it."""
    role: str
    index: int
    addr: str
    port: int
    port_in: int

    def to_dict(self) -> dict:
        return {"role": self.role, "index": self.index, "addr": self.addr, "port": self.port,
                "port_in": self.port_in}


@dataclass(frozen=True)
class Failure:
    """Why a run stopped early; the result then holds the tokens produced so far."""
    message: str
    node: FailedNode | None = None


@dataclass(frozen=True)
class Texts:
    """How a run turns token ids into text: the tokenizer, and the prompts as the user
    wrote them (a decoded prompt need not equal its text)."""
    tokenizer: Tokenizer
    prompts: list[str]

    def decode(self, tokens: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t) for t in tokens]


@dataclass
class GenerationResult:
    tokens: list[list[int]]            # new token ids per sample
    n_tokens: int                      # new tokens per sample
    gen_time_s: float
    step_times: list[float]            # seconds since start when step i's tokens were known
    n_layers: int
    block_size: int
    samples: list[str] = field(default_factory=list)   # text per sample, prompt excluded
    prompts: list[str] = field(default_factory=list)   # (both empty when built without Texts)
    mode: str = "single"
    n_nodes: int = 1
    hops: list[HopStats] | None = None  # ring runs only ([] on a one-node ring), around the ring
    failure: Failure | None = None      # set on the partial result of a failed run
    plan: dict | None = None            # the ring's split (ring/placement.py), ring runs only
    recoveries: list[dict] = field(default_factory=list)  # nodes lost and resumed from (ring_engine.py)
    compute: dict | None = None         # dtype (and why), kernels per kind (cli: --json)
    # seconds since start when each sample's token i came ([] where only step_times are known)
    token_times: list[list[float]] = field(default_factory=list)

    @classmethod
    def build(cls, tokens: list[list[int]], texts: Texts | None, **fields: Any
              ) -> "GenerationResult":
        """A complete result: texts decoded here, where generation ends."""
        if texts is None:
            return cls(tokens=tokens, **fields)
        return cls(tokens=tokens, samples=texts.decode(tokens), prompts=list(texts.prompts),
                   **fields)

    @property
    def n_samples(self) -> int:
        return len(self.tokens) if self.tokens else len(self.samples)

    @property
    def n_made(self) -> int:
        """New tokens over all samples (a sample that stopped early counts what it made)."""
        return sum(len(t) for t in self.tokens) if self.tokens else self.n_samples * self.n_tokens

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over all samples (those that stopped early count what they made)."""
        return self.n_made / self.gen_time_s if self.gen_time_s > 0 else 0.0

    @property
    def first_token_s(self) -> float:
        return self.step_times[0] if self.step_times else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens per second after each sample's first two (the prefill's token and
        the first decode step, which loads a compiled graph where there is one): what
        llama-bench's tgN measures. None for runs of fewer than 4 steps."""
        t = self.step_times
        if len(t) < 4 or t[-1] <= t[1]:
            return None
        if self.token_times:  # staggered samples: only the tokens that came inside the window
            return sum(1 for ts in self.token_times for x in ts[2:] if x > t[1]) / (t[-1] - t[1])
        return sum(max(0, len(x) - 2) for x in self.tokens) / (t[-1] - t[1])

    def sample_token_times(self) -> list[list[float]]:
        """Each sample's token times (s since start): its own where the run kept them, else
        the lockstep steps' (sample s has token i when step i ends)."""
        if self.token_times:
            return self.token_times
        return [self.step_times[:len(t)] for t in self.tokens]

    @property
    def bytes_per_hop_per_token(self) -> float:
        """Mean bytes per token over the hops that carry activations (not the way back)."""
        act = [h for h in self.hops or [] if h.dst != "starter"]
        return round(sum(h.bytes_per_token for h in act) / len(act), 3) if act else 0.0

    @property
    def hop_overhead_us(self) -> float:
        """Mean per-frame overhead (neither waiting nor compute) over the timed hops, in µs."""
        timed = [h for h in self.hops or [] if h.frames]
        return round(sum(h.overhead_us for h in timed) / len(timed), 1) if timed else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {"samples": self.samples, "n_samples": self.n_samples, "n_tokens": self.n_tokens,
               "gen_time_s": round(self.gen_time_s, 6), "tokens_per_s": round(self.tokens_per_s, 3),
               "first_token_s": round(self.first_token_s, 6), "mode": self.mode,
               "decode_tokens_per_s": (None if self.decode_tokens_per_s is None
                                       else round(self.decode_tokens_per_s, 3)),
               "n_nodes": self.n_nodes}
        if self.hops is not None:
            out["bytes_per_hop_per_token"] = self.bytes_per_hop_per_token
            out["hop_overhead_us"] = self.hop_overhead_us
            out["hops"] = [h.to_dict() for h in self.hops]
        if self.plan is not None:
            out["plan"] = self.plan
        if self.recoveries:
            out["recoveries"] = self.recoveries
        if self.compute is not None:
            out["compute"] = self.compute
        if self.failure is not None:
            out["error"] = self.failure.message
            if self.failure.node is not None:
                out["failed_node"] = self.failure.node.to_dict()
        return out

    def summary(self) -> str:
        made = self.n_made
        size = (f"{self.n_samples} sample(s) x {self.n_tokens} tokens"
                if made == self.n_samples * self.n_tokens else
                f"{self.n_samples} sample(s), {made} new tokens (at most {self.n_tokens} each)")
        return (f"{size} in {self.gen_time_s:.2f} s: "
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
