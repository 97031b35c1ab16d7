"""A lane's steps while one of its rows prefills a long prompt: growing KV buffers
against paged ones (issue 23.3).

    python -m mdi.bench.kv_steps --paged off
    python -m mdi.bench.kv_steps --paged on

A stage of SmolLM2's shape (its layers 1..18 of 30: the starter's share of a ring
of 2; random weights, float32, torch threads 1), a lane of 8 rows: 7 rows hold
64-token prompts and decode while the 8th prefills `--prompt` tokens in chunks of
`--chunk`, one decode of the 7 and one chunk per step, as `mdi serve` interleaves
them. Each step's CPU time (`time.thread_time`: less sensitive to other load than
wall time), every growth of the buffers and its CPU time, and the process's peak
RSS over the run (one mode per process, so the peaks do not mix).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from ..generate import step
from ..model import GPT, GPTConfig, KVCache

SMOLLM2 = GPTConfig(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
                    n_embd=576, intermediate_size=1536, norm="rmsnorm", positions="rope",
                    activation="swiglu", bias=False, tie_embeddings=True)
ROWS, SHORT = 8, 64


def smollm2_stage(layers: tuple[int, int] = (1, 19)) -> GPT:
    torch.manual_seed(0)
    stage = GPT(SMOLLM2, *layers).eval()
    stage.packed_linears = False
    return stage


def lane_steps(stage: GPT, paged: bool, prompt: int = 2048, chunk: int = 32,
               context: int = 4096) -> tuple[list[float], list[tuple[int, int, float]]]:
    """CPU seconds of each step, sorted, and the growths (from, to, CPU seconds)."""
    c = stage.config
    cache = KVCache(stage.n_blocks, ROWS, c.kv_heads, context, c.head_size, paged=paged)
    growths: list[tuple[int, int, float]] = []
    whole_reserve = cache.reserve

    def reserve(length: int) -> None:  # every row view's growth reaches the whole cache here
        n, t = cache.allocated, time.thread_time()
        whole_reserve(length)
        if cache.allocated != n:
            growths.append((n, cache.allocated, time.thread_time() - t))
    cache.reserve = reserve
    times = []
    with torch.inference_mode():
        for r in range(ROWS - 1):
            step.prefill(stage, cache, r, torch.randn(1, SHORT, c.n_embd), 0)
        pos = [SHORT] * (ROWS - 1)
        for start in range(0, prompt, chunk):
            t = time.thread_time()
            step.decode(stage, cache.rows(0, ROWS - 1), torch.randn(ROWS - 1, 1, c.n_embd), pos)
            step.prefill(stage, cache, ROWS - 1, torch.randn(1, min(chunk, prompt - start),
                                                             c.n_embd), start)
            times.append(time.thread_time() - t)
            pos = [p + 1 for p in pos]
    return sorted(times), growths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paged", choices=["on", "off"], required=True)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    stage = smollm2_stage()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, growths = lane_steps(stage, args.paged == "on", args.prompt, args.chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"paged {args.paged}: {len(t)} steps, CPU p50 {statistics.median(t) * 1e3:.0f} ms, "
          f"worst {[round(x * 1e3) for x in t[-3:]]} ms, total {sum(t):.2f} s; growths "
          f"{[(a, b, round(s * 1e3)) for a, b, s in growths]} (from, to, ms); peak RSS "
          f"+{(peak - before) / 1024:.0f} MB over the stage's")


if __name__ == "__main__":
    main()
