"""Recovery by upstream replay (`--recovery replay`): heal the ring around one
lost node instead of forming it anew.

When exactly one secondary is lost, every other one still answers, and a spare
is listed, the spare takes the lost node's layer range and nothing else moves:
- the survivors get an /init that resumes their parked run (ring/node/resume.py):
  same stage, same KV caches, cut back to the positions every stage holds for
  certain (engine/replay.py:Confirmed), no weights uploaded;
- the spare gets the lost range's weights and its slots, admitted and waiting;
- the node upstream of it (the starter itself when the lost node was the first
  secondary) sends its log of those positions as REPLAY frames: the spare
  prefills only its own layers and sends nothing on, since the stages after it
  hold those positions already. The starter sends each slot's just before the
  slot's first frame (replay_order.py), so that the first lane decodes while
  the spare replays the next; a node sends them all before serving.
The engine then goes on from the step boundary (PipelineEngine._rewind with the
slots kept); what lies past the kept positions is prefilled as an ordinary chunk.

Anything else (two neighbours lost, no spare, a node that does not answer) is
not healed here: `heal` returns None and the ring is formed anew (reprefill).
"""
from __future__ import annotations

import logging
from typing import Any

from ..cluster.nodes_config import NodeSpec, NodesConfig

log = logging.getLogger(__name__)


def why_not(old: NodesConfig, lost: set[str], pool: list[NodeSpec], spares: list[NodeSpec],
            first_log: bool) -> str | None:
    """Why this loss cannot be healed by replay (None: it can)."""
    names = [s.name for s in old.secondaries]
    if len(lost) != 1 or not lost <= set(names):
        return f"{len(lost)} node(s) lost ({', '.join(sorted(lost)) or 'none named'})"
    if [s.name for s in pool] != [n for n in names if n not in lost]:
        return "a survivor does not answer"
    if not spares:
        return "no spare answers to take the lost layers"
    if names.index(next(iter(lost))) == 0 and not first_log:
        return "the starter keeps no log"
    return None


async def heal(engine: Any, old: NodesConfig, old_run: int, lost: set[str],
               pool: list[NodeSpec], spares: list[NodeSpec]) -> dict | None:
    """Heal `engine`'s ring (a RingEngine whose link was abandoned) by replay; the
    recovery record's plan, or None when replay does not serve this loss (the
    caller re-prefills). Raises what forming the ring raises."""
    reason = why_not(old, lost, pool, spares, engine.first.log is not None)
    if reason is not None:
        log.warning("no recovery by replay: %s; forming the ring anew", reason)
        return None
    names = [s.name for s in old.secondaries]
    i = names.index(next(iter(lost))) + 1          # the lost node's place in the ring
    spare = spares[0]
    secondaries = list(old.secondaries)
    secondaries[i - 1] = spare
    nodes = old.reformed(secondaries, spares[1:])
    kept = {s: n for s, n in engine.kept_positions().items() if n > 0}
    seqs = {slot: seq for lane in engine.lanes for slot, seq in lane.seqs.items()}
    slots = [[s, n] for s, n in sorted(kept.items())]
    extras: list[dict] = []
    for j in range(1, len(nodes.ring)):
        if j == i:
            extras.append({"replayed": [
                {"slot": s, "positions": n, "temperature": seqs[s].params.temperature,
                 "top_k": seqs[s].params.top_k, "top_p": seqs[s].params.top_p,
                 "seed": seqs[s].seed} for s, n in sorted(kept.items())]})
        else:
            extras.append({"weights": "kept", "resume": {"run_id": old_run, "slots": slots,
                                                         "replay": j == i - 1}})
    engine.client = engine.client.with_nodes(nodes)
    await engine.form_ring(extras)
    if i == 1:  # the starter is upstream of the replacement: each slot's replay goes
        msgs = await engine._executor.run(engine.first.replay_of, kept)  # before its first
        # step (replay_order.py); read from the log on the compute thread (compute_thread.py)
        if hasattr(engine.link, "hold_replay"):
            engine.link.hold_replay(msgs)
        else:
            for m in msgs:
                await engine.link.send(m)
    engine._keep = kept
    took = engine.client.uploaded.get(spare.name)  # (seconds, from the stream kept for it)
    log.warning("healed by replay: %s took layers [%d, %d) of %s; %d slot(s) replayed, "
                "%d positions", spare.name, engine.shards[i].start, engine.shards[i].stop,
                names[i - 1], len(kept), sum(kept.values()))
    return {"partition": "replay", "reason": f"{spare.name} took the layers of {names[i - 1]}",
            "nodes": [{"node": n.name, "layers": [s.start, s.stop]}
                      for n, s in zip(nodes.ring, engine.shards)],
            "replayed_slots": len(kept), "replayed_positions": sum(kept.values()),
            "spare_weights_s": took[0] if took else None,
            "spare_weights_kept": took[1] if took else None}
