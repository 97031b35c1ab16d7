"""The replacement's replay on every core it may use (`--recovery replay`).

While a ring heals by replay (ring/node/resume.py), nothing else of it computes:
the survivors wait for the healed ring's first step, the starter for the spare.
The spare's prefill of the replayed positions through its layers is then the
recovery's critical path, and the node's `--threads` (1 per node process where
several share a machine's cores) would leave the other cores idle. So a REPLAY
frame is computed with the threads of every CPU the process may run on (its
affinity), and the node's own count is set back at once after the frame: the
healed ring's steps run as configured.

The cache a replay fills is the one it fills with one thread, to the kernels'
rounding (tests/test_replay_threads.py): the matmuls split their rows and
columns over threads, not their sums.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def replay_threads() -> int:
    """The threads a replay computes with: the CPUs this process may run on."""
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
