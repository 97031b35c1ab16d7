"""A stage timed on a node's own frame path: what one decode frame costs, all in.

A node's time per frame is not only its blocks: it reads the frame (header
checks, the payload into a new tensor), turns it into a message, runs the
step's bookkeeping and the stage's call, turns the answer into a frame and
writes it. On a fast core that fixed part is a fraction of a millisecond; on a
node capped at a fraction of a core it can outweigh the blocks it computes,
and a planner that does not see it keeps a slow node in the ring whatever it
gives it (issue 22). `time_stages` runs the data thread's path (recv_frame,
to_message, SlotStage.handle, to_frame, send_frame) on one lane of `batch`
slots over a Unix socket pair whose other end, on a thread of its own, plays
the neighbours: the stage waits for every frame and is woken by it, as a
node is (on a busy machine that wake-up is part of every hop).
capability.probe_speed times stages of one and two blocks this way: the
difference is a block, the rest of the one-block stage is the frame's fixed cost.

The figure is the mean frame time over a window of WINDOW_S (the stages timed
take turns, a window each; the caller takes medians over the rounds): a CPU capped by a CFS quota runs at full speed until its quota for the
period is spent and then not at all, so the median of single frames shorter
than a period would not see the cap (a mean over whole periods does), while a
window another process took the core in is one outlier among several.
"""
from __future__ import annotations

import socket
import threading
import time

import torch

from ...engine.messages import Admit, Decode
from ...engine.slots import SlotStage
from ...generate.sampling import SamplingConfig
from ...model import GPT
from ..protocol.seq_frames import to_frame, to_message
from ..protocol.sock_io import recv_frame, send_frame
from ..protocol.wire import DTYPE_CODES, HEADER_SIZE, Frame, Kind, Limits, WireError

WARMUP_FRAMES = 2
WINDOW_S = 0.05       # five CFS periods of `mdi bench --node-cpu` (10 ms)
MIN_WINDOWS = 3
JOIN_S = 5.0
# the finisher samples every row of every step; at the CLI's default settings
PROBE_SAMPLING = SamplingConfig(temperature=0.8, top_k=200)


def time_stages(stages: list[GPT], batch: int, device: str, min_time: float,
                context: int | None = None) -> list[list[float]]:
    """ms per decode frame of `batch` rows through each stage on the frame path, at
    `context` positions (None: a quarter of each stage's cache): one figure per
    round, a round being a window of each stage in turn, so that a change in the
    machine's load reaches all of them alike and their differences within a
    round (a block, an end stage's extra) stay sound."""
    benches = [_Bench(stage, batch, device, context) for stage in stages]
    try:
        with torch.inference_mode():
            for bench in benches:
                for _ in range(WARMUP_FRAMES):
                    bench.frame()
            means: list[list[float]] = [[] for _ in benches]
            start = time.perf_counter()
            while len(means[0]) < MIN_WINDOWS or \
                    time.perf_counter() - start < min_time * len(benches):
                for bench, got in zip(benches, means):
                    got.append(_window(bench.frame))
    finally:
        for bench in benches:
            bench.close()
    return [[1000.0 * t for t in m] for m in means]


def _window(frame) -> float:
    """Seconds per call of frame(), over at least WINDOW_S."""
    start = time.perf_counter()
    n = 0
    while True:
        frame()
        n += 1
        now = time.perf_counter()
        if now - start >= WINDOW_S:
            return (now - start) / n


class _Bench:
    """One stage on one lane of `batch` slots; its neighbours on a thread of their
    own at the socket pair's other end. The stage waits for each frame and is
    woken when it comes, as a node is: on a busy machine that wake-up is part of
    every hop. The first stage is fed the sampled tokens, as the starter is."""

    def __init__(self, stage: GPT, batch: int, device: str, context: int | None) -> None:
        self.stage = stage
        self.slots = slots = SlotStage(stage, [batch])
        self.pos0 = stage.context // 4 if context is None else min(context, stage.context - 1)
        for i in range(batch):
            slots.admit(Admit(i, PROBE_SAMPLING.temperature, PROBE_SAMPLING.top_k, None, i))
            slots.slots[i].position = self.pos0
        self.table = table = tuple(range(batch))
        config = stage.config
        dtype = stage.first_param().dtype
        self.limits = Limits(1, config.n_embd, config.block_size, batch, DTYPE_CODES[dtype],
                             batch, sequences=True)
        self.ids = torch.randint(0, config.vocab_size, (batch, 1))
        self.feeds = stage.start > 0  # a node's stage takes activations; the starter's, tokens
        feed = Frame(Kind.SEQ_DECODE, 1, 0, 0, torch.randn(batch, 1, config.n_embd, dtype=dtype),
                     table) if self.feeds else Frame(Kind.TOKENS, 1, 0, 0, self.ids.view(-1))
        self.sock, self.peer = socket.socketpair()
        self.thread = threading.Thread(target=_neighbours, args=(self.peer, self.limits, feed),
                                       name="frame-probe", daemon=True)
        self.thread.start()
        self.header = bytearray(HEADER_SIZE)
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def frame(self) -> None:
        """One frame in, through the stage, its answer out."""
        slots = self.slots
        if slots.slots[0].position >= self.stage.context - 1:  # stay inside the cache
            for s in slots.slots:
                s.position = self.pos0
        f = recv_frame(self.sock, self.limits, self.header)
        m = to_message(f, slots) if self.feeds else Decode(0, self.table, self.ids)
        out = to_frame(slots.handle(m), 1, slots)
        self.sync()
        send_frame(self.sock, out)

    def close(self) -> None:
        self.sock.close()  # the neighbours read EOF (or fail to send) and end
        self.thread.join(JOIN_S)
        self.peer.close()


def _neighbours(sock: socket.socket, limits: Limits, feed: Frame) -> None:
    """The stage's neighbours: send it `feed`, read its answer, until it closes."""
    header = bytearray(HEADER_SIZE)
    try:
        while True:
            send_frame(sock, feed)
            recv_frame(sock, limits, header)
    except (EOFError, OSError, WireError):
        return
