"""Load benchmark of an OpenAI-compatible server (`mdi serve-bench`).

At each concurrency level C, C clients each send `requests_per_client` streaming
completions one after the other; we time every request from the client side:
time to first token (TTFT: first chunk with text), inter-token latency (ITL:
between text chunks) and the whole request, and count completion tokens from
the usage the server reports. With prompts given as token ids (`--prompt-tokens`,
bench/latency.py:prompt_ids) every prompt length runs every level. One CSV row
per prompt length and level, plus a figure.

With a long prompt (`--long-prompt-tokens N`), one more request of N prompt
tokens arrives `long_after_s` seconds into each level: its time to first token
is the window of its prefill, and the other streams' inter-token latency inside
that window (`itl_long_*`) beside their p50 over the level says whether the
prefill froze them (issue 23: chunked prefill interleaved with decode).
"""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .abuse import Attack
from .latency import percentile

log = logging.getLogger("mdi.bench")
COLUMNS = ["attack", "prompt_tokens", "concurrency", "requests", "errors", "wall_s", "requests_per_s", "tokens", "tokens_per_s",
           "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "latency_p50_s", "latency_p99_s",
           "ttft_count", "itl_count", "long_prompt_tokens", "long_ttft_s", "itl_long_p50_s",
           "itl_long_p99_s", "itl_long_count"]


@dataclass(frozen=True)
class LoadConfig:
    url: str                                  # server root, e.g. http://127.0.0.1:8000
    model: str
    api_key: str | None = None
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    requests_per_client: int = 4
    max_tokens: int = 64
    prompt: str = "\n"
    # prompts as token ids, each run at every level (then `prompt` is not sent)
    token_prompts: tuple[tuple[int, ...], ...] = ()
    temperature: float = 0.0
    timeout_s: float = 600.0
    # each level also under attack (bench/abuse.py:Attack): slow-body sockets, never-read streams
    attack: tuple[int, int] | None = None
    # one more request with this prompt (token ids) arrives long_after_s into each level
    long_prompt: tuple[int, ...] = ()
    long_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be positive, got {self.concurrency}")
        if self.requests_per_client < 1 or self.max_tokens < 1:
            raise ValueError("requests per client and max tokens must be positive")


@dataclass
class Timing:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    itl_end: list[float] = field(default_factory=list)  # perf_counter() at the end of each gap
    start: float = 0.0                                  # perf_counter() at the request
    latency_s: float = 0.0
    tokens: int = 0
    prompt_tokens: int | None = None   # as the server's usage counts them
    error: str | None = None


