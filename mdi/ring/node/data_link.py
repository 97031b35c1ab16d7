"""A run's data plane on a node: one thread, two blocking sockets.

The loop starts at /connect with the link to the next node, on the node's
compute thread (compute_thread.py: the thread that also loaded the stage), and
takes the previous node's link once its handshake has passed on the event loop
(`attach`). It then waits on both links (and a wake-up socket, and the compute
thread's jobs) with poll:

- a frame from the previous node is read (sock_io.recv_frame: header checked
  before any payload byte), handed to `on_frame`, which computes it on this
  very thread and sends what goes on (sock_io.send_frame, one sendmsg);
  `on_frame` returns False after STOP; a previous node that stops inside a
  frame fails the run within the node's timeout (sock_io.FrameStalled), so it
  cannot hold the thread, and the jobs queued on it, for good;
- anything from the next node (which never sends on this link), or its EOF,
  means it is gone;
- `close()` (the event loop dropping the run) wakes the thread and shuts both
  sockets down, so a thread blocked in a send or a read returns at once;
- jobs submitted to the compute thread meanwhile (a probe, another run's load)
  run between two frames.

The thread alone closes the sockets it was given, once it ends, after it
reported why through `on_end(error)` (unless it was closed). Nothing here
blocks the event loop, which keeps serving the control plane; no frame costs
an event-loop round trip or a hand-off between threads.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from typing import Callable

from ..protocol.sock_io import set_recv_timeout, set_send_timeout
from .compute_thread import NodeComputeThread

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class DownstreamError(ConnectionError):
    """The link to the next node failed (closed, reset, or not draining in time)."""


class DataLink:
    """down: the next node's link, authenticated; send_timeout: how long a send to it
    may go without progress, and within which a frame from the previous node cut
    short fails (the node's --timeout). on_frame(up_socket, waiting_since)
    reads, computes and forwards one frame (False after STOP; waiting_since: the
    perf_counter time the thread began to wait for it); on_end(error) hears why
    the thread ended (None: STOP went through) unless close() came first.
    `where` names the next node in errors. runner: the node's compute thread, which
    runs the loop (None: a thread of its own)."""

    def __init__(self, down: socket.socket, send_timeout: float, where: str,
                 on_frame: Callable[[socket.socket, float], bool],
                 on_end: Callable[[BaseException | None], None], name: str,
                 before: Callable[[socket.socket], None] | None = None,
                 runner: NodeComputeThread | None = None) -> None:
        set_send_timeout(down, send_timeout)
        self.timeout = send_timeout
        self.down = down
        self.up: socket.socket | None = None
        self.where = where
        self.on_frame = on_frame
        self.on_end = on_end
        self.before = before  # sent first, on the thread (a recovery's replay)
        self.closed = False
        self._ended = False
        self._lock = threading.Lock()   # attach/close against the thread's end
        self._wake_r, self._wake_w = socket.socketpair()
        self._done = threading.Event()
        self.runner = runner
        if runner is None:
            threading.Thread(target=self._main, name=name, daemon=True).start()
        else:
            runner.serve(self._main)

    def attach(self, up: socket.socket) -> None:
        """The previous node's link, authenticated (event loop): served from now on."""
        with self._lock:
            if self.closed or self._ended:  # too late: the run is gone
                up.close()
                return
            # blocking; a read inside a frame that gets no byte for half the node's
            # timeout fails the frame (sock_io.FrameStalled). A read that got part of
            # what it asked returns when its wait ends, and the next one waits again:
            # a stall fails the run at most the whole timeout after the last byte
            set_recv_timeout(up, self.timeout / 2)
            self.up = up
        self._wake()

    def close(self) -> None:
        """Stop the thread (from the event loop): wakes it, and unblocks a read or send."""
        with self._lock:
            self.closed = True
            socks = (self.up, self.down)
        self._wake()
        for sock in socks:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected any more, or already closed by the thread
                    pass

    def join(self, timeout: float) -> None:
        self._done.wait(timeout)

    def alive(self) -> bool:
        return not self._done.is_set()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # the thread ended and closed it
            pass

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            if self.before is not None:
                self.before(self.down)
            self._serve()
        except BaseException as e:  # noqa: BLE001 - reported to the runtime, which logs it
            error = e
        try:
            if not self.closed:  # the run is dropped before its links close
                self.on_end(error)
        finally:
            with self._lock:
                self._ended = True
                socks = (self.up, self.down, self._wake_r, self._wake_w)
            for sock in socks:
                if sock is not None:
                    sock.close()
            self._done.set()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.down, _READ)
        poller.register(self._wake_r, select.POLLIN)
        down, wake = self.down.fileno(), self._wake_r.fileno()
        jobs = -2
        if self.runner is not None:
            jobs = self.runner.wake_fd
            poller.register(jobs, select.POLLIN)
        up = -1
        while not self.closed:
            waiting = time.perf_counter()
            ready = {fd for fd, _ in poller.poll()}
            if self.closed:
                return
            if wake in ready:
                self._wake_r.recv(64)
                if up < 0 and self.up is not None:
                    up = self.up.fileno()
                    poller.register(up, _READ)
            if up in ready:  # before the next node's news: a closed ring is seen upstream first
                assert self.up is not None
                if not self.on_frame(self.up, waiting):
                    return
            elif down in ready:
                gone = self._downstream_gone()
                if gone is not None:
                    raise DownstreamError(gone)
            if jobs in ready:  # after the frame: the ring waits for it, a load can wait a frame
                assert self.runner is not None
                self.runner.run_jobs()

    def _downstream_gone(self) -> str | None:
        """Why the next node's link is readable: it is gone (None: nothing there)."""
        try:
            data = self.down.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            return f"the link to the next node at {self.where} failed: {e}"
        return (f"the next node at {self.where} sent unexpected data" if data
                else f"the next node at {self.where} closed the link")
