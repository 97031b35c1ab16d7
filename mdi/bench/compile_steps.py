"""The decode step eager and compiled several ways, interleaved in one process.

    python -m mdi.bench.compile_steps --ckpt C [--quantize int4] --rows 1 \
        --ways eager,inductor,cpp_wrapper,aoti --steps 48 --threads 2

Each way decodes its own cache (the same prompt in every row, greedy) and the
ways take turns step by step, so that a slow moment of a shared machine slows
all of them; printed per way: the first call (compile, or load from the cache
directory), then the min and median of the later steps, ms, and whether its
tokens equal eager's. Ways: eager (the default eager step: float32 weights
oneDNN-prepacked), inductor (torch.compile, `--compile` until 2026-12-07),
cpp_wrapper and freezing (the same with that Inductor setting), aoti (an
AOTInductor package, model/aoti.py). A scratch tool for docs/benchmarks.md,
not a bench mode: Inductor's cache goes to --cache-dir.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

WAYS = {"eager": None, "inductor": ("inductor", {}), "cpp_wrapper": ("inductor", {"cpp_wrapper": True}),
        "freezing": ("inductor", {"freezing": True}),
        "cpp_wrapper+freezing": ("inductor", {"cpp_wrapper": True, "freezing": True}),
        "aoti": ("aoti", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--quantize", default=None)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--ways", default="eager,inductor,aoti")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="TORCHINDUCTOR_CACHE_DIR (default: mdi's)")
    args = p.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",")]
    bad = [w for w in ways if w not in WAYS]
    if bad:
        p.error(f"--ways: unknown {bad}; known: {', '.join(WAYS)}")
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    torch.set_num_threads(args.threads)

    from ..checkpoint.sources import load_stage
    from ..generate import step
    from ..model.compiled import CompiledDecode

    t0 = time.perf_counter()
    eager, _ = load_stage(args.ckpt, dtype=torch.float32, quantize=args.quantize)
    plain = None
    if any(WAYS[w] for w in ways):
        plain, _ = load_stage(args.ckpt, dtype=torch.float32, quantize=args.quantize, pack=False)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n, P = args.rows, args.prompt
    prompt = [(7 * i + 3) % eager.config.vocab_size for i in range(P)]
    runs = {}
    for w in ways:
        model = eager if WAYS[w] is None else plain
        cache = model.new_cache(n)
        with torch.inference_mode():
            for r in range(n):
                step.prefill(model, cache, r, prompt[:-1])
        fn = None
        if WAYS[w] is not None:
            how, options = WAYS[w]
            fn = CompiledDecode(plain, how=how, options=options)
        runs[w] = {"model": model, "cache": cache, "fn": fn, "tok": [prompt[-1]] * n,
                   "times": [], "tokens": []}
    for s in range(args.steps):
        for w in ways:
            r = runs[w]
            positions = [P - 1 + s] * n
            t = time.perf_counter()
            with torch.inference_mode():
                if r["fn"] is None:
                    out = step.decode(r["model"], r["cache"], r["tok"], positions)
                else:
                    x = torch.tensor(r["tok"], dtype=torch.long)[:, None]
                    out = r["fn"](r["cache"], x, positions)[:, -1]
            r["times"].append(time.perf_counter() - t)
            r["tok"] = out.argmax(-1).tolist()
            r.setdefault("logits", []).append(out.float())
            r["tokens"].append(r["tok"])
        if s == 0:
            print("first calls (s): " + ", ".join(f"{w} {runs[w]['times'][0]:.2f}" for w in ways),
                  file=sys.stderr, flush=True)
    base = runs[ways[0]]["tokens"]
    ref = runs[ways[0]]["logits"]
    print(f"{args.ckpt} {args.quantize or 'float32'} rows={n} steps={args.steps} "
          f"threads={args.threads} (ms; the first 2 steps left out)")
    for w in ways:
        t = [x * 1e3 for x in runs[w]["times"][2:]]
        print(f"  {w:<22} first {runs[w]['times'][0]:7.2f} s  min {min(t):7.2f}  median "
              f"{statistics.median(t):7.2f}  t/s(median) {n * 1e3 / statistics.median(t):7.1f}  "
              f"tokens {_same(runs[w]['tokens'], base)} {ways[0]}'s (logits: max |diff| "
              f"{_drift(runs[w]['logits'], ref, runs[w]['tokens'], base):.2e} until then)")
    return 0


def _same(tokens: list, base: list) -> str:
    """'=', or where the greedy tokens first part (a near tie decided the other way)."""
    if tokens == base:
        return "="
    first = next(i for i, (a, b) in enumerate(zip(tokens, base)) if a != b)
    return f"!= from step {first}:"


def _drift(logits: list, ref: list, tokens: list, base: list) -> float:
    """The largest |logit difference| over the steps before the tokens part."""
    n = next((i for i, (a, b) in enumerate(zip(tokens, base)) if a != b), len(tokens))
    return max((a - b).abs().max().item() for a, b in zip(logits[:n + 1], ref[:n + 1]))


if __name__ == "__main__":
    sys.exit(main())
