"""One thread for a process's torch work: the model's load and every step.

torch's CPU kernels run their parallel regions on OpenMP (libgomp). libgomp keeps
a region's helper threads spinning until the next region only while it counts no
more of its threads than cores; once a second thread of the process has run a
parallel region (a matmul, a copy, packing the weights at load) that thread has a
team of its own, the count passes the cores, and from then on every region puts
its helpers to sleep and wakes them again: ~310 context switches a decoded token,
26-30 against 46-49 tokens/s for SmolLM2 int4 on 2 cores (docs/benchmarks.md).

So a process that computes on one device does all of it on one thread. `mdi
sample` and `mdi chat` compute on the thread of the engine's event loop
(`PipelineEngine.compute_inline`); `mdi serve` cannot, since a step there would
pause every stream and /health for its whole length, so it loads the model,
builds each engine and runs every step, short or long, on a ComputeThread
(`PipelineEngine.compute_thread`), and the loop only waits for it. The ring's
starter does the same with its stage (RingEngine: load, steps, the re-loads and
layer moves of a re-plan, a heal's replay read from the log) when torch computes
with more than one thread (`has_teams`); with one, a short decode runs on the
loop, saving the hand-off (there is no team to keep spinning). Not yet on it: the starter's own probe when a ring is
planned `--partition auto` (placement.py, a thread of asyncio's), and the weights
a GGUF or Hugging Face source converts for the nodes as it streams them.
"""
from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A single worker thread: `call` from a plain thread (blocks), `run` from a
    coroutine (awaits); either way `fn` runs on this thread. Close it (or use it
    as a context manager) to join the thread."""

    def __init__(self, name: str = "mdi-compute") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs))

    @property
    def ident(self) -> int:
        """The thread's id (threading.get_ident there); starts it if it has not run yet."""
        return self.call(threading.get_ident)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ComputeThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def has_teams() -> bool:
    """Whether torch computes with OpenMP teams here (more than one thread): only then
    does it matter which thread runs a step. With one, a step short enough runs on the
    event loop itself and saves the hand-off (the ring's starter: ring_engine.py)."""
    import torch

    return torch.get_num_threads() > 1
