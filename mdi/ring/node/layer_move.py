"""A node's part in a live re-plan that moves layers with their KV cache
(ring/starter/layer_shift.py, docs/wire.md "Moving layers").

1. /hold: the run is kept, not dropped, when its links end (the starter then
   closes its own: the ring stops at a step boundary and every node parks,
   resume.py:park, its stage and caches intact).
2. The node that gives layers [a, b) answers /move/export with their KV rows for
   the slots the starter names (the move stream, protocol/kv_move.py); nothing
   on it changes.
3. The node that takes them is armed by /move/expect (the layers, each slot's
   positions) and then takes the rows (PUT /move/kv, checked whole before it is
   kept) and the layers' weights (PUT /move/weights: the starter's weights
   stream, built as /weights builds a stage). All of it waits beside the run.
4. The /init that resumes the parked run names the new range: `take` splices the
   stage (engine/layer_splice.py): layers given go, layers taken come with their
   rows, the rest stays as it was. A move that does not fit is an InitError and
   the parked run is as it was; the starter then forms the ring anew.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from ...engine.layer_splice import (SpliceError, check_positions, kv_dtype, rows_of, splice,
                                    why_not_movable)
from ...engine.slots import SlotError
from ...model import GPT
from ...model.dtypes import DTYPES
from ..plan import limits as mem
from ..protocol.kv_move import Expect, MoveError, Rows, decode, encode
from .chunk_load import stage_from_stream
from .control_messages import MoveSpec
from .data_plane import NodeRun
from .resume import park
from .validate import InitError

log = logging.getLogger(__name__)


@dataclass
class Incoming:
    """Layers on their way to this node: what must come, and what came."""
    expect: Expect
    rows: Rows | None = None
    blocks: GPT | None = None
    nbytes: int = 0  # rows and weights: held beside the run (runtime._held)


async def park_now(rt, run: NodeRun, why: str) -> None:
    """Stop the run's data thread now, keeping its state (no-op once parked); its
    statistics become /status's last_run, as when a link failure parks it."""
    if run.parked:
        return
    park(run, why)
    rt.last_stats = {"run_id": run.run_id, "reason": why, **run.stats.to_dict()}
    timeout = rt.timeout
    if run.link is not None:
        run.link.close()
        await asyncio.get_running_loop().run_in_executor(None, run.link.join, timeout)
        if run.link.alive():  # still computing: its stage and caches are not ours to touch
            raise InitError(f"move: run {run.run_id}'s data thread did not stop within "
                            f"{timeout:g} s")


def held(rt, run_id: int) -> NodeRun:
    """The configured sequence run `run_id` (InitError otherwise)."""
    run = rt.current_run(run_id)
    if run.slots is None:
        raise InitError(f"run_id: run {run_id} holds no KV slots")
    why = why_not_movable(run.slots)
    if why:
        raise InitError(f"move: layers cannot move: {why}")
    return run


def expect_of(run: NodeRun, spec: MoveSpec) -> Expect:
    """The stream a move of spec's layers and slots carries, checked against the run:
    layers of the model, slots it holds with at least those positions (every stage
    holds the same positions), so that its size is bounded by the run's own cache."""
    assert run.slots is not None
    c = run.config
    if not 0 <= spec.start < spec.stop <= c.n_layer:
        raise InitError(f"move: layers [{spec.start}, {spec.stop}) are not a range of the "
                        f"model's {c.n_layer}")
    positions = tuple(sorted((s, n) for s, n in spec.slots))
    try:
        check_positions(run.slots, dict(positions))
        if len(dict(positions)) != len(positions):
            raise MoveError(f"slots {list(positions)}: each slot once")
        return Expect(spec.start, spec.stop, positions, kv_dtype(run.slots), c.kv_heads,
                      c.head_size)
    except (MoveError, SpliceError) as e:
        raise InitError(f"move: {e}") from None