async def one_request(http: httpx.AsyncClient, cfg: LoadConfig,
                      prompt: str | list[int] | None = None, max_tokens: int | None = None
                      ) -> Timing:
    body = {"model": cfg.model, "prompt": cfg.prompt if prompt is None else prompt,
            "max_tokens": max_tokens or cfg.max_tokens, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last: float | None = None
    out = Timing(ok=False, start=t0)
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            out.error = f"{resp.status_code}: {resp.text[:200]}"
            return out
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                out.error = obj["error"].get("message")
                return out
            now = time.perf_counter()
            if any(c.get("text") for c in obj.get("choices", [])):
                if last is None:
                    out.ttft_s = now - t0
                else:
                    out.itl_s.append(now - last)
                    out.itl_end.append(now)
                last = now
            if obj.get("usage"):
                out.tokens = obj["usage"]["completion_tokens"]
                out.prompt_tokens = obj["usage"].get("prompt_tokens")
    out.latency_s = time.perf_counter() - t0
    out.ok = True
    return out


_pct = percentile


async def run_level(cfg: LoadConfig, concurrency: int, prompt: str | list[int] | None = None
                    ) -> dict:
    """Every client sends its requests, one after the other; prompt: None is cfg.prompt."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1)
    timings: list[Timing] = []
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits,
                                 timeout=cfg.timeout_s) as http:
        async def client() -> None:
            for _ in range(cfg.requests_per_client):
                timings.append(await one_request(http, cfg, prompt))

        async def long_one() -> Timing:
            await asyncio.sleep(cfg.long_after_s)
            return await one_request(http, cfg, list(cfg.long_prompt), max_tokens=1)

        t0 = time.perf_counter()
        long_task = asyncio.create_task(long_one()) if cfg.long_prompt else None
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        long = await long_task if long_task is not None else None
    ok = [t for t in timings if t.ok]
    for t in timings:
        if not t.ok:
            log.warning("request failed: %s", t.error)
    tokens = sum(t.tokens for t in ok)
    itl = [x for t in ok for x in t.itl_s]
    ttft = [t.ttft_s for t in ok if t.ttft_s is not None]
    lat = [t.latency_s for t in ok]
    counted = [t.prompt_tokens for t in ok if t.prompt_tokens is not None]
    n_prompt = len(prompt) if isinstance(prompt, list) else (counted[0] if counted else "")
    row = {"prompt_tokens": n_prompt, "concurrency": concurrency, "requests": len(ok), "errors": len(timings) - len(ok),
           "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens": tokens,
           "tokens_per_s": tokens / wall, "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
           "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
           "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
           "ttft_count": len(ttft), "itl_count": len(itl)}
    if long is not None:
        row.update(long_prefill(long, ok, len(cfg.long_prompt)))
    return row


def long_prefill(long: Timing, others: list[Timing], n_tokens: int) -> dict:
    """The long prompt's TTFT, and the other streams' gaps that overlap its prefill window
    (from its request to its first token)."""
    if not long.ok or long.ttft_s is None:
        log.warning("the long prompt's request failed: %s", long.error)
        return {"long_prompt_tokens": n_tokens, "long_ttft_s": float("nan"), "itl_long_count": 0,
                "itl_long_p50_s": float("nan"), "itl_long_p99_s": float("nan")}
    a, b = long.start, long.start + long.ttft_s
    gaps = [g for t in others for g, end in zip(t.itl_s, t.itl_end) if end > a and end - g < b]
    return {"long_prompt_tokens": n_tokens, "long_ttft_s": long.ttft_s,
            "itl_long_p50_s": _pct(gaps, 50), "itl_long_p99_s": _pct(gaps, 99),
            "itl_long_count": len(gaps)}


def run_load(cfg: LoadConfig) -> list[dict]:
    """Every prompt at every level; with cfg.attack each level runs again under attack,
    right after the run without (the two side by side)."""
    rows = []
    prompts: list[list[int] | None] = [list(p) for p in cfg.token_prompts] or [None]
    for prompt in prompts:
        for c in cfg.concurrency:
            for attack in ((None, cfg.attack) if cfg.attack else (None,)):
                with (Attack(cfg.url, cfg.api_key, cfg.model, *attack) if attack
                      else contextlib.nullcontext()):
                    row = asyncio.run(run_level(cfg, c, prompt))
                row["attack"] = f"{attack[0]} slow + {attack[1]} unread" if attack else ""
                log.info("prompt %s tokens, concurrency %d%s: %.2f req/s, %.1f tok/s, TTFT p50 "
                         "%.3fs, ITL p50 %.4fs", row["prompt_tokens"], c,
                         f", under attack ({row['attack']})" if attack else "",
                         row["requests_per_s"], row["tokens_per_s"], row["ttft_p50_s"],
                         row["itl_p50_s"])
                rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def write_plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys((r["prompt_tokens"], r.get("attack", "")) for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for n, attack in series:
        rs = [r for r in rows if (r["prompt_tokens"], r.get("attack", "")) == (n, attack)]
        c = [r["concurrency"] for r in rs]
        tag = ("" if len({s[0] for s in series}) == 1 else f", prompt {n}") + \
            (", under attack" if attack else "")
        axes[0].plot(c, [r["tokens_per_s"] for r in rs], "o-", label=f"tokens/s{tag}")
        for ax, what in ((axes[1], "ttft"), (axes[2], "itl")):
            line, = ax.plot(c, [r[f"{what}_p50_s"] * 1e3 for r in rs], "o-", label=f"p50{tag}")
            ax.plot(c, [r[f"{what}_p99_s"] * 1e3 for r in rs], "s--", color=line.get_color(),
                    label=f"p99{tag}")
    axes[0].set_ylabel("aggregate tokens/s")
    axes[1].set_ylabel("time to first token (ms)")
    axes[2].set_ylabel("inter-token latency (ms)")
    levels = sorted({r["concurrency"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
