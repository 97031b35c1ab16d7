"""A secondary node (intermediate or finisher): the runtime behind `mdi node`.

One asyncio loop serves the FastAPI control app (control_app.py), accepts data
connections and runs their handshakes. A run's frames are read, computed and
forwarded by its data loop (data_link.py, data_plane.py:NodeRun) with blocking
sockets, so the loop keeps answering health checks and stop requests while a
stage computes, and a frame costs no event-loop round trip. That data loop,
loading weights, timing probes and a resumed run's cache rows all run on one
compute thread (compute_thread.py): one thread of the process runs its torch work.

Life of a run: /init (config, validate.py) -> /weights (unless the node has the
chunk on disk; chunk_load.py) -> /connect (open the downstream link) -> the
upstream peer connects and proves the token -> frames until STOP -> back to
idle. Any failure on either link drops the run's state (caches, connections)
and the node waits for the next starter; it never needs a restart. A live
re-plan holds the run instead and moves layers with their KV rows (layer_move.py).

What ends a run early, and is logged with its reason: the previous node closing
its link, a bad frame (any header field off, an unknown sample, a frame that
does not fit the run's state), a compute error, the next node closing its link
or not taking a frame within the timeout, /stop, a new /init, or silence: no
frame for --idle-timeout seconds while the previous node is connected and
(in an engine run) a sequence is in flight: a starter frozen without closing
its link (data_plane.watchdog). An engine run with no sequence in flight (mdi
serve between requests) is not timed. The node keeps serving either way.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import torch

from ...engine.slots import SlotStage
from ...generate.sampling import sample_generator
from ...model import GPT
from ..cluster.nodes_config import NodeSpec
from ..plan import limits as mem
from ..plan.capability import ProbeCache, node_capabilities
from ..plan.fused_check import fused_state
from ..protocol.aio import bounded
from ..protocol.auth import AuthError, answer, challenge
from ..protocol.local_link import is_local, link_scope, listen_local, new_name, open_link
from ..protocol.sock_io import SockStream, listen_sockets, no_delay
from ..protocol.wire import WireError
from .compute_thread import NodeComputeThread
from .chunk_load import load_chunk_info, stage_from_chunk, stage_from_stream
from .control_messages import InitRequest, ProbeRequest
from .data_link import DataLink
from .layer_move import held, park_now, take
from .resume import expect_replays, park, replay_first, resume
from .data_plane import (NodeRun, fmt_peer, link_failure, peer_allowed, reason, resolve,
                         watchdog)
from .validate import (InitError, NodeBusy, check_memory, check_probe_memory, check_quantize,
                       validate_device, validate_init, validate_model)

log = logging.getLogger(__name__)
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds without a frame before a running run is dropped


class NodeRuntime:
    def __init__(self, spec: NodeSpec, token: str, chunk_dir: str | Path | None = None,
                 timeout: float = 10.0, bind_any: bool = False,
                 max_memory: int | None = None,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.spec = spec
        self.max_memory = max_memory  # bytes a run may take (weights + KV caches); None: free memory
        self.token = token
        self.timeout = timeout
        self.idle_timeout = idle_timeout  # 0: never drop a silent run
        self.bind_host = ("::" if ":" in spec.addr else "0.0.0.0") if bind_any else spec.addr
        self.chunk = load_chunk_info(chunk_dir) if chunk_dir else None
        self.chunk_dir = Path(chunk_dir) if chunk_dir else None
        self.run: NodeRun | None = None
        self.last_stats: dict = {}
        self.runs_completed = 0
        self.executor = NodeComputeThread("mdi-compute")  # loads, probes and the runs' frames
        self.listeners: list[socket.socket] = []
        self.accepting: list[asyncio.Task] = []
        self.handshakes: set[asyncio.Task] = set()
        self.probes = ProbeCache()
        self.local_link: str | None = None  # the abstract Unix socket of the data port (local_link.py)

    # ---- state -------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.run is None:
            return "idle"
        if self.run.parked:
            return "parked"
        if self.run.stage is None:
            return "awaiting_weights"
        if self.run.upstream:
            return "running"
        return "ready"

    def health(self) -> dict:
        return {"status": "ok", "role": self.spec.role, "index": self.spec.index,
                "state": self.state, "chunk": self.chunk, "pid": os.getpid()}

    def capabilities(self) -> dict:
        """Device, memory and CPUs; no compute. budget_bytes is what /init checks a
        run against: free memory plus the current run's (dropped by a new /init),
        at most --max-memory."""
        caps = node_capabilities(self.spec.device, self.max_memory)
        caps["budget_bytes"], caps["budget_from"] = mem.available(self.spec.device,
                                                                  self.max_memory, self._held())
        caps["link_scope"] = link_scope() if self.local_link else None
        caps["local_link"] = self.local_link
        return caps

    def _held(self) -> int:
        """What the current run holds of free memory's complement: its planned bytes
        less the paged caches' pages no row has written (free memory counts those
        already, so counting them again would promise them twice)."""
        if self.run is None:
            return 0
        slots = self.run.slots
        unwritten = sum(c.unwritten_nbytes() for c in slots.caches) if slots is not None else 0
        incoming = sum(inc.nbytes for inc in self.run.incoming.values())  # a move's, on its way
        return max(0, self.run.mem_bytes - unwritten) + incoming

    async def probe(self, req: ProbeRequest) -> dict:
        """Time this node on a run's shape, on the compute thread (cached per shape).
        Not while a run's data loop serves a ring (NodeBusy, HTTP 409): it would time
        between two frames and pause the ring for the whole probe; a cached speed is
        answered all the same (no compute)."""
        config = validate_model(req.model)
        device = validate_device(req.device or self.spec.device)
        shape = (config, req.batch, req.dtype, device, req.context)
        live = self.serving()
        if live is not None:
            speed, cached = (None if req.fresh else self.probes.cached(*shape)), True
            if speed is None:
                raise NodeBusy(f"node is serving a live run (run {live.run_id}); probe it "
                               "before the run starts (a probe now would pause its ring)")
        else:
            check_probe_memory(config, req.batch, req.dtype, device)
            speed, cached = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.probes.get, *shape, req.fresh)
        return {**speed.to_dict(), "cached": cached, "device": device, "batch": req.batch,
                "dtype": req.dtype, "context": req.context}

    def serving(self) -> NodeRun | None:
        """The run whose data loop serves a ring now (connected, not parked), if any."""
        run = self.run
        live = run is not None and not run.parked and run.link is not None and run.link.alive()
        return run if live else None

    def status(self) -> dict:
        import psutil
        import threading

        proc = psutil.Process()
        run = self.run
        return {**self.health(),
                "run_id": run.run_id if run else None,
                "layers": [run.req.start, run.req.stop] if run else None,
                "stats": run.stats.to_dict() if run else None,
                "last_run": self.last_stats, "runs_completed": self.runs_completed,
                "rss_bytes": proc.memory_info().rss, "threads": threading.active_count(),
                "os_threads": proc.num_threads(), "open_fds": proc.num_fds(),
                "torch_threads": torch.get_num_threads(),
                "fused_kernels": fused_state(self.spec.device)}

    async def drop_run(self, reason: str) -> None:
        """Forget the current run: close its links, free its caches."""
        run, self.run = self.run, None
        if run is None:
            return
        run.stopping = True
        log.info("dropping run %d: %s", run.run_id, reason)
        if not run.completed:  # a completed run's statistics were written with its STOP
            self.last_stats = {"run_id": run.run_id, "reason": reason, **run.stats.to_dict()}
        if run.link is not None:
            run.link.close()
        if run.idle_task is not None and run.idle_task is not asyncio.current_task():
            run.idle_task.cancel()
        # Free the weights and caches now, not when the last reference goes: a
        # compute still running on the data thread holds its own references.
        run.stage, run.generators, run.slots = None, [], None

    def _completed(self, run: NodeRun) -> None:
        """Data thread, on STOP, before it goes on: the run's statistics."""
        self.last_stats = {"run_id": run.run_id, "reason": "run complete", **run.stats.to_dict()}
        self.runs_completed += 1

    # ---- control plane actions --------------------------------------------
    async def init(self, req: InitRequest) -> dict:
        config, limits, sampling = validate_init(req)
        device = validate_device(req.device or self.spec.device)
        check_quantize(req.quantize, device)
        need, pack = check_memory(req, config, limits, device, self.max_memory, self._held())
        kept = await self._kept(req)
        run = NodeRun(req, config, limits, sampling=sampling, timeout=self.timeout,
                      on_complete=self._completed,
                      prev_ips=await resolve(req.prev_addr, "prev_addr", self.timeout),
                      device=device, mem_bytes=need, pack=pack)
        loop = asyncio.get_running_loop()
        if req.weights == "local":  # the old run dropped before the load (unless kept): its
            # loop, stuck mid-frame, would hold the compute thread the load needs
            drop = None if kept is not None else (lambda: self.drop_run("a new run was configured"))
            self._arm(run, await stage_from_chunk(run, self.chunk, self.chunk_dir, self.executor,
                                                  drop))
        elif kept is not None:  # torch work, on the compute thread (the kept run's loop ended)
            if (req.start, req.stop) != (kept.req.start, kept.req.stop):  # layers moved
                await loop.run_in_executor(self.executor, take, kept, req.start, req.stop,
                                           dict(req.resume.slots))
            # the kept run's stage and caches, cut back to the positions
            await loop.run_in_executor(self.executor, resume, run, kept)
        await self.drop_run("a new run was configured")
        self.run = run
        if self.idle_timeout > 0:
            run.idle_task = asyncio.create_task(
                watchdog(run, self.idle_timeout, lambda: self.run, self.drop_run))
        log.info("configured run %d: %s, layers [%d, %d), %d samples in %d group(s)", req.run_id,
                 req.role, req.start, req.stop, limits.n_samples, len(req.groups))
        return {"state": self.state}

    async def load_weights(self, run_id: int, body: bytes | AsyncIterator[bytes]) -> dict:
        """Take the run's weights: a safetensors stream, parsed as it arrives."""
        run = self.current_run(run_id)
        if run.stage is not None:
            raise InitError("weights: already loaded for this run")
        run.busy = True  # a long upload is not silence
        try:
            stage = await stage_from_stream(run, body, self.executor)
        finally:
            run.busy = False
            run.last_active = time.monotonic()
        if self.run is not run:
            raise InitError("run_id: the run changed while the weights loaded")
        self._arm(run, stage)
        return {"state": self.state}

    def _arm(self, run: NodeRun, stage: GPT) -> None:
        """Give the run its stage and what it computes with, all or nothing (InitError
        leaves it as it was). A sequence run gets its KV slots; a fixed batch
        (--resend-context: CONTEXT frames, no cache) the finisher's sampling streams."""
        req = run.req
        n = run.limits.n_samples
        stage.packed_linears = run.pack
        if req.sequences:  # slots, reset per ADMIT; sampling parameters come with each ADMIT
            try:
                run.slots = SlotStage(stage, [b - a for a, b in req.groups])
            except RuntimeError as e:
                raise InitError(f"groups: cannot allocate the KV caches of {n} slots: {e}") from None
            expect_replays(run, run.slots)
        elif run.sampling is not None:
            run.generators = [sample_generator(run.sampling.seed, s) for s in range(n)]
        run.stage = stage

    def current_run(self, run_id: int) -> NodeRun:
        """The configured run, if it is run_id (InitError otherwise)."""
        if self.run is None or self.run.run_id != run_id:
            raise InitError(f"run_id: {run_id} is not the configured run")
        return self.run

    async def connect(self, run_id: int) -> dict:
        """Open the link to the next node (answering its challenge); the run's data
        thread starts with it."""
        run = self.current_run(run_id)
        if run.stage is None:
            raise InitError("weights: not loaded yet")
        nxt = run.req.next
        sock: socket.socket | None = None
        try:
            sock = await bounded(open_link(nxt.local, nxt.addr, nxt.port), self.timeout)
            stream = SockStream(sock)
            await answer(stream, stream, self.token, run_id, self.timeout)
        except BaseException as e:
            if sock is not None:
                sock.close()
            if not isinstance(e, (OSError, asyncio.TimeoutError, WireError, EOFError, AuthError)):
                raise
            why = f"no answer within {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError) \
                else (str(e) or type(e).__name__)
            raise ConnectionError(f"cannot reach the next node at {nxt.addr}:{nxt.port}: {why}") from None
        if self.run is not run:  # dropped or replaced while we connected
            sock.close()
            raise InitError(f"run_id: run {run_id} ended while connecting to the next node")
        if run.upstream:
            sock.close()
            raise InitError(f"run_id: run {run_id} is already running")
        if run.link is not None:  # connected again: the new link replaces the old one
            run.link.close()
        run.stats.link = "unix" if is_local(sock) else "tcp"
        loop = asyncio.get_running_loop()
        run.link = DataLink(sock, self.timeout, f"{nxt.addr}:{nxt.port}",
                            on_frame=run.on_frame, before=replay_first(run),
                            on_end=lambda error: self._link_ended(run, error, loop),
                            name=f"mdi-data-{run_id}", runner=self.executor)
        run.last_active = time.monotonic()
        return {"state": self.state}

    async def hold(self, run_id: int) -> dict:
        """Keep the run when its links end: layers move next (layer_move.py)."""
        held(self, run_id).hold = True
        return {"state": self.state}

    async def stop(self, run_id: int | None = None) -> dict:
        """Drop the current run (only if it is run_id, when given)."""
        if run_id is None or (self.run is not None and self.run.run_id == run_id):
            await self.drop_run("stopped by the starter")
        return {"state": self.state}

    # ---- data plane --------------------------------------------------------
    async def start_data_server(self) -> None:
        """Listen on the data port; each connection's handshake runs on this loop."""
        self.listeners = listen_sockets(self.bind_host, self.spec.port_in)
        if link_scope() is not None:
            name = new_name()
            try:
                self.listeners.append(listen_local(name))
                self.local_link = name
            except OSError as e:  # no abstract sockets here: TCP only
                log.info("no local data socket: %s", e.strerror or e)
        self.accepting = [asyncio.create_task(self._accept(sock)) for sock in self.listeners]

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as e:  # e.g. out of file descriptors: refuse this one, go on
                log.warning("data port: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._on_upstream(conn, peer))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _on_upstream(self, conn: socket.socket, peer) -> None:
        """A connection to the data port: the previous node of the current run, once it
        proves the token; then its frames go to the run's data thread."""
        local = is_local(conn)
        host = "a local socket" if local else peer[0] if peer else "?"
        run = self.run
        try:
            conn.setblocking(False)
            if not local:
                no_delay(conn)
            if run is None or run.stage is None or run.link is None:
                raise AuthError("no run is ready on this node")
            if local and not run.req.prev_local:
                raise AuthError(f"connection on the local socket, the previous node is "
                                f"{run.req.prev_addr} over TCP")
            if not local and not peer_allowed(host, run.prev_ips):
                raise AuthError(f"connection from {host}, the previous node is {run.req.prev_addr}")
            if run.upstream:
                raise AuthError("this run already has an upstream connection")
            stream = SockStream(conn)
            await bounded(challenge(stream, stream, self.token, run.run_id, self.timeout),
                          self.timeout)
            # checked and claimed with no await between: the loop is the only writer
            if self.run is not run or run.upstream or run.link is None:
                raise AuthError("the run changed during the handshake")
            run.upstream = True
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # noqa: BLE001 - whatever a stranger sends, refuse and go on
            log.warning("refused data connection from %s: %s", fmt_peer(peer), reason(e))
            conn.close()
            return
        run.last_active = time.monotonic()
        log.info("run %d: previous node connected from %s", run.run_id, fmt_peer(peer))
        run.link.attach(conn)

    def _link_ended(self, run: NodeRun, error: BaseException | None,
                    loop: asyncio.AbstractEventLoop) -> None:
        """Data thread, at its end (not after a drop): the run completed or failed."""
        if error is None:
            why = "run complete"
        else:
            why = link_failure(error)
            log.warning("run %d: %s", run.run_id, why,
                        exc_info=error if not isinstance(error, (WireError, EOFError, OSError))
                        else None)
        if loop.is_closed():
            return
        try:  # dropped before the links close: whoever sees them close finds the node idle
            asyncio.run_coroutine_threadsafe(self._drop_if(run, why, error is not None),
                                             loop).result(self.timeout)
        except (RuntimeError, TimeoutError):  # the loop is shutting down: the run goes with it
            pass

    async def _drop_if(self, run: NodeRun, why: str, failed: bool = False) -> None:
        if self.run is not run:
            return
        if failed and (run.req.recovery == "replay" or run.hold) and run.slots is not None:
            park(run, why)  # its stage and caches wait for a resume (or a new /init)
            self.last_stats = {"run_id": run.run_id, "reason": why, **run.stats.to_dict()}
        else:
            await self.drop_run(why)

    async def _kept(self, req: InitRequest) -> NodeRun | None:
        """The run a resume takes over, parked (its data thread ended); InitError when
        this node does not hold it."""
        if req.resume is None:
            return None
        old = self.run
        if old is None or old.run_id != req.resume.run_id or old.slots is None:
            raise InitError(f"resume.run_id: run {req.resume.run_id} is not kept on this node")
        if [[a, b] for a, b in req.groups] != [[f, f + n] for f, n in
                                                zip(old.slots.first, old.slots.sizes)]:
            raise InitError("groups: a resumed run keeps the lanes of the run it takes over")
        if (req.start, req.stop) != (old.req.start, old.req.stop) and not old.hold:
            raise InitError(f"start/stop: the kept run holds layers [{old.req.start}, "
                            f"{old.req.stop})")  # (a held run's layers may move: take)
        # the failure has not reached this node yet: stop it here
        await park_now(self, old, "taken over by a resume")
        return old

    async def close(self) -> None:
        run = self.run
        await self.drop_run("node shutting down")
        for task in self.accepting + list(self.handshakes):
            task.cancel()
        await asyncio.gather(*self.accepting, *self.handshakes, return_exceptions=True)
        for sock in self.listeners:
            sock.close()
        self.accepting, self.listeners = [], []
        loop = asyncio.get_running_loop()
        if run is not None and run.link is not None:  # a compute in progress ends first
            await loop.run_in_executor(None, run.link.join, self.timeout)
        # joined off the loop: a data loop ending may wait for the loop (_link_ended)
        await loop.run_in_executor(None, functools.partial(self.executor.shutdown, wait=True,
                                                           cancel_futures=True))
