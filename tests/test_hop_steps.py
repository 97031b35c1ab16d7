"""`python -m mdi.bench.hop_steps` (one node hop, piece by piece, in one process):
it runs the real frame path on a tiny model and reports every piece of every frame."""
from __future__ import annotations

import torch

from mdi.bench.hop_steps import PIECES, measure

torch.set_num_threads(1)


def test_each_piece_of_each_frame_is_timed(tiny_ckpt):
    times = measure(str(tiny_ckpt), 1, frames=5)
    assert set(times) == set(PIECES)
    assert all(len(v) == 5 and min(v) > 0 for v in times.values())
    for i in range(5):  # the hop is the frame's time less its compute
        parts = sum(times[k][i] for k in ("recv", "to_message", "to_frame", "send"))
        assert abs(times["hop"][i] - parts) < 1.0
