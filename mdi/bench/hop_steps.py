"""One node hop, piece by piece, in one process: `python -m mdi.bench.hop_steps`.

A finisher's frame path as a node's data loop runs it (ring/node/data_plane.py):
a DECODE frame of one lane read from a Unix socket (sock_io.recv_frame), made a
message (seq_frames.to_message), computed by the stage's SlotStage (layers
[--start, n_layer) with the head and sampling), made a frame again (to_frame) and
written with one sendmsg (sock_io.send_frame). Each piece is timed per frame with
perf_counter_ns, right after the stage's compute as in a ring, where the stage
has just flushed the caches the hop's Python and torch calls need; `hop` is
everything but the compute. Prints min and median microseconds per piece (JSON
with --json). No network, no second process: the receiver's wake-up is not in it.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import torch

from ..checkpoint.sources import load_stage
from ..engine.messages import Admit, Prefill
from ..engine.slots import SlotStage
from ..ring.protocol.seq_frames import to_frame, to_message
from ..ring.protocol.sock_io import recv_frame, send_frame
from ..ring.protocol.wire import DTYPE_CODES, HEADER_SIZE, Frame, Kind, Limits, encode_frame

PIECES = ("recv", "to_message", "compute", "to_frame", "send", "hop")


def measure(ckpt: str, start: int, frames: int, lanes: tuple[int, ...] = (2, 1),
            seed: int = 0) -> dict[str, list[float]]:
    """Microseconds per piece for each of `frames` DECODE frames of lane 0."""
    stage, _ = load_stage(ckpt, start, None, dtype=torch.float32)
    slots = SlotStage(stage, list(lanes))
    c, n = stage.config.n_embd, sum(lanes)
    gen = torch.Generator().manual_seed(seed)
    lim = Limits(7, c, stage.config.block_size, n, DTYPE_CODES[torch.float32], max(lanes),
                 sequences=True)

    def admit_all() -> None:
        for s in range(n):
            slots.handle(Admit(s, 0.8, 200, None, 1234 + s))
            slots.handle(Prefill(s, torch.randn(1, 1, c, generator=gen), 0))

    admit_all()
    x = torch.randn(lanes[0], 1, c, generator=gen)
    header = bytearray(HEADER_SIZE)
    times: dict[str, list[float]] = {k: [] for k in PIECES}
    up, up_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    down, down_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pos = 1
    try:
        for _ in range(frames):
            if pos >= stage.context - 1:  # the cache is full: the sequences start again
                admit_all()
                pos = 1
            up_peer.sendall(encode_frame(Frame(Kind.DECODE, 7, 0, pos, x)))
            t0 = time.perf_counter_ns()
            frame = recv_frame(up, lim, header)
            t1 = time.perf_counter_ns()
            msg = to_message(frame, slots)
            t2 = time.perf_counter_ns()
            with torch.inference_mode():
                out = slots.handle(msg)
            t3 = time.perf_counter_ns()
            nxt = to_frame(out, 7, slots)
            t4 = time.perf_counter_ns()
            send_frame(down, nxt)
            t5 = time.perf_counter_ns()
            down_peer.recv(1 << 16)
            pos += 1
            for k, v in zip(PIECES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4,
                                     t5 - t0 - (t3 - t2))):
                times[k].append(v / 1000)
    finally:
        for sock in (up, up_peer, down, down_peer):
            sock.close()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi.bench.hop_steps", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="models/shakespeare-char")
    p.add_argument("--start", type=int, default=None, help="the stage's first layer (default: half)")
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.start is None:
        from ..checkpoint import open_checkpoint
        args.start = open_checkpoint(args.ckpt).config.n_layer // 2
    times = measure(args.ckpt, args.start, args.frames)
    summary = {k: {"min_us": round(min(v), 1), "median_us": round(statistics.median(v), 1)}
               for k, v in times.items()}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:12s} min {v['min_us']:8.1f}  median {v['median_us']:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
