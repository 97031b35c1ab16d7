"""Live re-planning (`--replan on`): when a stage drifts from the plan, plan again.

Plans are made once, from probes, before a run. A device that slows down mid-run
(thermal throttling, a neighbour process, a phone on battery) would otherwise
drag the ring until the run ends. The ring engine polls the nodes' /status
"stats" (compute and overhead seconds, frames) every `poll_s`, and takes its own
first stage's step times (engine/step_times.py), as per-stage seconds per step
over each poll's window; `Drift` decides when to re-plan:

- *what the plan predicted*: each stage's time per step over the first
  `warmup_steps` steps of the ring (measured, not the probes' figures: the
  probes time a stage alone, the ring runs it beside the others, and the two
  differ by a per-stage factor that would look like drift);
- *drift*: the slowest stage's time now, over its prediction, against the stage
  that drifted least (a uniform slowdown, every stage alike, is no reason to move
  layers); it fires when that stays >= `ratio` for `hold_steps` steps in a row,
  no sooner than `min_gap_steps` after the ring formed (a new ring, after a
  re-plan or a recovery, starts a new Drift: no flapping);
- *gain*: the plan's costs scaled by each stage's drift (the probes' figures
  when the plan had them, else the measured times spread over the stage's
  blocks) are planned again; only when the best plan predicts the ring at least
  `min_gain` times faster than the current split does the engine pause.

The gain is planned from the measured times (`measured`: no probe), and the
split it found travels in the `Replan` that goes into the scheduler's inbox. The
engine takes it at a step boundary through the recovery path (ring_engine.py):
- *moved* (layer_shift.py): every node keeps its run, only the boundary layers
  change node, each with its weights and its KV rows for the live sequences
  (docs/wire.md, "Moving layers"); the sequences go on from the positions every
  stage holds, no probe and no re-prefill;
- *rebuilt*, when layers cannot move (a compiled step, an int8 cache,
  `--recovery replay`) or a move fails: the run is released, every live node
  is probed again (no cached probe), the ring is planned over them
  (`--partition auto`: a node may be left out) and formed anew, and every
  sequence resumes by prefilling its tokens so far.
Either way a greedy sequence's text is the undisturbed one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from ...engine.link import Reform
from ..plan.partition import Shard
from ..plan.planner import NodeCost, plan_layers, plan_memory, step_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplanPolicy:
    """When a drifting ring is planned again (see the module doc)."""
    ratio: float = 1.3         # the slowest stage this much slower than predicted ...
    hold_steps: int = 64       # ... for this many steps in a row
    warmup_steps: int = 32     # steps measured for the prediction once the ring formed
    min_gap_steps: int = 128   # no re-plan sooner after a ring formed
    min_gain: float = 1.2      # the new plan must predict the ring this much faster
    poll_s: float = 0.5        # how often the engine reads the nodes' statistics

    def __post_init__(self) -> None:
        if self.ratio < 1.0 or self.min_gain < 0 or self.poll_s <= 0:
            raise ValueError(f"replan: ratio must be >= 1, min_gain >= 0 and poll_s > 0, got "
                             f"{self.ratio}, {self.min_gain}, {self.poll_s}")
        if min(self.hold_steps, self.warmup_steps, self.min_gap_steps) < 1:
            raise ValueError("replan: hold_steps, warmup_steps and min_gap_steps must be >= 1")


class Replan(Reform):
    """Not a failure: the ring drifted from its plan; raised in the scheduler so that
    the ring is planned and formed again through the recovery path."""

    def __init__(self, why: str, drift: list[float], shards: list[Shard] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.drift = drift
        self.shards = shards  # the split planned from the measured times (layer_shift.py)


class Drift:
    """Per-stage times of one ring, window by window (pure: no clock, no I/O)."""

    def __init__(self, policy: ReplanPolicy, n_stages: int) -> None:
        self.policy = policy
        self.n = n_stages
        self.steps = 0                      # steps seen since the ring formed
        self.held = 0                       # steps in a row with the slowest stage drifted
        self._sum = [0.0] * n_stages        # warm-up: step-weighted sums of the times
        self._warm = 0
        self.predicted: list[float] | None = None
        self.ratios: list[float] = []       # the last window's time / predicted, per stage

    def observe(self, steps: int, times: list[float]) -> bool:
        """A window of `steps` steps in which stage i took times[i] s a step; True when
        the ring should be re-planned (then again only after `hold_steps` more)."""
        if len(times) != self.n:
            raise ValueError(f"{len(times)} stage times for a ring of {self.n} stages")
        if steps <= 0 or not all(math.isfinite(t) and t > 0 for t in times):
            return False
        self.steps += steps
        p = self.policy
        if self.predicted is None:
            self._sum = [s + steps * t for s, t in zip(self._sum, times)]
            self._warm += steps
            if self._warm >= p.warmup_steps:
                self.predicted = [s / self._warm for s in self._sum]
                log.debug("stage times predicted: %s ms", [round(x * 1e3, 3) for x in self.predicted])
            return False
        self.ratios = [t / q for t, q in zip(times, self.predicted)]
        slowest = max(range(self.n), key=lambda i: times[i])
        drifted = self.ratios[slowest] / min(self.ratios) >= p.ratio
        self.held = self.held + steps if drifted else 0
        if self.held >= p.hold_steps and self.steps >= p.min_gap_steps:
            self.held = 0
            return True
        return False

    @property
    def drift(self) -> list[float]:
        """Each stage's drift against the stage that drifted least (1: as predicted)."""
        if not self.ratios:
            return [1.0] * self.n
        low = min(self.ratios)
        return [r / low for r in self.ratios]


