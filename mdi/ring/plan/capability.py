"""What a node can do: its device and memory, and a measured speed for a run's shape.

`node_capabilities` is cheap (no compute) and answers GET /capabilities.
`probe_speed` times one block, a frame's fixed cost (reading and writing it,
the step's bookkeeping, the stage's call: frame_probe.py) and the embeddings
and the head with the sampling of every row at the CLI's default settings (the
first and last stages' extra cost), with random weights of the run's
configuration, at the run's group size, dtype and typical context, over
decode steps with a KV cache on the path a node's frames take. Attention reads
the filled part of the cache only, so a block's cost grows with the context
while the head's does not; a run of short sequences needs blocks timed at its
own context to balance its stages. `ProbeCache` keeps one answer per (shape,
batch, dtype, device, context), so a node is timed once per model and context.

Timings run for at least `min_time` seconds of wall time each, not a fixed
number of steps: a CPU capped by a CFS quota (cgroups) runs at full speed
until its quota for the period is spent, so a burst shorter than a period
would not see the cap.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
from dataclasses import asdict, dataclass

import torch

from ...model import GPT, GPTConfig
from ...model.dtypes import DTYPES, KV_DTYPES
from ...model.meta import on_meta
from ...model.quant import quantize as quantize_stage
from .cgroups import cgroup_cpu_limit
from .frame_probe import time_stages
from .fused_check import fused_state
from .limits import free_memory

log = logging.getLogger(__name__)
MIN_TIME_S = 0.25   # per timed stage; several CFS periods (100 ms by default)
# A live re-plan's probes (fresh): the ring waits for them, and they took 4.5 of a re-plan's
# 5 s pause on the bundled model's 3-node ring at MIN_TIME_S; 0.1 s still spans ten of
# `mdi bench --node-cpu`'s 10 ms periods (one of the kernel's default 100 ms).
FRESH_MIN_TIME_S = 0.1
PROBE_STAGES = ((0, 1), (1, 2), (1, 3), (3, 4))  # of 4 blocks: first, middle (1 and 2), last


@dataclass(frozen=True)
class Speed:
    """Milliseconds per decode step of one group (batch rows) on this node."""
    block_ms: float   # one transformer block
    embed_ms: float   # the first stage's extra: token and position embeddings
    head_ms: float    # the last stage's extra: final norm, head and sampling
    frame_ms: float = 0.0  # a frame's fixed cost, whatever the layers: frame_probe.py

    def to_dict(self) -> dict:
        return {k: round(v, 5) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class StageMemory:
    """Bytes at a dtype: one block's weights + KV cache, and the end stages' extras."""
    block_bytes: int   # weights and KV cache of one block for `batch` samples
    embed_bytes: int   # embeddings (the starter)
    head_bytes: int    # final norm and head (the finisher; untied from the embeddings)


def _three_layer(config: GPTConfig) -> GPTConfig:
    """The same shape with 3 blocks, so first/middle/last stages exist separately."""
    return GPTConfig.from_dict({**config.to_dict(), "n_layer": 3})


def _nbytes(module: torch.nn.Module) -> int:
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def stage_memory(config: GPTConfig, n_samples: int, dtype: str = "float32",
                 max_context: int | None = None, quantize: str | None = None,
                 kv_dtype: str | None = None) -> StageMemory:
    """What blocks and end stages need, computed on the meta device (no memory used).

    n_samples: KV cache rows for the whole run (every group's cache lives on
    every node); max_context, quantize, kv_dtype: the run's (--max-context,
    --quantize, --kv-dtype; None: the caches store dtype)."""
    c3 = _three_layer(config)
    with on_meta():
        stages = [quantize_stage(GPT(c3, i, i + 1).to(DTYPES[dtype]), quantize) for i in range(3)]
        stages[1].max_context = max_context  # the caches' length: min(block_size, the cap)
        cache = stages[1].new_cache(n_samples, dtype=KV_DTYPES[kv_dtype] if kv_dtype else None)
    kv = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        t.numel() * t.element_size() for t in list(cache.k) + list(cache.v))
    block = _nbytes(stages[1])
    return StageMemory(block + kv, max(0, _nbytes(stages[0]) - block),
                       max(0, _nbytes(stages[2]) - block))


def probe_speed(config: GPTConfig, batch: int, dtype: str = "float32", device: str = "cpu",
                min_time: float = MIN_TIME_S, seed: int = 0, context: int | None = None) -> Speed:
    """Time one block, a frame's fixed cost and the end stages' extras for this shape
    (random weights) on the frame path (frame_probe.py), at `context` positions
    (None: a quarter of the model's cache).

    A middle stage is timed with one block and with two: the difference is a
    block, the rest of the one-block stage is the frame's fixed cost (reading and
    writing it, the step's bookkeeping, the stage's call). The end stages' extras
    are their time past the one-block middle stage's."""
    c4 = GPTConfig.from_dict({**config.to_dict(), "n_layer": 4})
    torch.manual_seed(seed)
    stages = [GPT(c4, a, b).to(device=device, dtype=DTYPES[dtype]).eval() for a, b in PROBE_STAGES]
    first, one, two, last = time_stages(stages, batch, device, min_time, context)
    del stages

    def past_one(other: list[float]) -> float:
        """Median over the rounds of a stage's time past the one-block stage's."""
        return statistics.median(b - a for a, b in zip(one, other))

    whole = statistics.median(one)
    block = past_one(two)
    if not 0.05 * whole < block <= whole:  # noise swamped the difference: all of it per block
        block = whole
    return Speed(block, max(0.0, past_one(first)), max(0.0, past_one(last)), whole - block)


