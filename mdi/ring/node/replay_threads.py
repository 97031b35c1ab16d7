"""The replacement's replay on every core it may use (`--recovery replay`).

While a ring heals by replay (ring/node/resume.py), nothing else of it computes:
the survivors wait for the healed ring's first step, the starter for the spare.
The spare's prefill of the replayed positions through its layers is then the
recovery's critical path, and the node's `--threads` (1 per node process where
several share a machine's cores) would leave the other cores idle. So a REPLAY
frame is computed with the threads of every CPU the process may run on (its
affinity), and the node's own count is set back at once after the frame: the
healed ring's steps run as configured. `MDI_REPLAY_THREADS=N` in a node's
environment sets the count (1: the node's own --threads, as before; used by
`python -m mdi.bench.recovery --replay-threads` to compare).

The cache a replay fills is the one it fills with one thread, to the kernels'
rounding (tests/test_replay_threads.py): the matmuls split their rows and
columns over threads, not their sums.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

ENV_VAR = "MDI_REPLAY_THREADS"


def replay_threads() -> int:
    """The threads a replay computes with: $MDI_REPLAY_THREADS, else the CPUs this
    process may run on (ValueError naming the variable for a bad value)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ENV_VAR} must be a positive number of threads, got {value!r}")
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def replay_compute(threads: int | None = None) -> Iterator[int]:
    """Torch's threads raised to `threads` (None: replay_threads()) for the block,
    never lowered, and set back after it; yields the count the block runs with.
    Torch's thread count is per process: call it on the thread that computes."""
    before = torch.get_num_threads()
    n = max(before, threads if threads is not None else replay_threads())
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
