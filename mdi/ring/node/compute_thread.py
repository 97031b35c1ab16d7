"""A node's one thread for torch compute: loads, probes and a run's frames.

One thread of a process runs all of its torch work, for the reason
engine/compute_thread.py gives (libgomp stops spinning once a second thread
has run a parallel region). The single-device commands use that module's
ComputeThread; a node needs more: its frames are read, computed and sent by
one loop, which must also run the jobs the control plane hands over.
So a node runs everything that computes on this one thread:

- jobs submitted as to an executor (`loop.run_in_executor(thread, ...)`):
  building a stage from its weights, a chunk's load, probes, a layer move's rows;
- a run's data loop (data_link.py, `serve`), which polls `wake_fd` beside its
  links and runs the jobs that came (`run_jobs`) between two frames, so a
  frame is read, computed and sent on this thread with no hand-off.

Runs are served one after another: a new run's loop starts once the old one
returned (closing a DataLink makes it return at once).
"""
from __future__ import annotations

import logging
import select
import socket
import threading
from collections import deque
from concurrent.futures import Executor, Future
from typing import Any, Callable

from ...engine.compute_thread import run_job

log = logging.getLogger(__name__)


class NodeComputeThread(Executor):
    def __init__(self, name: str = "mdi-compute") -> None:
        self._jobs: deque[tuple[Future, Callable, tuple, dict]] = deque()
        self._loops: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._shutdown = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    @property
    def wake_fd(self) -> int:
        """Readable when jobs wait: a data loop polls it and calls run_jobs()."""
        return self._wake_r.fileno()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.append((future, fn, args, kwargs))
        self._wake()
        return future

    def serve(self, loop: Callable[[], None]) -> None:
        """Run `loop` (a run's data loop, which handles its own errors) on this
        thread once the loop it runs now, if any, has returned."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the compute thread is shut down")
            self._loops.append(loop)
        self._wake()

    def run_jobs(self) -> None:
        """On this thread: every job submitted so far, in order."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:  # drained: a job submitted from now on wakes the poll again
            pass
        while True:
            with self._lock:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            run_job(*job)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._jobs:
                    self._jobs.popleft()[0].cancel()
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def _main(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                self.run_jobs()
                with self._lock:
                    loop = self._loops.popleft() if self._loops else None
                    if loop is None and self._shutdown and not self._jobs:
                        return
                if loop is not None:
                    try:
                        loop()
                    except BaseException:  # noqa: BLE001 - the thread serves the node's next run
                        log.exception("a run's data loop failed")
                else:
                    poller.poll()
        finally:
            self._wake_r.close()
            self._wake_w.close()
