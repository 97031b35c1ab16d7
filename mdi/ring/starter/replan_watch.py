"""The ring engine's watch for drift (`--replan on`; the rules are in replan.py).

Every ReplanPolicy.poll_s it reads each secondary's /status "stats" (the current run's frames
and their compute and overhead seconds) and the first stage's own step times,
and hands each window (steps, seconds a step per stage) to a Drift of the ring
now running; a new ring (recovery, rejoin, re-plan) starts a new one. When the
Drift fires and the drifted plan predicts a gain, a Replan goes into the
scheduler's inbox; the engine re-plans when it takes it (steps in flight are computed again).
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import httpx

from ..plan.planner import NodeCost
from .replan import Drift, Replan, drifted_costs, predicted_gain

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """Counters at one poll: steps of the first stage, frames and busy seconds per stage."""
    steps: int
    frames: list[int]
    busy_s: list[float]
    prefill_steps: int = 0   # of the first stage's steps, those with a prefill chunk


async def sample(http: httpx.AsyncClient, engine: Any, timeout: float) -> Sample | None:
    """The ring's counters now; None when a node does not say (or is in another run)."""
    t = engine.times
    frames, busy, prefills = [t.steps], [t.busy_s], t.prefill_steps
    for spec in engine.nodes.secondaries:
        try:
            r = await http.get(spec.url + "/status", timeout=timeout)
            d = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
        st = d.get("stats") if d.get("run_id") == engine.run_id else None
        if not st:
            return None
        frames.append(int(st.get("frames_timed", 0)))
        busy.append(float(st.get("compute_s", 0.0)) + float(st.get("other_s", 0.0)))
    return Sample(frames[0], frames, busy, prefills)


def window(a: Sample, b: Sample) -> tuple[int, list[float]]:
    """Steps between two samples and each stage's seconds a step (nan: no frame)."""
    times = [(y - x) / (g - f) if g > f else math.nan
             for f, g, x, y in zip(a.frames, b.frames, a.busy_s, b.busy_s)]
    return b.steps - a.steps, times


def ring_costs(engine: Any) -> list[NodeCost]:
    """The current plan's costs when they are this ring's, in its order (else none known:
    drifted_costs spreads the measured times over the blocks)."""
    names = [s.name for s in engine.nodes.ring]
    p = engine.placement
    if p is not None and [c.name for c in p.plan.costs] == names:
        return list(p.plan.costs)
    return [NodeCost(n, math.nan) for n in names]


def decide(engine: Any, drift: Drift) -> Replan | None:
    """A Replan when the drifted plan predicts a gain worth a pause (else None, logged)."""
    shards, policy = engine.shards, drift.policy
    assert drift.predicted is not None
    costs = drifted_costs(ring_costs(engine), shards, drift.predicted, drift.drift,
                          measured=True)
    try:
        gain, best = predicted_gain(costs, shards, len(engine.sizes))
    except ValueError as e:  # PlanError: the drifted costs fit no split (memory)
        log.info("stage times drifted, but no other split fits: %s", e)
        return None
    names = [s.name for s in engine.nodes.ring]
    slow = max(range(len(names)), key=lambda i: drift.drift[i])
    why = (f"{names[slow]} runs {drift.drift[slow]:.2f}x slower than the plan predicted "
           f"(against the ring's other stages) for {policy.hold_steps}+ steps; a new split "
           f"{[s.n_blocks for s in best]} predicts the ring {gain:.2f}x faster than "
           f"{[s.n_blocks for s in shards]}")
    if gain < policy.min_gain:
        log.info("not re-planning: %s (below the %.2fx a pause must gain)", why, policy.min_gain)
        return None
    log.warning("re-planning: %s", why)
    return Replan(why, [round(x, 3) for x in drift.drift], best)


def failed_replans(engine: Any, asked: int, failed: int) -> int:
    """`failed` plus one when the watch asked for re-plans and the engine's last
    recovery is not one that formed (it went back to the old ring)."""
    done = sum(1 for r in engine.recoveries if r.get("recovery") == "replan")
    return failed + 1 if asked > done + failed else failed


async def watch(engine: Any) -> None:
    """Poll the ring while the engine runs (see the module doc); cancelled by close()."""
    policy = engine.opts.replan_policy
    drift: Drift | None = None
    run: int | None = None
    last: Sample | None = None
    asked, failed = 0, 0  # re-plans put in the inbox, and those whose ring did not form
    timeout = engine.client.probe_timeout
    async with engine.client.http() as http:
        while not engine._closing and engine.failure is None:
            await asyncio.sleep(policy.poll_s)
            if engine._recovering or engine.replan_pending or engine.link is None:
                run = None
                continue
            try:
                if engine.run_id != run:
                    run, last = engine.run_id, None
                    failed = failed_replans(engine, asked, failed)
                    # after a re-plan that did not form, wait twice as long each time
                    gap = policy.min_gap_steps * 2 ** min(failed, 10)
                    drift = Drift(replace(policy, min_gap_steps=gap), len(engine.nodes.ring))
                now = await sample(http, engine, timeout)
                if now is None or run != engine.run_id:
                    last = None
                    continue
                # a window with prefill chunks says little of the decode steps' balance
                if last is not None and drift is not None and \
                        now.prefill_steps == last.prefill_steps:
                    steps, times = window(last, now)
                    if drift.observe(steps, times):
                        replan = decide(engine, drift)
                        if replan is not None and not (engine._recovering or engine._closing):
                            engine.replan_pending = True
                            engine._inbox.put_nowait(replan)
                            asked += 1
                last = now
            except Exception as e:  # noqa: BLE001 - the watch goes on; the ring is not at stake
                log.warning("watching the ring's stage times failed: %s", e, exc_info=e)
