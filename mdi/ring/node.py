"""A secondary node (intermediate or finisher): the runtime behind `mdi node`.

One asyncio loop serves both planes: the FastAPI control app (see control.py)
and the data-plane listener. Model compute runs on one worker thread, so the
loop keeps answering health checks and stop requests while a stage computes.

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

from ..checkpoint.format import CheckpointError, StageBuilder
from ..checkpoint.malloc import mapped_allocations
from ..checkpoint.stream import WeightsStreamError, iter_stream
from ..engine.slots import SlotError, SlotStage
from ..generate.sampling import SamplingConfig, sample_generator, sample_rows
from ..generate.step import forward_context
from ..model import GPT, GPTConfig
from ..model.cache import context_length
from ..model.dtypes import DTYPES
from ..model.quant import configure_stage
from . import limits as mem
from .aio import bounded
from .auth import AuthError, answer, challenge
from .capability import ProbeCache, node_capabilities
from .messages import InitRequest, ProbeRequest
from .nodes_config import NodeSpec
from .seq_frames import to_frame, to_message
from .wire import DTYPE_CODES, Frame, Kind, Limits, WireError, read_frame, write_frame

log = logging.getLogger(__name__)
MAX_SAMPLES = 1 << 16  # per run; each one costs a KV-cache row on every node
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds without a frame before a running run is dropped
MAX_MODEL_INT = 2**31 - 1  # any integer of a model config (the wire carries uint32 fields)
DEVICE_TYPES = ("cpu", "cuda", "mps")
# Decode steps whose running mean compute time is below this run on the event
# loop itself (no executor hand-off, measured at 30-65 us per frame here).
INLINE_BELOW_S = 0.005
DECODES = (Kind.DECODE, Kind.SEQ_DECODE)


class InitError(ValueError):
    """A configuration the node refuses; its state does not change."""


class DownstreamError(ConnectionError):
    """The link to the next node failed (closed, reset, or not draining in time)."""


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
    # overhead (payload copy, executor hand-off, encoding, the socket write).
    frames_timed: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0
    other_s: float = 0.0
    frames_inline: int = 0  # computed on the event loop, without an executor hand-off

    def time_frame(self, wait: float, compute: float, busy: float) -> None:
        self.frames_timed += 1
        self.wait_s += wait
        self.compute_s += compute
        self.other_s += max(0.0, busy - compute)

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
    downstream: asyncio.StreamWriter | None = None
    upstream_task: asyncio.Task | None = None    # serves the previous node's frames
    watch_task: asyncio.Task | None = None       # notices the next node closing its link
    idle_task: asyncio.Task | None = None        # drops the run after idle_timeout of silence
    last_active: float = field(default_factory=time.monotonic)
    live: set[int] = field(default_factory=set)  # sequence runs: slots admitted, not retired
    busy: bool = False                           # computing or loading: not silent
    prev_ips: frozenset = frozenset()            # addresses the previous node may connect from
    device: str = "cpu"                          # checked at /init
    mem_bytes: int = 0                           # weights + KV caches, checked at /init
    pack: bool = True                            # room for the packed copy of fp32 weights
    stopping: bool = False                       # STOP forwarded or run dropped: links may close
    stats: Stats = field(default_factory=Stats)
    compute_s: float = 0.0               # the last frame's stage + sampling time
    decode_ema_s: float | None = None    # running mean of decode compute (None: none yet)

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
        self.data_server: asyncio.base_events.Server | None = None
        self.probes = ProbeCache()

    # ---- state -------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.run is None:
            return "idle"
        if self.run.stage is None:
            return "awaiting_weights"
        if self.run.upstream_task is not None:
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
                                                   req.batch, req.dtype, device)
        return {**speed.to_dict(), "cached": cached, "device": device, "batch": req.batch,
                "dtype": req.dtype}

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
        self.last_stats = {"run_id": run.req.run_id, "reason": reason, **run.stats.to_dict()}
        if run.downstream is not None:
            run.downstream.close()
        for task in (run.upstream_task, run.watch_task, run.idle_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        # Free the weights and caches now, not when the last reference goes: a
        # compute still running on the worker thread holds its own references.
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
                                                   req.max_context)
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
                                               req.quantize, req.batch_invariant, req.max_context)
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
        try:
            reader, writer = await bounded(
                asyncio.open_connection(nxt.addr, nxt.port), self.timeout)
            await answer(reader, writer, self.token, run_id, self.timeout)
        except (OSError, asyncio.TimeoutError, WireError, EOFError, AuthError) as e:
            why = f"no answer within {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError) \
                else (str(e) or type(e).__name__)
            raise ConnectionError(f"cannot reach the next node at {nxt.addr}:{nxt.port}: {why}") from None
        if self.run is not run:  # dropped or replaced while we connected
            writer.close()
            raise InitError(f"run_id: run {run_id} ended while connecting to the next node")
        if run.downstream is not None:
            run.downstream.close()
        if run.watch_task is not None:
            run.watch_task.cancel()
        run.downstream = writer
        run.watch_task = asyncio.create_task(self._watch_downstream(run, reader))
        run.last_active = time.monotonic()
        return {"state": self.state}

    async def stop(self, run_id: int | None = None) -> dict:
        """Drop the current run (only if it is run_id, when given)."""
        if run_id is None or (self.run is not None and self.run.req.run_id == run_id):
            await self.drop_run("stopped by the starter")
        return {"state": self.state}

    # ---- data plane --------------------------------------------------------
    async def start_data_server(self) -> None:
        self.data_server = await asyncio.start_server(self._on_upstream, self.bind_host,
                                                      self.spec.port_in)

    async def _on_upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else "?"
        run = self.run
        try:
            if run is None or run.stage is None or run.downstream is None:
                raise AuthError("no run is ready on this node")
            if not _peer_allowed(host, run.prev_ips):
                raise AuthError(f"connection from {host}, the previous node is {run.req.prev_addr}")
            if run.upstream_task is not None:
                raise AuthError("this run already has an upstream connection")
            await bounded(challenge(reader, writer, self.token, run.req.run_id, self.timeout),
                          self.timeout)
            if self.run is not run or run.upstream_task is not None:
                raise AuthError("the run changed during the handshake")
        except asyncio.CancelledError:
            writer.close()
            raise
        except Exception as e:  # noqa: BLE001 - whatever a stranger sends, refuse and go on
            log.warning("refused data connection from %s: %s", _fmt_peer(peer), _reason(e))
            writer.close()
            return
        run.upstream_task = asyncio.current_task()
        run.last_active = time.monotonic()
        log.info("run %d: previous node connected from %s", run.req.run_id, _fmt_peer(peer))
        try:
            await self._serve_frames(run, reader)
        except asyncio.CancelledError:
            pass  # drop_run cancelled us: the run is already gone
        except Exception as e:  # noqa: BLE001 - no frame may kill the task silently
            reason = _link_failure(e)
            log.warning("run %d: %s", run.req.run_id, reason,
                        exc_info=not isinstance(e, (WireError, EOFError, OSError)))
            if self.run is run:
                await self.drop_run(reason)
        finally:
            writer.close()

    async def _serve_frames(self, run: Run, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = time.perf_counter()
            frame = await read_frame(reader, run.limits)
            t1 = time.perf_counter()
            run.stats.frames_in += 1
            run.last_active = time.monotonic()
            if frame.kind == Kind.STOP:
                run.stopping = True  # the next node may close its end once it has the STOP
                # statistics first: once STOP is out, the starter may ask for them
                self.last_stats = {"run_id": run.req.run_id, "reason": "run complete",
                                   **run.stats.to_dict()}
                await self._send(run, Frame(Kind.STOP, run.req.run_id))
                self.runs_completed += 1
                if self.run is run:
                    await self.drop_run("run complete")
                return
            if frame.kind not in (Kind.PREFILL, Kind.DECODE, Kind.CONTEXT, Kind.ADMIT, Kind.RETIRE,
                                  Kind.SEQ_DECODE):
                raise WireError(f"unexpected {frame.kind.name} frame on a node's input")
            if frame.kind == Kind.ADMIT:
                run.live.add(frame.sample)
            elif frame.kind == Kind.RETIRE:
                run.live.discard(frame.sample)
            run.busy = True
            try:
                # A short decode runs right here: handing it to the worker thread and
                # back costs more than it computes, and blocks the loop for less than
                # INLINE_BELOW_S. Prefills and long steps keep the loop free for
                # health checks and /stop.
                ema = run.decode_ema_s
                if frame.kind in DECODES and ema is not None and ema < INLINE_BELOW_S:
                    out = self._compute(run, frame)
                    run.stats.frames_inline += 1
                else:
                    out = await loop.run_in_executor(self.executor, self._compute, run, frame)
                if out is not None:
                    await self._send(run, out)
            finally:
                run.busy = False
                run.last_active = time.monotonic()
            run.stats.time_frame(t1 - t0, run.compute_s, time.perf_counter() - t1)

    async def _send(self, run: Run, frame: Frame) -> None:
        nxt = run.req.next
        if run.downstream is None:
            raise DownstreamError(f"no link to the next node at {nxt.addr}:{nxt.port}")
        try:
            n = await bounded(write_frame(run.downstream, frame), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            what = f"took no frame for {self.timeout:g} s" if isinstance(e, asyncio.TimeoutError) \
                else f"failed: {e or type(e).__name__}"
            raise DownstreamError(f"the link to the next node at {nxt.addr}:{nxt.port} {what}") from None
        run.stats.frames_out += 1
        run.stats.bytes_out += n
        if frame.kind in (Kind.DECODE, Kind.TOKENS, Kind.CONTEXT, Kind.SEQ_DECODE, Kind.SEQ_TOKENS):
            run.stats.decode_bytes_out += n
            run.stats.decode_tokens_out += frame.tensor.shape[0]
        elif frame.kind == Kind.PREFILL:
            run.stats.prefill_bytes_out += n

    async def _watchdog(self, run: Run) -> None:
        """Drop the run after idle_timeout seconds without a frame, an upload or a
        control call: a starter frozen without closing its link (SIGSTOP, a hung
        host) would otherwise hold this node's memory and ports for good. The clock
        runs from the previous node's connection: before it, uploads to the other
        nodes may take long, and a new /init replaces the run anyway."""
        while self.run is run:
            if run.upstream_task is None or (run.slots is not None and not run.live):
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

    async def _watch_downstream(self, run: Run, reader: asyncio.StreamReader) -> None:
        """The next node never sends on our outgoing link: data or EOF there means it is gone."""
        nxt = run.req.next
        try:
            data = await reader.read(1)
            reason = (f"the next node at {nxt.addr}:{nxt.port} sent unexpected data" if data
                      else f"the next node at {nxt.addr}:{nxt.port} closed the link")
        except OSError as e:
            reason = f"the link to the next node at {nxt.addr}:{nxt.port} failed: {e}"
        if self.run is run and not run.stopping:
            log.warning("run %d: %s", run.req.run_id, reason)
            await self.drop_run(reason)

    def _compute(self, run: Run, frame: Frame) -> Frame | None:
        """Run this node's stage on one frame (worker thread or loop)."""
        run.compute_s = 0.0
        out = self._compute_frame(run, frame)
        if frame.kind in DECODES:
            ema = run.decode_ema_s
            run.decode_ema_s = run.compute_s if ema is None else 0.8 * ema + 0.2 * run.compute_s
        return out

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
        """A sequence run: the frame as a message for this stage's slots (worker thread)."""
        try:
            out = _timed(run, slots.handle, to_message(frame, slots))
        except SlotError as e:
            raise WireError(str(e)) from None
        return None if out is None else to_frame(out, run.req.run_id, slots)

    async def close(self) -> None:
        await self.drop_run("node shutting down")
        if self.data_server is not None:
            self.data_server.close()
            try:  # Python >= 3.12 waits for open connections here; bound it
                await bounded(self.data_server.wait_closed(), self.timeout)
            except asyncio.TimeoutError:
                log.warning("data connections still open at shutdown")
        self.executor.shutdown(wait=True, cancel_futures=True)


def _timed(run: Run, fn, *args):
    """fn(*args), its time added to the frame's compute time."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        run.compute_s += time.perf_counter() - t0


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
    from ..checkpoint.chunks import read_chunk_info

    return read_chunk_info(chunk_dir)


def load_chunk_stage(chunk_dir: Path, config: GPTConfig, start: int, stop: int, device: str,
                     dtype: torch.dtype, quantize: str | None = None) -> GPT:
    from ..checkpoint.chunks import load_chunk

    return load_chunk(chunk_dir, config, start, stop, device, dtype, quantize)
