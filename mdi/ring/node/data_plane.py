"""A run on a node, and its data plane: frames read, computed and forwarded.

`NodeRun` is everything one run owns; the node drops it as a whole when the
run ends. Its frames are handled on the run's own data thread (data_link.py)
with blocking sockets: `on_frame` reads one frame (every header field checked
against the run's Limits before the payload is read: sock_io.recv_frame),
computes it with the run's stage and forwards the result with one `sendmsg`.
An engine run (`sequences`) hands each frame as a message to its SlotStage; a
fixed batch (--resend-context) takes CONTEXT frames only.

Also here: the checks of who may connect as the previous node (`peer_allowed`,
`resolve`), the words for why a run's link ended (`link_failure`), and the
watchdog that drops a run gone silent.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from ...engine.slots import SlotError, SlotStage
from ...generate.sampling import SamplingConfig, sample_rows
from ...generate.step import forward_context
from ...model import GPT, GPTConfig
from ..protocol.aio import bounded
from ..protocol.auth import AuthError
from ..protocol.seq_frames import to_frame, to_message
from ..protocol.sock_io import FrameStalled, recv_frame, send_frame
from ..protocol.wire import HEADER_SIZE, Frame, Kind, Limits, WireError
from .control_messages import InitRequest
from .data_link import DataLink, DownstreamError
from .replay_threads import replay_compute
from .stats import Stats
from .validate import InitError

log = logging.getLogger(__name__)
INPUT_KINDS = frozenset({Kind.PREFILL, Kind.DECODE, Kind.CONTEXT, Kind.ADMIT, Kind.RETIRE,
                         Kind.SEQ_DECODE, Kind.REPLAY, Kind.PREFILLS})
OUTPUT_DECODE_KINDS = frozenset({Kind.DECODE, Kind.TOKENS, Kind.CONTEXT, Kind.SEQ_DECODE,
                                 Kind.SEQ_TOKENS})


@dataclass
class NodeRun:
    """Everything one run owns; dropped as a whole when the run ends."""
    req: InitRequest
    config: GPTConfig
    limits: Limits
    sampling: SamplingConfig | None = None       # fixed batch, finisher: checked at /init
    timeout: float = 10.0                        # for the next node to take a frame
    on_complete: Callable[[NodeRun], None] | None = None  # data thread, before STOP goes on
    stage: GPT | None = None
    generators: list[torch.Generator] = field(default_factory=list)  # fixed batch, finisher
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
    parked: bool = False                         # a link failed; kept for a resume (resume.py)
    hold: bool = False                           # park, not drop, when a link ends (/hold)
    incoming: dict = field(default_factory=dict)  # (start, stop) -> layers moved here (layer_move.py)
    completed: bool = False                      # STOP went through (on_complete called)
    stats: Stats = field(default_factory=Stats)
    compute_s: float = 0.0               # the last frame's stage + sampling time
    compute_cpu_s: float = 0.0           # its CPU time on the data thread
    header: bytearray = field(default_factory=lambda: bytearray(HEADER_SIZE))  # data thread's

    @property
    def run_id(self) -> int:
        return self.req.run_id

    @property
    def is_finisher(self) -> bool:
        return self.req.role == "finisher"

    # ---- the data thread -------------------------------------------------------------------
    def on_frame(self, up: socket.socket, t0: float) -> bool:
        """One frame from the previous node (waited for since t0), computed and
        forwarded; False after STOP (forwarded, statistics written)."""
        frame = recv_frame(up, self.limits, self.header)
        t1, c1 = time.perf_counter(), time.thread_time()
        self.stats.frames_in += 1
        self.last_active = time.monotonic()
        if frame.kind == Kind.STOP:
            self.stopping = True  # the next node may close its end once it has the STOP
            self.completed = True
            if self.on_complete is not None:  # first: once STOP is out, the starter may ask
                self.on_complete(self)
            self.send(Frame(Kind.STOP, self.run_id))
            return False
        if frame.kind not in INPUT_KINDS:
            raise WireError(f"unexpected {frame.kind.name} frame on a node's input")
        if frame.kind == Kind.ADMIT:
            self.live.add(frame.sample)
        elif frame.kind == Kind.RETIRE:
            self.live.discard(frame.sample)
        self.busy = True
        try:
            self.compute_s = self.compute_cpu_s = 0.0
            out = self.compute(frame)
            if out is not None:
                self.send(out)
        finally:
            self.busy = False
            self.last_active = time.monotonic()
        self.stats.time_frame(t1 - t0, self.compute_s, time.perf_counter() - t1,
                              self.compute_cpu_s, time.thread_time() - c1)
        return True

    def send(self, frame: Frame) -> None:
        """A frame to the next node (DownstreamError when it fails)."""
        nxt = self.req.next
        assert self.link is not None
        t0 = time.perf_counter()
        try:
            n = send_frame(self.link.down, frame)
        except TimeoutError:
            raise DownstreamError(f"the link to the next node at {nxt.addr}:{nxt.port} took no "
                                  f"frame for {self.timeout:g} s") from None
        except OSError as e:
            raise DownstreamError(f"the link to the next node at {nxt.addr}:{nxt.port} failed: "
                                  f"{e or type(e).__name__}") from None
        self.stats.send_s += time.perf_counter() - t0
        self.stats.frames_out += 1
        self.stats.bytes_out += n
        if frame.kind in OUTPUT_DECODE_KINDS:
            self.stats.decode_bytes_out += n
            self.stats.decode_tokens_out += frame.tensor.shape[0]
        elif frame.kind in (Kind.PREFILL, Kind.PREFILLS):
            self.stats.prefill_bytes_out += n

    @torch.inference_mode()
    def compute(self, frame: Frame) -> Frame | None:
        """This node's stage on one frame: what goes on to the next node, if anything."""
        if self.slots is not None:
            return self._compute_seq(self.slots, frame)
        # A fixed batch: only --resend-context runs one (the engine serves the rest as
        # sequences), and it sends CONTEXT frames: no cache, the whole context every step.
        if frame.kind != Kind.CONTEXT:
            raise WireError(f"{frame.kind.name} frame in a fixed-batch run, which carries "
                            "CONTEXT frames only (--resend-context)")
        stage = self.stage
        if stage is None or frame.tensor is None:
            raise RuntimeError("the run was dropped before this frame was computed")
        device = stage.first_param().device
        x = frame.tensor.to(device, copy=True)  # aligned memory, as in single-device runs
        out = self._timed(forward_context, stage, x)
        if not self.is_finisher:
            return Frame(Kind.CONTEXT, self.run_id, frame.sample, 0, out)
        assert self.sampling is not None
        gens = self.generators[frame.sample:frame.sample + 1]
        tok = self._timed(sample_rows, out, self.sampling, gens)
        return Frame(Kind.TOKENS, self.run_id, frame.sample, 0, torch.tensor(tok))

    def _compute_seq(self, slots: SlotStage, frame: Frame) -> Frame | None:
        """A sequence run: the frame as a message for this stage's slots."""
        try:
            # a REPLAY frame: the ring waits for it, so every core (replay_threads.py)
            with replay_compute() if frame.kind == Kind.REPLAY else contextlib.nullcontext():
                out = self._timed(slots.handle, to_message(frame, slots))
        except SlotError as e:
            raise WireError(str(e)) from None
        return None if out is None else to_frame(out, self.run_id, slots)

    def _timed(self, fn, *args):
        """fn(*args), its time (and CPU time) added to the frame's compute time."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            self.compute_s += time.perf_counter() - t0
            self.compute_cpu_s += time.thread_time() - c0


# ---- on the event loop ---------------------------------------------------------------------
async def watchdog(run: NodeRun, idle_timeout: float, current: Callable[[], NodeRun | None],
                   drop: Callable[[str], Awaitable[None]]) -> None:
    """Drop the run after idle_timeout seconds without a frame, an upload or a
    control call: a starter frozen without closing its link (SIGSTOP, a hung
    host) would otherwise hold this node's memory and ports for good. The clock
    runs from the previous node's connection: before it, uploads to the other
    nodes may take long, and a new /init replaces the run anyway."""
    while current() is run:
        if (not run.upstream and not run.parked) or (run.slots is not None and not run.live):
            # not connected yet, or an engine run with no sequence in flight: an
            # idle server (mdi serve) waits for requests as long as it likes
            run.last_active = time.monotonic()
        left = run.last_active + idle_timeout - time.monotonic()
        if left <= 0 and not run.busy:
            reason = (f"no frame for {idle_timeout:g} s (--idle-timeout): the starter "
                      "or the previous node went silent")
            log.warning("run %d: %s", run.run_id, reason)
            await drop(reason)
            return
        await asyncio.sleep(max(left, 0.05))


def link_failure(e: BaseException) -> str:
    """Why a run's data thread ended, in words for the log and the starter."""
    if isinstance(e, EOFError):
        return "the previous node closed the link"
    if isinstance(e, DownstreamError):
        return str(e)
    if isinstance(e, FrameStalled):
        return f"the previous node stalled: {e}"
    if isinstance(e, WireError):
        return f"bad frame from the previous node: {e}"
    if isinstance(e, OSError):
        return f"the link from the previous node failed: {reason(e)}"
    return f"cannot process a frame: {reason(e)}"


