"""A secondary node (intermediate or finisher): the runtime behind `mdi node`.

One asyncio loop serves the FastAPI control app (see control.py), accepts
data connections and runs their handshakes. A run's frames are read, computed
and forwarded on the run's own data thread (node_link.py) with blocking
sockets, so the loop keeps answering health checks and stop requests while a
stage computes, and a frame costs no event-loop round trip. Loading weights
and timing probes run on one worker thread.

Life of a run: /init (config) -> /weights (unless the node has the chunk on
disk) -> /connect (open the downstream link) -> the upstream peer connects and
proves the token -> frames until STOP -> back to idle. Any failure on either
link drops the run's state (caches, connections) and the node waits for the
next starter; it never needs a restart.

What ends a run early, and is logged with its reason: the previous node closing
its link, a bad frame (any header field off, an unknown sample, a frame that
does not fit the run's state), a compute error, the next node closing its link
or not taking a frame within the timeout, /stop, a new /init, or silence: no
frame for --idle-timeout seconds while the previous node is connected and
(in an engine run) a sequence is in flight: a starter frozen without closing
its link. An engine run with no sequence in flight (mdi serve between
requests) is not timed. The node keeps serving either way.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from ...checkpoint.format import CheckpointError, StageBuilder
from ...checkpoint.malloc import mapped_allocations
from ...checkpoint.stream import WeightsStreamError, iter_stream
from ...engine.slots import SlotError, SlotStage
from ...generate.sampling import SamplingConfig, sample_generator, sample_rows
from ...generate.step import forward_context
from ...model import GPT, GPTConfig
from ...model.cache import context_length
from ...model.dtypes import DTYPES
from ...model.quant import configure_stage
from ..plan import limits as mem
from ..protocol.aio import bounded
from ..protocol.auth import AuthError, answer, challenge
from ..plan.capability import ProbeCache, node_capabilities
from ..protocol.local_link import is_local, link_scope, listen_local, new_name, open_link
from .control_messages import InitRequest, ProbeRequest
from .data_link import DataLink, DownstreamError
from ..cluster.nodes_config import NodeSpec
from ..protocol.seq_frames import to_frame, to_message
from ..protocol.sock_io import SockStream, listen_sockets, no_delay, recv_frame, send_frame
from ..protocol.wire import DTYPE_CODES, HEADER_SIZE, Frame, Kind, Limits, WireError

log = logging.getLogger(__name__)
MAX_SAMPLES = 1 << 16  # per run; each one costs a KV-cache row on every node
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds without a frame before a running run is dropped
MAX_MODEL_INT = 2**31 - 1  # any integer of a model config (the wire carries uint32 fields)
DEVICE_TYPES = ("cpu", "cuda", "mps")
INPUT_KINDS = frozenset({Kind.PREFILL, Kind.DECODE, Kind.CONTEXT, Kind.ADMIT, Kind.RETIRE,
                         Kind.SEQ_DECODE})
OUTPUT_DECODE_KINDS = frozenset({Kind.DECODE, Kind.TOKENS, Kind.CONTEXT, Kind.SEQ_DECODE,
                                 Kind.SEQ_TOKENS})


class InitError(ValueError):
    """A configuration the node refuses; its state does not change."""


@dataclass
class Stats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    decode_bytes_out: int = 0
    decode_tokens_out: int = 0
    prefill_bytes_out: int = 0
    # Per-frame time split (seconds, summed over timed frames): waiting for the
    # frame (read_frame: idle until the previous node sends, then header and
    # payload), compute (the stage and sampling), and the rest: the hop's own
    # overhead (message conversion, payload copy, the socket write).
    # other_cpu_s: the overhead's CPU time on the data thread (the rest of other_s is
    # time the thread was ready but not running: other processes on the same cores).
    # send_s: the socket writes alone.
    frames_timed: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0
    other_s: float = 0.0
    other_cpu_s: float = 0.0
    send_s: float = 0.0
    link: str = ""  # the link to the next node: "unix" or "tcp"

    def time_frame(self, wait: float, compute: float, busy: float, compute_cpu: float,
                   busy_cpu: float) -> None:
        self.frames_timed += 1
        self.wait_s += wait
        self.compute_s += compute
        self.other_s += max(0.0, busy - compute)
        self.other_cpu_s += max(0.0, busy_cpu - compute_cpu)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Run:
    """Everything one run owns; dropped as a whole when the run ends."""
    req: InitRequest
    config: GPTConfig
    limits: Limits
    stage: GPT | None = None
    generators: list[torch.Generator] = field(default_factory=list)  # fixed batch, finisher
    sampling: SamplingConfig | None = None                            # fixed batch, finisher
    slots: SlotStage | None = None               # a sequence run: a KV slot per sequence
    link: DataLink | None = None                 # the data thread, from /connect
    upstream: bool = False                       # the previous node's link is attached
    idle_task: asyncio.Task | None = None        # drops the run after idle_timeout of silence
    last_active: float = field(default_factory=time.monotonic)
    live: set[int] = field(default_factory=set)  # sequence runs: slots admitted, not retired
    busy: bool = False                           # computing or loading: not silent
    prev_ips: frozenset = frozenset()            # addresses the previous node may connect from
    device: str = "cpu"                          # checked at /init
    mem_bytes: int = 0                           # weights + KV caches, checked at /init
    pack: bool = True                            # room for the packed copy of fp32 weights
    stopping: bool = False                       # STOP forwarded or run dropped: links may close
    completed: bool = False                      # STOP went through (last_stats written)
    stats: Stats = field(default_factory=Stats)
    compute_s: float = 0.0               # the last frame's stage + sampling time
    compute_cpu_s: float = 0.0           # its CPU time on the data thread
    header: bytearray = field(default_factory=lambda: bytearray(HEADER_SIZE))  # data thread's

    @property
    def is_finisher(self) -> bool:
        return self.req.role == "finisher"


def validate_init(req: InitRequest) -> tuple[GPTConfig, Limits]:
    """Every field of an /init body that needs no node state; InitError names the field."""
    config = validate_model(req.model)
    if not req.start < req.stop <= config.n_layer or req.start == 0:
        raise InitError(f"start/stop: layer range [{req.start}, {req.stop}) is not a secondary "
                        f"node's part of a {config.n_layer}-layer model")
    if (req.stop == config.n_layer) != (req.role == "finisher"):
        raise InitError(f"role: a {req.role} cannot hold layers [{req.start}, {req.stop}) "
                        f"of {config.n_layer}")
    if req.role == "finisher" and req.sampling is None and not req.sequences:
        raise InitError("sampling: the finisher needs sampling settings")
    if req.sampling is not None:  # now, not after the weights' upload
        sampling_of(req)
    expect = 0
    for i, g in enumerate(req.groups):
        if len(g) != 2 or g[0] != expect or g[1] <= g[0]:
            raise InitError(f"groups[{i}]: groups must be contiguous, non-empty sample ranges")
        expect = g[1]
    n_samples = expect
    if n_samples > MAX_SAMPLES:
        raise InitError(f"groups: {n_samples} samples, at most {MAX_SAMPLES} per run")
    limits = Limits(req.run_id, config.n_embd, context_length(config.block_size, req.max_context),
                    n_samples,
                    DTYPE_CODES[DTYPES[req.dtype]], max(b - a for a, b in req.groups),
                    sequences=req.sequences)
    return config, limits


def validate_model(model: dict) -> GPTConfig:
    """A model config from a request (/init, /probe); InitError names the field."""
    for key, value in model.items():  # before GPTConfig: no huge or non-finite numbers
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_MODEL_INT:
            raise InitError(f"model.{_clip(key)}: {_clip(str(value))} is larger than {MAX_MODEL_INT}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InitError(f"model.{_clip(key)}: {value} is not a finite number")
    try:
        return GPTConfig.from_dict(model)
    except (ValueError, TypeError) as e:
        raise InitError(f"model: {e}") from None


def sampling_of(req: InitRequest) -> SamplingConfig | None:
    if req.sampling is None:
        return None
    try:
        return SamplingConfig(req.sampling.temperature, req.sampling.top_k, req.sampling.seed)
    except ValueError as e:
        raise InitError(f"sampling: {e}") from None


def validate_device(device: str) -> str:
    """A device this process can use (cpu, cuda[:N], mps); InitError naming it otherwise.

    torch answers an unusable device with many kinds of error (AssertionError on a
    build without CUDA, ModuleNotFoundError for backends without their module), so
    the type is checked against a short list first, then the device is tried.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InitError(f"device: {_clip(device)!r} is not a device: {_clip(str(e))}") from None
    if dev.type not in DEVICE_TYPES:
        raise InitError(f"device: {_clip(device)!r}: this node runs on {', '.join(DEVICE_TYPES)}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InitError(f"device: {device!r}: this node has no CUDA device")
        if dev.index is not None and dev.index >= n:
            raise InitError(f"device: {device!r}: this node has {n} CUDA device(s), 0..{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InitError(f"device: {device!r}: MPS is not available on this node")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # noqa: BLE001 - any failure here means "not usable", a 400
        raise InitError(f"device: {device!r} is not usable here: {type(e).__name__}: "
                        f"{_clip(str(e))}") from None
    return device


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


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
        self.run: Run | None = None
        self.last_stats: dict = {}
        self.runs_completed = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdi-compute")
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
        held = self.run.mem_bytes if self.run is not None else 0
        caps["budget_bytes"], caps["budget_from"] = mem.available(self.spec.device,
                                                                  self.max_memory, held)
        caps["link_scope"] = link_scope() if self.local_link else None
        caps["local_link"] = self.local_link
        return caps

    async def probe(self, req: ProbeRequest) -> dict:
        """Time this node on a run's shape, on the compute thread (cached per shape)."""
        config = validate_model(req.model)
        device = validate_device(req.device or self.spec.device)
        # the probe builds one one-block stage at a time (the first, a middle, the last)
        c3 = GPTConfig.from_dict({**config.to_dict(), "n_layer": 3})
        dtype = DTYPES[req.dtype]
        need = max(mem.stage_weight_bytes(c3, i, i + 1, dtype) for i in range(3)) \
            + mem.kv_cache_bytes(c3, 1, req.batch, dtype)
        have, where = mem.available(device, None)  # --max-memory caps runs; a probe is brief
        if need > have:
            raise InitError(f"memory: timing this model needs {mem.format_size(need)} on {device} "
                            f"(its largest one-block stage), this node has "
                            f"{mem.format_size(have)} ({where})")
        loop = asyncio.get_running_loop()
        speed, cached = await loop.run_in_executor(self.executor, self.probes.get, config,
                                                   req.batch, req.dtype, device, req.context)
        return {**speed.to_dict(), "cached": cached, "device": device, "batch": req.batch,
                "dtype": req.dtype, "context": req.context}

    def status(self) -> dict:
        import psutil
        import threading

        proc = psutil.Process()
        run = self.run
        return {**self.health(),
                "run_id": run.req.run_id if run else None,
                "layers": [run.req.start, run.req.stop] if run else None,
                "stats": run.stats.to_dict() if run else None,
                "last_run": self.last_stats, "runs_completed": self.runs_completed,
                "rss_bytes": proc.memory_info().rss, "threads": threading.active_count(),
                "os_threads": proc.num_threads(), "open_fds": proc.num_fds(),
                "torch_threads": torch.get_num_threads()}

    async def drop_run(self, reason: str) -> None:
        """Forget the current run: close its links, free its caches."""
        run, self.run = self.run, None
        if run is None:
            return
        run.stopping = True
        log.info("dropping run %d: %s", run.req.run_id, reason)
        if not run.completed:  # a completed run's statistics were written with its STOP
            self.last_stats = {"run_id": run.req.run_id, "reason": reason, **run.stats.to_dict()}
        if run.link is not None:
            run.link.close()
        if run.idle_task is not None and run.idle_task is not asyncio.current_task():
            run.idle_task.cancel()
        # Free the weights and caches now, not when the last reference goes: a
        # compute still running on the data thread holds its own references.
        run.stage, run.generators, run.slots = None, [], None

    # ---- control plane actions --------------------------------------------
    async def init(self, req: InitRequest) -> dict:
        config, limits = validate_init(req)
        device = validate_device(req.device or self.spec.device)
        need, pack = self.check_memory(req, config, limits, device)
        run = Run(req, config, limits, prev_ips=await self._resolve(req.prev_addr, "prev_addr"),
                  device=device, mem_bytes=need, pack=pack)
        if req.weights == "local":
            if self.chunk is None or self.chunk_dir is None:
                raise InitError("weights: 'local' asked, but this node was started without --chunk")
            if (self.chunk["start"], self.chunk["stop"]) != (req.start, req.stop) \
                    or self.chunk["model"] != config.to_dict():
                raise InitError(f"weights: this node's chunk holds layers {self.chunk['start']}.."
                                f"{self.chunk['stop']} of another model or split")
            loop = asyncio.get_running_loop()
            try:
                stage = await loop.run_in_executor(self.executor, load_chunk_stage, self.chunk_dir,
                                                   config, req.start, req.stop, device,
                                                   DTYPES[req.dtype], req.quantize)
                stage = await loop.run_in_executor(self.executor, configure_stage, stage,
                                                   req.quantize, req.batch_invariant,
                                                   req.max_context, run.pack)
            except CheckpointError as e:
                raise InitError(f"weights: this node's chunk cannot be loaded: {e}") from None
            self._arm(run, stage)
        await self.drop_run("a new run was configured")
        self.run = run
        if self.idle_timeout > 0:
            run.idle_task = asyncio.create_task(self._watchdog(run))
        log.info("configured run %d: %s, layers [%d, %d), %d samples in %d group(s)", req.run_id,
                 req.role, req.start, req.stop, limits.n_samples, len(req.groups))
        return {"state": self.state}

    def check_memory(self, req: InitRequest, config: GPTConfig, limits: Limits,
                     device: str) -> tuple[int, bool]:
        """Bytes the run takes (weights + KV caches, and the packed copy of large
        float32 weights when it fits too: model/layers.py) and whether to pack;
        InitError when the node has less than weights + KV caches."""
        dtype = DTYPES[req.dtype]
        weights = mem.stage_weight_bytes(config, req.start, req.stop, dtype, req.quantize)
        kv = mem.kv_cache_bytes(config, req.stop - req.start, limits.n_samples, dtype,
                                limits.block_size)
        held = self.run.mem_bytes if self.run is not None else 0
        have, where = mem.available(device, self.max_memory, held)
        if weights + kv > have:
            raise InitError(
                f"memory: the run needs {mem.format_size(weights + kv)} on {device} (weights "
                f"{mem.format_size(weights)} for layers [{req.start}, {req.stop}) in "
                f"{req.quantize or req.dtype}, "
                f"KV caches {mem.format_size(kv)} for {limits.n_samples} samples of "
                f"{limits.block_size} positions), this node has {mem.format_size(have)} "
                f"({where}); ask for fewer samples, a smaller --max-context or fewer layers")
        extra = mem.packed_copy_bytes(config, req.start, req.stop, dtype, req.quantize, device)
        if weights + kv + extra <= have:
            return weights + kv + extra, True
        log.info("memory: no room for the %s packed copy of the weights (%s free): this run "
                 "computes on the plain layers, slower", mem.format_size(extra),
                 mem.format_size(have - weights - kv))
        return weights + kv, False

    async def load_weights(self, run_id: int, body: bytes | AsyncIterator[bytes]) -> dict:
        """Take the run's weights: a safetensors stream, parsed as it arrives."""
        run = self.current_run(run_id)
        if run.stage is not None:
            raise InitError("weights: already loaded for this run")
        req = run.req
        chunks = _one_chunk(body) if isinstance(body, (bytes, bytearray)) else body
        run.busy = True  # a long upload is not silence
        try:
            # Built in place as tensors arrive (int8: each quantized at once), so the
            # node never holds the received tensors and the built stage both.
            build = StageBuilder(run.config, req.start, req.stop, run.device, DTYPES[req.dtype],
                                 req.quantize)
            loop = asyncio.get_running_loop()
            with mapped_allocations():
                async for name, t in iter_stream(chunks, build.want,
                                                 f"layers [{req.start}, {req.stop})"):
                    await loop.run_in_executor(self.executor, build.put, name, t)
                    del t
            stage = await loop.run_in_executor(self.executor, configure_stage, build.finish(),
                                               req.quantize, req.batch_invariant, req.max_context,
                                               run.pack)
        except WeightsStreamError as e:
            raise InitError(f"weights: {e}") from None
        except CheckpointError as e:
            raise InitError(str(e)) from None
        finally:
            run.busy = False
            run.last_active = time.monotonic()
        if self.run is not run:
            raise InitError("run_id: the run changed while the weights loaded")
        self._arm(run, stage)
        return {"state": self.state}

    def _arm(self, run: Run, stage: GPT) -> None:
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
        elif req.sampling is not None:
            run.sampling = sampling_of(req)  # checked at /init already
            run.generators = [sample_generator(req.sampling.seed, s) for s in range(n)]
        run.stage = stage

    async def _resolve(self, host: str, where: str) -> frozenset:
        """The IP addresses of host (a literal, or a name looked up once at /init)."""
        ip = _ip(host)
        if ip is not None:
            return frozenset({ip})
        try:
            infos = await bounded(asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            why = f"no answer within {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError) \
                else (str(e) or type(e).__name__)
            raise InitError(f"{where}: cannot resolve {host!r}: {why}") from None
        ips = frozenset(ip for ip in (_ip(info[4][0]) for info in infos) if ip is not None)
        if not ips:
            raise InitError(f"{where}: {host!r} has no IP address")
        return ips

    def current_run(self, run_id: int) -> Run:
        """The configured run, if it is run_id (InitError otherwise)."""
        if self.run is None or self.run.req.run_id != run_id:
            raise InitError(f"run_id: {run_id} is not the configured run")
        return self.run

    async def connect(self, run_id: int) -> dict:
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
                            on_frame=lambda up, since: self._on_frame(run, up, since),
                            on_end=lambda error: self._link_ended(run, error, loop),
                            name=f"mdi-data-{run_id}")
        run.last_active = time.monotonic()
        return {"state": self.state}

    async def stop(self, run_id: int | None = None) -> dict:
        """Drop the current run (only if it is run_id, when given)."""
        if run_id is None or (self.run is not None and self.run.req.run_id == run_id):
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
            if not local and not _peer_allowed(host, run.prev_ips):
                raise AuthError(f"connection from {host}, the previous node is {run.req.prev_addr}")
            if run.upstream:
                raise AuthError("this run already has an upstream connection")
            stream = SockStream(conn)
            await bounded(challenge(stream, stream, self.token, run.req.run_id, self.timeout),
                          self.timeout)
            # checked and claimed with no await between: the loop is the only writer
            if self.run is not run or run.upstream or run.link is None:
                raise AuthError("the run changed during the handshake")
            run.upstream = True
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # noqa: BLE001 - whatever a stranger sends, refuse and go on
            log.warning("refused data connection from %s: %s", _fmt_peer(peer), _reason(e))
            conn.close()
            return
        run.last_active = time.monotonic()
        log.info("run %d: previous node connected from %s", run.req.run_id, _fmt_peer(peer))
        run.link.attach(conn)

    def _on_frame(self, run: Run, up: socket.socket, t0: float) -> bool:
        """Data thread: one frame from the previous node (waited for since t0), computed
        and forwarded; False after STOP (forwarded, statistics written)."""
        frame = recv_frame(up, run.limits, run.header)
        t1, c1 = time.perf_counter(), time.thread_time()
        run.stats.frames_in += 1
        run.last_active = time.monotonic()
        if frame.kind == Kind.STOP:
            run.stopping = True  # the next node may close its end once it has the STOP
            # statistics first: once STOP is out, the starter may ask for them
            self.last_stats = {"run_id": run.req.run_id, "reason": "run complete",
                               **run.stats.to_dict()}
            self.runs_completed += 1
            run.completed = True
            self._send(run, Frame(Kind.STOP, run.req.run_id))
            return False
        if frame.kind not in INPUT_KINDS:
            raise WireError(f"unexpected {frame.kind.name} frame on a node's input")
        if frame.kind == Kind.ADMIT:
            run.live.add(frame.sample)
        elif frame.kind == Kind.RETIRE:
            run.live.discard(frame.sample)
        run.busy = True
        try:
            out = self._compute(run, frame)
            if out is not None:
                self._send(run, out)
        finally:
            run.busy = False
            run.last_active = time.monotonic()
        run.stats.time_frame(t1 - t0, run.compute_s, time.perf_counter() - t1, run.compute_cpu_s,
                             time.thread_time() - c1)
        return True

    def _send(self, run: Run, frame: Frame) -> None:
        """Data thread: a frame to the next node (DownstreamError when it fails)."""
        nxt = run.req.next
        assert run.link is not None
        t0 = time.perf_counter()
        try:
            n = send_frame(run.link.down, frame)
        except TimeoutError:
            raise DownstreamError(f"the link to the next node at {nxt.addr}:{nxt.port} took no "
                                  f"frame for {self.timeout:g} s") from None
        except OSError as e:
            raise DownstreamError(f"the link to the next node at {nxt.addr}:{nxt.port} failed: "
                                  f"{e or type(e).__name__}") from None
        run.stats.send_s += time.perf_counter() - t0
        run.stats.frames_out += 1
        run.stats.bytes_out += n
        if frame.kind in OUTPUT_DECODE_KINDS:
            run.stats.decode_bytes_out += n
            run.stats.decode_tokens_out += frame.tensor.shape[0]
        elif frame.kind == Kind.PREFILL:
            run.stats.prefill_bytes_out += n

    def _link_ended(self, run: Run, error: BaseException | None,
                    loop: asyncio.AbstractEventLoop) -> None:
        """Data thread, at its end (not after a drop): the run completed or failed."""
        if error is None:
            reason = "run complete"
        else:
            reason = _link_failure(error)
            log.warning("run %d: %s", run.req.run_id, reason,
                        exc_info=error if not isinstance(error, (WireError, EOFError, OSError))
                        else None)
        if loop.is_closed():
            return
        try:  # dropped before the links close: whoever sees them close finds the node idle
            asyncio.run_coroutine_threadsafe(self._drop_if(run, reason), loop).result(self.timeout)
        except (RuntimeError, TimeoutError):  # the loop is shutting down: the run goes with it
            pass

    async def _drop_if(self, run: Run, reason: str) -> None:
        if self.run is run:
            await self.drop_run(reason)

    async def _watchdog(self, run: Run) -> None:
        """Drop the run after idle_timeout seconds without a frame, an upload or a
        control call: a starter frozen without closing its link (SIGSTOP, a hung
        host) would otherwise hold this node's memory and ports for good. The clock
        runs from the previous node's connection: before it, uploads to the other
        nodes may take long, and a new /init replaces the run anyway."""
        while self.run is run:
            if not run.upstream or (run.slots is not None and not run.live):
                # not connected yet, or an engine run with no sequence in flight: an
                # idle server (mdi serve) waits for requests as long as it likes
                run.last_active = time.monotonic()
            left = run.last_active + self.idle_timeout - time.monotonic()
            if left <= 0 and not run.busy:
                reason = (f"no frame for {self.idle_timeout:g} s (--idle-timeout): the starter "
                          "or the previous node went silent")
                log.warning("run %d: %s", run.req.run_id, reason)
                await self.drop_run(reason)
                return
            await asyncio.sleep(max(left, 0.05))

    def _compute(self, run: Run, frame: Frame) -> Frame | None:
        """Run this node's stage on one frame (data thread)."""
        run.compute_s = run.compute_cpu_s = 0.0
        return self._compute_frame(run, frame)

    @torch.inference_mode()
    def _compute_frame(self, run: Run, frame: Frame) -> Frame | None:
        stage = run.stage
        if run.slots is not None:
            return self._compute_seq(run, run.slots, frame)
        # A fixed batch: only --resend-context runs one (the engine serves the rest as
        # sequences), and it sends CONTEXT frames: no cache, the whole context every step.
        if frame.kind != Kind.CONTEXT:
            raise WireError(f"{frame.kind.name} frame in a fixed-batch run, which carries "
                            "CONTEXT frames only (--resend-context)")
        if stage is None or frame.tensor is None:
            raise RuntimeError("the run was dropped before this frame was computed")
        device = next(stage.parameters()).device
        x = frame.tensor.to(device, copy=True)  # aligned memory, as in single-device runs
        out = _timed(run, forward_context, stage, x)
        if not run.is_finisher:
            return Frame(Kind.CONTEXT, run.req.run_id, frame.sample, 0, out)
        assert run.sampling is not None
        gens = run.generators[frame.sample:frame.sample + 1]
        tok = _timed(run, sample_rows, out, run.sampling, gens)
        return Frame(Kind.TOKENS, run.req.run_id, frame.sample, 0, torch.tensor(tok))

    def _compute_seq(self, run: Run, slots: SlotStage, frame: Frame) -> Frame | None:
        """A sequence run: the frame as a message for this stage's slots (data thread)."""
        try:
            out = _timed(run, slots.handle, to_message(frame, slots))
        except SlotError as e:
            raise WireError(str(e)) from None
        return None if out is None else to_frame(out, run.req.run_id, slots)

    async def close(self) -> None:
        run = self.run
        await self.drop_run("node shutting down")
        for task in self.accepting + list(self.handshakes):
            task.cancel()
        await asyncio.gather(*self.accepting, *self.handshakes, return_exceptions=True)
        for sock in self.listeners:
            sock.close()
        self.accepting, self.listeners = [], []
        if run is not None and run.link is not None:  # a compute in progress ends first
            await asyncio.get_running_loop().run_in_executor(None, run.link.join, self.timeout)
        self.executor.shutdown(wait=True, cancel_futures=True)


def _timed(run: Run, fn, *args):
    """fn(*args), its time (and CPU time) added to the frame's compute time."""
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        return fn(*args)
    finally:
        run.compute_s += time.perf_counter() - t0
        run.compute_cpu_s += time.thread_time() - c0


def _ip(addr: str):
    """An address as an ipaddress object (IPv4-mapped IPv6 unmapped), or None for a name."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _peer_allowed(host: str, allowed: frozenset) -> bool:
    """Is a connection from host the configured previous node? Loopback counts as one host."""
    ip = _ip(host)
    if ip is None:
        return False
    return ip in allowed or (ip.is_loopback and any(a.is_loopback for a in allowed))


def _fmt_peer(peer) -> str:
    if isinstance(peer, (str, bytes)):  # AF_UNIX: the peer's socket has no name
        return "a local socket"
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _reason(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, (WireError, AuthError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _link_failure(e: BaseException) -> str:
    """Why a run's upstream task ended, in words for the log and the starter."""
    if isinstance(e, EOFError):
        return "the previous node closed the link"
    if isinstance(e, DownstreamError):
        return str(e)
    if isinstance(e, WireError):
        return f"bad frame from the previous node: {e}"
    if isinstance(e, OSError):
        return f"the link from the previous node failed: {_reason(e)}"
    return f"cannot process a frame: {_reason(e)}"


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield bytes(body)


def load_chunk_info(chunk_dir: str | Path) -> dict:
    from ...checkpoint.chunks import read_chunk_info

    return read_chunk_info(chunk_dir)


def load_chunk_stage(chunk_dir: Path, config: GPTConfig, start: int, stop: int, device: str,
                     dtype: torch.dtype, quantize: str | None = None) -> GPT:
    from ...checkpoint.chunks import load_chunk

    return load_chunk(chunk_dir, config, start, stop, device, dtype, quantize)
