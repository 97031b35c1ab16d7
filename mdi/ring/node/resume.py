"""A node's part in a recovery by replay (`--recovery replay`, docs/wire.md).

A run configured with recovery "replay" keeps, on every stage but the last, the
activations it sent downstream (engine/replay.py:ActivationLog), and when one of
its links fails it is *parked* (`park`) instead of dropped: its stage, KV caches
and log stay until the starter's next /init, the idle timeout or /stop.

The next /init then says what this node is in the healed ring:
- a survivor (`resume`): it takes the parked run over under the new run id, no
  weights move, and each slot keeps the positions every stage holds; the one
  upstream of the replacement first sends its log of those positions down as
  REPLAY frames (`replay_first`, on the data thread before any other frame);
- the replacement (`expect_replays`): its slots are admitted at /init and wait
  for those REPLAY frames, which fill its cache and go no further.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Callable

from ...engine.messages import Admit
from ...engine.slots import SlotError, SlotStage
from ..protocol.seq_frames import to_frame
from ..protocol.sock_io import send_frame
from .data_link import DownstreamError
from .data_plane import NodeRun
from .validate import InitError

log = logging.getLogger(__name__)


def park(run: NodeRun, why: str) -> None:
    """Keep the run after a link failed: no links, its state for a resume."""
    run.parked, run.upstream = True, False
    run.last_active = time.monotonic()  # the idle timeout drops it if no resume comes
    log.info("run %d parked for a resume (%s): %d slot(s) live", run.run_id, why, len(run.live))


def resume(run: NodeRun, kept: NodeRun) -> None:
    """The new run takes over the kept run's stage, caches and log, each slot cut
    back to the positions of the /init's resume (InitError if one holds fewer)."""
    assert run.req.resume is not None and kept.slots is not None
    positions = dict(run.req.resume.slots)
    try:
        kept.slots.keep(positions)
    except SlotError as e:
        raise InitError(f"resume.slots: {e}") from None
    run.stage, run.slots = kept.stage, kept.slots
    run.live = set(positions)
    log.info("run %d resumes run %d: %d slot(s) kept, no reload%s", run.run_id, kept.run_id,
             len(positions), "; replaying them to the next node" if run.req.resume.replay else "")


def expect_replays(run: NodeRun, slots: SlotStage) -> None:
    """A run with recovery "replay" keeps its log; a replacement's slots are admitted
    and wait for their replay."""
    req = run.req
    if req.recovery != "replay":
        return
    slots.keep_log()
    try:
        for r in req.replayed:
            slots.expect_replay(Admit(r.slot, r.temperature, r.top_k, r.top_p, r.seed),
                                r.positions)
    except SlotError as e:
        raise InitError(f"replayed: {e}") from None
    run.live |= {r.slot for r in req.replayed}


def replay_first(run: NodeRun) -> Callable[[socket.socket], None] | None:
    """What the data thread sends before serving: the upstream survivor's replay."""
    spec = run.req.resume
    if spec is None or not spec.replay:
        return None

    def send(down: socket.socket) -> None:
        assert run.slots is not None
        t0 = time.perf_counter()
        msgs = run.slots.replay_of(dict(spec.slots))
        for m in msgs:
            try:
                run.stats.bytes_out += send_frame(down, to_frame(m, run.run_id, run.slots))
            except OSError as e:  # a timeout too
                raise DownstreamError(f"the replay to the next node failed: "
                                      f"{e or type(e).__name__}") from None
        log.info("run %d: replayed %d slot(s), %d positions, in %.3f s", run.run_id,
                 len(spec.slots), sum(m.x.shape[1] for m in msgs), time.perf_counter() - t0)
    return send
