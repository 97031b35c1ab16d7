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
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def run_job(future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """One submitted job, on the calling thread: its result or error to its future, as
    an executor's worker does (nothing if the future was cancelled first)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the submitter gets it, as from an executor
        future.set_exception(e)
    else:
        future.set_result(result)


class ComputeThread:
    """A single worker thread: `call` from a plain thread (blocks), `run` from a
    coroutine (awaits); either way `fn` runs on this thread. Close it (or use it
    as a context manager) to join the thread.

    The thread is a daemon of its own, started by the first job, and not a
    ThreadPoolExecutor's: the interpreter joins those at exit, so a Ctrl-C during
    a long load (mdi chat over a ring, mdi serve) would wait for the whole load
    before the command could exit; a daemon goes with the process."""

    def __init__(self, name: str = "mdi-compute") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()  # a lock wait: Ctrl-C interrupts it

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    @property
    def ident(self) -> int:
        """The thread's id (threading.get_ident there); starts it if it has not run yet."""
        return self.call(threading.get_ident)

    def close(self) -> None:
        """Take no more jobs; join the thread once those queued have run."""
        with self._lock:
            self._closed, thread = True, self._thread
            if thread is not None:
                self._jobs.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> "ComputeThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            run_job(*job)
            del job  # nothing of a job kept while the thread waits


def has_teams() -> bool:
    """Whether torch computes with OpenMP teams here (more than one thread): only then
    does it matter which thread runs a step. With one, a step short enough runs on the
    event loop itself and saves the hand-off (the ring's starter: ring_engine.py)."""
    import torch

    return torch.get_num_threads() > 1
