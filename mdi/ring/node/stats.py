"""A run's counters on a node: frames, bytes and where each frame's time went.

Reported per hop by /status (and the starter's results): the data thread adds
to them (data_plane.py), the control plane reads them.
"""
from __future__ import annotations

from dataclasses import dataclass


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
