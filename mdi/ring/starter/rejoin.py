"""Nodes that come back after a recovery lost them.

A node lost in a recovery (failed, or not answering) is *absent*; every
REJOIN_POLL_S the ring engine asks its /health. Once it answers idle
REJOIN_AFTER times in a row it is taken back: as a spare when the ring has as
many nodes as it was formed with, else the ring is formed again with it (a
Rejoin goes through the recovery path: the sequences resume from their tokens),
recorded in `recoveries` as `"recovery": "rejoin"`. A node that fails again
within the recovery window of coming back (or as it comes back) must answer
twice as many times before the next time (up to REJOIN_MAX_AFTER), and that
failure does not count towards the recoveries that make the engine give up: a
node that keeps crashing costs the ring a re-prefill now and then, never the
engine. A local cluster started with restart=True (mdi serve) starts a dead node
process again, so a ring without spares heals this way.
"""
from __future__ import annotations

import logging
import time

import httpx

from ...engine.link import Reform
from ..cluster.nodes_config import NodeSpec

log = logging.getLogger(__name__)
REJOIN_POLL_S = 2.0      # how often absent nodes are asked whether they are back
REJOIN_AFTER = 2         # idle answers in a row before such a node is taken back ...
REJOIN_MAX_AFTER = 32    # ... doubled, up to this, each time it fails again soon after


class Rejoin(Reform):
    """Not a failure: nodes lost earlier answer again and the ring has fewer nodes than
    it was formed with; raised in the scheduler so that the ring is formed again with
    them through the recovery path."""

    def __init__(self, back: list[NodeSpec]) -> None:
        super().__init__(f"{', '.join(s.describe() for s in back)} answer(s) again")
        self.back = back


async def idle(http: httpx.AsyncClient, spec: NodeSpec) -> bool:
    """Does the node answer /health, idle (in no run)?"""
    try:
        r = await http.get(spec.url + "/health")
        return r.status_code == 200 and r.json().get("state") == "idle"
    except (httpx.HTTPError, ValueError):
        return False


class Absent:
    """The absent nodes, when each came back, and how many answers each needs."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.nodes: dict[str, NodeSpec] = {}
        self.rejoined: dict[str, float] = {}  # name -> when it came back (monotonic)
        self.need: dict[str, int] = {}        # name -> idle answers it needs
        self.pending = False                  # a Rejoin waits in the scheduler's inbox

    def mark(self, were: list[NodeSpec], held: set[str], left_out: set[str]) -> None:
        """After a recovery: nodes of `were` that the ring and its spares do not hold
        (`held`), and that the plan did not leave out (those answer), are absent."""
        for s in were:
            if s.name not in held and s.name not in left_out:
                self.nodes[s.name] = s
        for name in held:
            self.nodes.pop(name, None)
        if self.nodes:
            log.warning("asking %s every %g s whether they are back", ", ".join(self.nodes),
                        REJOIN_POLL_S)

    def came_back(self, back: list[NodeSpec]) -> None:
        now = time.monotonic()
        for s in back:
            if s.name not in self.nodes:
                self.rejoined[s.name] = now

    def due(self, answers: dict[str, int]) -> list[NodeSpec]:
        """The absent nodes whose idle answers in a row (`answers`) are enough."""
        return [s for name, s in self.nodes.items()
                if answers.get(name, 0) >= self.need.get(name, REJOIN_AFTER)]

    def lost_again(self, lost: set[str], force: bool = False) -> bool:
        """Were all the `lost` nodes taken back within the window (force: they failed as
        they came back)? Each such node must answer twice as often next time."""
        now = time.monotonic()
        again = {n for n in lost if force or now - self.rejoined.get(n, -1e9) < self.window_s}
        for name in sorted(again):
            self.need[name] = min(2 * self.need.get(name, REJOIN_AFTER), REJOIN_MAX_AFTER)
            log.warning("%s failed again soon after it came back; it must answer %d times in a "
                        "row before it is taken back", name, self.need[name])
        return bool(lost) and lost <= again
