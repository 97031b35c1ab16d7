"""A live re-plan that moves layers with their KV cache (replan.py: *moved*).

The drift watch planned a new split from the step times it measured (no probe);
the ring keeps its nodes and only the boundaries between neighbours move:
1. `end_ring`: every secondary is told to /hold its run (kept, not dropped, when
   its links end); the engine then closes its link: the ring stops at a step
   boundary and every node parks with its stage and caches.
2. `shift`: for each run of layers that changes node (replan.moved_layers), the
   giver's KV rows for every live sequence (the positions every stage holds,
   engine/replay.py:Confirmed) are read (/move/export, or the starter's own
   stage) and handed to the taker (/move/expect, then PUT /move/kv), with the
   layers' weights from the starter's checkpoint (PUT /move/weights: the stream
   /weights takes, only these layers). The starter relays the rows: the nodes hold
   no client of each other's control planes. Nothing has changed on any node yet.
3. The starter splices its own stage, then forms the ring again with an /init that
   resumes each node's parked run with its new range (ring/node/layer_move.py:
   take); the sequences go on from their kept positions (PipelineEngine._rewind
   with `_keep`), no re-prefill. Steps that were in flight are computed again.
Anything that fails raises; the engine then forms the ring anew (the rebuild of
replan.py), which configures every node afresh.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Iterator

import httpx

from ...checkpoint.stream import shard_stream
from ...engine.layer_splice import kv_dtype, rows_of, splice, why_not_movable
from ...model.dtypes import DTYPES
from ..cluster.nodes_config import NodeSpec
from ..plan.partition import Shard
from ..protocol.kv_move import Expect, decode, encode
from .client import _check
from .options import NodeFailure, first_stage
from .replan import Replan, moved_layers

log = logging.getLogger(__name__)


def why_not(engine: Any, shards: list[Shard] | None) -> str | None:
    """Why this re-plan cannot move layers (None: it can)."""
    if shards is None:
        return "no split planned from the measured times"
    if len(shards) != len(engine.nodes.ring):
        return "the new split leaves a node out"
    if engine.opts.recovery == "replay":
        return "--recovery replay keeps logs a move would invalidate"
    return why_not_movable(engine.first)


async def end_ring(engine: Any, e: Exception, run_id: int) -> None:
    """The whole ring ends for a Rejoin or a Replan: released, but held (kept on every
    node) when the Replan can move layers; a node that does not hold: released."""
    async with engine.client.http() as http:
        if isinstance(e, Replan) and why_not(engine, e.shards) is None:
            try:
                await asyncio.gather(*(engine.client.post(http, s, "/hold", {"run_id": run_id})
                                       for s in engine.nodes.secondaries))
                return
            except (NodeFailure, RuntimeError, OSError) as err:
                log.warning("a node did not hold its run (%s); forming the ring anew", err)
                e.shards = None
        await engine.client.release(http, run_id)


async def try_shift(engine: Any, run_id: int, e: Replan) -> dict | None:
    """shift(), or None (logged, nothing kept) when the layers did not move."""
    why = why_not(engine, e.shards)
    if why is not None:
        log.warning("re-planning by forming the ring anew: %s", why)
        return None
    try:
        return await shift(engine, run_id, e.shards)
    except Exception as err:  # noqa: BLE001 - any failure: the ring is formed anew
        log.warning("moving layers failed (%s); forming the ring anew", err,
                    exc_info=err if not isinstance(err, (NodeFailure, RuntimeError, OSError,
                                                         ValueError)) else None)
        engine._keep = {}
        async with engine.client.http() as http:  # the held runs (and what came) go now
            await engine.client.release(http, run_id)
        return None


async def shift(engine: Any, run_id: int, shards: list[Shard]) -> dict:
    """Move the layers that change node between engine.shards and `shards` (see the
    module doc); the recovery record's plan."""
    t0 = time.perf_counter()
    ring = engine.nodes.ring
    me = ring[0].name
    specs = {n.name: n for n in ring}
    moves = moved_layers(list(zip([n.name for n in ring], engine.shards)),
                         list(zip([n.name for n in ring], shards)))
    kept = {s: n for s, n in engine.kept_positions().items() if n > 0}
    slots = sorted(kept.items())
    c, first = engine.config, engine.first
    blocks, rows, nbytes = {}, {}, 0
    async with engine.client.http() as http:
        for m in moves:
            a, b = m["layers"]
            expect = Expect(a, b, tuple(slots), kv_dtype(first), c.kv_heads, c.head_size)
            body = {"run_id": run_id, "start": a, "stop": b, "slots": [[s, n] for s, n in slots]}
            if m["from"] == me:  # (torch work on the engine's compute thread: compute_thread.py)
                data = await engine._executor.run(
                    lambda: b"".join(encode(expect, rows_of(first, a, b, kept))))
            else:
                data = await _export(http, specs[m["from"]], body)
            nbytes += len(data)
            if m["to"] == me:
                rows.update(decode(data, expect))
                stage = await engine._executor.run(first_stage, engine.ck, b, engine.opts, a)
                blocks.update({i: stage.transformer["h"][str(i)] for i in range(a, b)})
                continue
            spec = specs[m["to"]]
            await engine.client.post(http, spec, "/move/expect", body)
            await _put(http, spec, f"/move/kv/{run_id}/{a}/{b}", [data], len(data), engine)
            total, chunks = shard_stream(engine.ck, Shard(a, b, c.n_layer), engine.opts.quantize,
                                         DTYPES[engine.opts.dtype])
            await _put(http, spec, f"/move/weights/{run_id}/{a}/{b}", chunks, total, engine)
    moved_s = time.perf_counter() - t0
    if shards[0] != engine.shards[0]:
        await engine._executor.run(splice, first, 0, shards[0].stop, blocks, rows, kept)
    engine.shards = list(shards)
    p = engine.placement
    if p is not None:  # what --json reports as the run's plan: the ring's split now
        engine.placement = replace(p, mode="moved", reason="layers moved, planned from the "
                                   "measured step times", shards=list(shards),
                                   plan=replace(p.plan, shards=list(shards)))
    resume = {"run_id": run_id, "slots": [[s, n] for s, n in slots], "replay": False}
    await engine.form_ring([{"weights": "kept", "resume": resume} for _ in ring[1:]])
    engine._keep = kept
    log.warning("layers moved with their KV rows: %s; %d slot(s), %d positions, %d bytes of "
                "rows, in %.3f s (ring formed again in %.3f s)",
                ", ".join(f"[{m['layers'][0]}, {m['layers'][1]}) {m['from']} -> {m['to']}"
                          for m in moves), len(kept), sum(kept.values()), nbytes, moved_s,
                time.perf_counter() - t0 - moved_s)
    return {"partition": "moved", "reason": "planned from the measured step times",
            "nodes": [{"node": n.name, "layers": [s.start, s.stop]} for n, s in zip(ring, shards)],
            "kept_slots": len(kept), "kept_positions": sum(kept.values()),
            "moved_kv_bytes": nbytes, "move_s": round(moved_s, 3)}


async def _export(http: httpx.AsyncClient, spec: NodeSpec, body: dict) -> bytes:
    try:
        r = await http.post(spec.url + "/move/export", json=body)
    except httpx.HTTPError as e:
        raise NodeFailure(f"{spec.describe()} did not answer /move/export: "
                          f"{e or type(e).__name__}", node=spec) from None
    if r.status_code != 200:
        _check(r, spec, "/move/export")
    return r.content


async def _put(http: httpx.AsyncClient, spec: NodeSpec, path: str,
               chunks: Iterator[bytes] | list[bytes], total: int, engine: Any) -> None:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    try:
        r = await http.put(spec.url + path, content=body(),
                           timeout=max(engine.opts.timeout, 60.0),
                           headers={"content-type": "application/octet-stream",
                                    "content-length": str(total)})
    except httpx.HTTPError as e:
        raise NodeFailure(f"{spec.describe()} did not take {path}: {e or type(e).__name__}",
                          node=spec) from None
    _check(r, spec, path)