def drifted_costs(costs: list[NodeCost], shards: list[Shard], predicted: list[float],
                  drift: list[float], measured: bool = False) -> list[NodeCost]:
    """The ring's costs with each stage slowed by its drift. The probes' figures when
    every one is known (and not `measured`); else the measured prediction spread over
    the stage's blocks (no per-frame cost: it cannot be told apart from the blocks'
    there). Memory figures stay the probes'."""
    known = not measured and all(math.isfinite(c.block_ms) and math.isfinite(c.frame_ms)
                                 for c in costs)
    out = []
    for c, s, q, f in zip(costs, shards, predicted, drift):
        if known:
            out.append(replace(c, block_ms=c.block_ms * f, frame_ms=c.frame_ms * f,
                               extra_ms=c.extra_ms * f, end_ms=c.end_ms * f))
        else:
            out.append(replace(c, block_ms=q * 1e3 * f / max(1, s.n_blocks), frame_ms=0.0,
                               extra_ms=0.0, end_ms=0.0))
    return out


def predicted_gain(costs: list[NodeCost], shards: list[Shard], lanes: int
                   ) -> tuple[float, list[Shard]]:
    """How many times faster the best split of `costs` (every node kept) would run
    than `shards` (step_ms), and that split."""
    n_layer = shards[-1].n_layer
    now = step_ms(plan_memory(n_layer, shards, costs), lanes)
    best = plan_layers(n_layer, costs)
    return now / step_ms(best, lanes), best.shards


def moved_layers(old: list[tuple[str, Shard]], new: list[tuple[str, Shard]]) -> list[dict]:
    """Which blocks changed node between two rings ((node, shard) in ring order): runs
    of consecutive blocks with the same old and new holder."""
    def holder(ring: list[tuple[str, Shard]]) -> dict[int, str]:
        return {b: name for name, s in ring for b in range(s.start, s.stop)}

    was, now = holder(old), holder(new)
    out: list[dict] = []
    for b in sorted(now):
        src, dst = was.get(b), now[b]
        if src == dst:
            continue
        if out and out[-1]["from"] == src and out[-1]["to"] == dst and out[-1]["layers"][1] == b:
            out[-1]["layers"][1] = b + 1
        else:
            out.append({"layers": [b, b + 1], "from": src, "to": dst})
    return out