def reason(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, (WireError, AuthError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---- who may connect as the previous node --------------------------------------------------
def ip_of(addr: str):
    """An address as an ipaddress object (IPv4-mapped IPv6 unmapped), or None for a name."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def peer_allowed(host: str, allowed: frozenset) -> bool:
    """Is a connection from host the configured previous node? Loopback counts as one host."""
    ip = ip_of(host)
    if ip is None:
        return False
    return ip in allowed or (ip.is_loopback and any(a.is_loopback for a in allowed))


def fmt_peer(peer) -> str:
    if isinstance(peer, (str, bytes)):  # AF_UNIX: the peer's socket has no name
        return "a local socket"
    return f"{peer[0]}:{peer[1]}" if peer else "?"


async def resolve(host: str, where: str, timeout: float) -> frozenset:
    """The IP addresses of host (a literal, or a name looked up once at /init)."""
    ip = ip_of(host)
    if ip is not None:
        return frozenset({ip})
    try:
        infos = await bounded(asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        why = f"no answer within {timeout:g} s" if isinstance(e, asyncio.TimeoutError) \
            else (str(e) or type(e).__name__)
        raise InitError(f"{where}: cannot resolve {host!r}: {why}") from None
    ips = frozenset(ip for ip in (ip_of(info[4][0]) for info in infos) if ip is not None)
    if not ips:
        raise InitError(f"{where}: {host!r} has no IP address")
    return ips