class ProbeCache:
    """One measured Speed per (shape, batch, dtype, device, context); thread-safe."""

    def __init__(self, min_time: float = MIN_TIME_S) -> None:
        self.min_time = min_time
        self._lock = threading.Lock()
        self._speeds: dict[tuple, Speed] = {}

    def cached(self, config: GPTConfig, batch: int, dtype: str, device: str,
               context: int | None = None) -> Speed | None:
        """The speed kept for this shape, if any (no compute)."""
        with self._lock:
            return self._speeds.get(_key(config, batch, dtype, device, context))

    def get(self, config: GPTConfig, batch: int, dtype: str, device: str,
            context: int | None = None, fresh: bool = False) -> tuple[Speed, bool]:
        """(speed, whether it came from the cache); fresh: time it again, for
        FRESH_MIN_TIME_S (a re-plan: the device may have slowed since), and keep that."""
        key = _key(config, batch, dtype, device, context)
        with self._lock:
            if key in self._speeds and not fresh:
                return self._speeds[key], True
        min_time = min(self.min_time, FRESH_MIN_TIME_S) if fresh else self.min_time
        speed = probe_speed(config, batch, dtype, device, min_time, context=context)
        with self._lock:
            self._speeds[key] = speed
        log.info("probed %d-dim blocks at batch %d, %s on %s, context %s: %.3f ms per block "
                 "per step, %.3f ms per frame", config.n_embd, batch, dtype, device,
                 "default" if context is None else context, speed.block_ms, speed.frame_ms)
        return speed, False


def _key(config: GPTConfig, batch: int, dtype: str, device: str, context: int | None) -> tuple:
    return (tuple(sorted(config.to_dict().items())), batch, dtype, device, context)


# ---- device and memory --------------------------------------------------------
def effective_cpus() -> float:
    """Cores this process may use: its affinity, capped by a cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return round(min(float(cores), quota), 3) if quota is not None else float(cores)


def node_capabilities(device: str = "cpu", max_memory: int | None = None) -> dict:
    """Device, memory, CPUs and the fused decode kernels, as GET /capabilities reports them.

    budget_bytes: what the node accepts for a run's weights and caches, the
    free memory capped by max_memory (`mdi node --max-memory`)."""
    memory = free_memory(device)
    free, total = memory.free, memory.total
    budget = free if max_memory is None else min(free, max_memory)
    name = torch.cuda.get_device_name(torch.device(device)) \
        if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"device": device, "device_name": name, "memory_total_bytes": total,
            "memory_free_bytes": free, "max_memory_bytes": max_memory, "budget_bytes": budget,
            "cpu_count": os.cpu_count(), "cpus": effective_cpus(),
            "cpu_set": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "host_id": host_id(), "torch_threads": torch.get_num_threads(),
            "fused_kernels": fused_state(device)}  # fused_check.py


def host_id() -> str | None:
    """This machine's identity for this boot (Linux: the kernel's boot_id), the same for
    every process, container and network namespace on it: nodes that report the
    same one share its cores."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None
