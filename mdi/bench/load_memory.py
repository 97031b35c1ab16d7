"""Peak memory of loading a stage, fp32 against int8, each in a fresh process.

    python -m mdi.bench.load_memory --model-size gpt2 [--model-size tinyllama-1.1b]

For each way of loading, a child process imports torch and mdi, notes its
peak resident memory (the runtime), loads, and reports the new peak
(VmHWM) and the bytes of the stage's tensors. Ways:

- single / single-old: the whole model (`load_model`); "-old" quantizes after
  loading the float model whole, as every loader did before StageBuilder.
- node / node-old: the second half of the layers as a secondary node takes
  them, from the safetensors stream a starter sends (`iter_stream` into a
  StageBuilder); "-old" collects the stream's tensors, builds, then quantizes.

Random weights (bench/models.py); the checkpoints are written once under --dir.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path

WAYS = ("single", "single-old", "node", "node-old")


def _peak() -> int:
    """Peak resident bytes of this process (VmHWM: unlike ru_maxrss, not inherited
    from the parent across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _child(ckpt: str, way: str, quantize: str | None) -> dict:
    import torch

    from ..checkpoint import LoadOptions, load_model, open_checkpoint
    from ..checkpoint.format import StageBuilder, build_stage
    from ..checkpoint.malloc import mapped_allocations
    from ..checkpoint.stream import iter_stream, read_stream, shard_stream
    from ..model.quant import configure_stage, weight_bytes
    from ..ring.plan.partition import Shard

    torch.set_num_threads(1)
    ck = open_checkpoint(ckpt)
    n = ck.config.n_layer
    shard = Shard(n // 2, n, n)
    base = _peak()

    async def chunks():
        for c in shard_stream(ck, shard)[1]:
            yield c

    async def node_new():
        b = StageBuilder(ck.config, shard.start, shard.stop, dtype=torch.float32, quantize=quantize)
        with mapped_allocations():  # as NodeRuntime.load_weights
            async for name, t in iter_stream(chunks(), b.want):
                b.put(name, t)
                del t
        return b.finish()

    async def node_old():
        tensors = await read_stream(chunks(), StageBuilder(ck.config, shard.start, shard.stop).want)
        stage = build_stage(ck.config, shard.start, shard.stop, tensors.get, dtype=torch.float32)
        return configure_stage(stage, quantize, pack=False)

    # pack=False: the loader's own peak (the packed copy of float32 weights comes on
    # top, at load or first use, and is counted by the node's /init)
    if way == "single":
        stage = load_model(ck, LoadOptions(dtype=torch.float32, quantize=quantize, pack=False)).model
    elif way == "single-old":
        stage = load_model(ck, LoadOptions(dtype=torch.float32, pack=False)).model
        configure_stage(stage, quantize, pack=False)
    elif way == "node":
        stage = asyncio.run(node_new())
    else:
        stage = asyncio.run(node_old())
    return {"runtime_bytes": base, "peak_bytes": _peak(), "weight_bytes": weight_bytes(stage)}


def measure(ckpt: Path, way: str, quantize: str | None) -> dict:
    """One load in a fresh process: {runtime_bytes, peak_bytes, weight_bytes}."""
    cmd = [sys.executable, "-m", "mdi.bench.load_memory", "--child", str(ckpt), way,
           quantize or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-size", action="append", default=None,
                   help="a size of bench/models.py (repeatable; default gpt2)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    p.add_argument("--dir", default="/tmp/mdi-bench-models", help="where the checkpoints are kept")
    p.add_argument("--child", nargs=3, metavar=("CKPT", "WAY", "QUANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        ckpt, way, quant = args.child
        print(json.dumps(_child(ckpt, way, None if quant == "none" else quant)))
        return 0
    from .models import random_checkpoint

    mb = 1e6
    print("model            way         quant  weights MB  runtime MB  peak MB  peak-runtime MB")
    for size in args.model_size or ["gpt2"]:
        ckpt = random_checkpoint(size, args.dir)
        for way in args.ways.split(","):
            for quant in (None, "int8"):
                if way.endswith("-old") and quant is None:
                    continue  # float loading did not change
                r = measure(ckpt, way, quant)
                print(f"{size:16s} {way:11s} {quant or 'fp32':6s} {r['weight_bytes'] / mb:10.0f} "
                      f"{r['runtime_bytes'] / mb:11.0f} {r['peak_bytes'] / mb:8.0f} "
                      f"{(r['peak_bytes'] - r['runtime_bytes']) / mb:16.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