async def export(rt, spec: MoveSpec) -> bytes:
    """The move stream of layers [start, stop) of the parked run; the run unchanged."""
    run = held(rt, spec.run_id)
    await park_now(rt, run, "giving layers to a neighbour")
    expect = expect_of(run, spec)
    assert run.slots is not None

    def read() -> bytes:
        return b"".join(encode(expect, rows_of(run.slots, spec.start, spec.stop,
                                               dict(expect.positions))))
    try:
        data = await asyncio.get_running_loop().run_in_executor(rt.executor, read)
    except (SpliceError, MoveError, SlotError) as e:
        raise InitError(f"move: {e}") from None
    log.info("run %d: layers [%d, %d) given, %d slot(s), %d bytes of KV rows", run.run_id,
             spec.start, spec.stop, len(expect.positions), len(data))
    return data


async def expect(rt, spec: MoveSpec) -> dict:
    """Arm the parked run for layers [start, stop) it does not hold (the resuming
    /init checks that they and the layers it keeps make its new range)."""
    run = held(rt, spec.run_id)
    await park_now(rt, run, "taking layers from a neighbour")
    if spec.start < run.req.stop and spec.stop > run.req.start:
        raise InitError(f"move: layers [{spec.start}, {spec.stop}) overlap this node's "
                        f"[{run.req.start}, {run.req.stop})")
    ex = expect_of(run, spec)
    req = run.req
    need = ex.nbytes + mem.stage_weight_bytes(run.config, spec.start, spec.stop,
                                              DTYPES[req.dtype], req.quantize)
    taken = rt._held()  # the run's, and what other moves brought
    total, where = mem.available(run.device, rt.max_memory, taken)
    have = total - taken
    if need > have:
        raise InitError(f"memory: layers [{spec.start}, {spec.stop}) with their KV rows need "
                        f"{mem.format_size(need)}, this node has {mem.format_size(have)} "
                        f"({where})")
    run.incoming[(spec.start, spec.stop)] = Incoming(ex, nbytes=need)
    return {"bytes": ex.nbytes}


def incoming(rt, run_id: int, start: int, stop: int) -> tuple[NodeRun, Incoming]:
    run = held(rt, run_id)
    inc = run.incoming.get((start, stop))
    if inc is None:
        raise InitError(f"move: layers [{start}, {stop}) are not expected here (/move/expect)")
    return run, inc


async def take_rows(rt, run_id: int, start: int, stop: int, declared: str | None,
                    body: AsyncIterator[bytes]) -> dict:
    """PUT /move/kv: the whole stream, checked, kept beside the parked run."""
    run, inc = incoming(rt, run_id, start, stop)
    n = inc.expect.nbytes
    if declared != str(n):
        raise InitError(f"move: a stream of {declared} bytes, these rows take {n}")
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > n:
            raise InitError(f"move: more than the {n} bytes of these rows")
    try:
        inc.rows = decode(data, inc.expect)
    except MoveError as e:
        raise InitError(f"move: {e}") from None
    return {"rows": len(inc.rows)}


async def take_weights(rt, run_id: int, start: int, stop: int,
                       body: AsyncIterator[bytes]) -> dict:
    """PUT /move/weights: the taken layers' blocks, built for the run."""
    run, inc = incoming(rt, run_id, start, stop)
    run.busy = True
    try:
        inc.blocks = await stage_from_stream(run, body, rt.executor, span=(start, stop))
    finally:
        run.busy = False
    return {"blocks": stop - start}


def take(kept: NodeRun, start: int, stop: int, positions: dict[int, int]) -> None:
    """The resumed run's new range: splice what came (InitError if it does not fit;
    the kept run is then as it was)."""
    assert kept.slots is not None
    blocks, rows = {}, {}
    for (a, b), inc in kept.incoming.items():
        if inc.rows is None or inc.blocks is None:
            raise InitError(f"move: layers [{a}, {b}) came without their "
                            f"{'rows' if inc.rows is None else 'weights'}")
        if dict(inc.expect.positions) != positions:
            raise InitError(f"move: layers [{a}, {b}) came for other positions than the "
                            "resume keeps")
        blocks.update({i: inc.blocks.transformer["h"][str(i)] for i in range(a, b)})
        rows.update(inc.rows)
    try:
        splice(kept.slots, start, stop, blocks, rows, positions)
    except (SpliceError, SlotError) as e:
        raise InitError(f"move: {e}") from None
    kept.incoming = {}
    log.info("run %d: layers now [%d, %d) (were [%d, %d)), %d taken with their KV rows",
             kept.run_id, start, stop, kept.req.start, kept.req.stop, len(blocks))
