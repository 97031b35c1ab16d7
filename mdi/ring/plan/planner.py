"""Speed- and memory-aware partitioning: pure functions, exact.

The ring runs as a pipeline, so its throughput is set by its slowest stage.
Node i holding k blocks takes `frame_ms + extra_ms + k * block_ms` per decode
step (frame: the fixed cost of a frame on that node, whatever its layers:
reading, the step's bookkeeping, sending; extra: the starter's embeddings, the
finisher's final norm, head and sampling) and needs `fixed_bytes + k *
block_bytes` of memory (block_bytes: one block's weights plus its KV cache for
every sample of the run, at the run's dtype). `plan_layers` picks the
contiguous ranges, in the fixed ring order (starter first, finisher last),
that minimise the slowest stage's time subject to every node's memory budget.

Every node gets at least one block, unless `leave_out`: then nodes other than
the starter may get none, when the ring is clearly faster without them. Every
lane goes through every stage in turn, so with L lanes in flight the ring
completes a lane's step every max(slowest stage, sum of stages / L) ms
(`step_ms`; L is below the number of stages when nodes share cores). Every
ring that keeps the starter is planned as below and the fastest is taken
when it beats the ring of every node by LEAVE_OUT_GAIN. A node left out is no
part of the ring (the starter keeps it as a spare when the run has spares);
the node before it may then end the ring and carry the head (`end_ms`,
`end_bytes`). This is how a slow device stops setting the pace: its
per-frame cost alone can exceed a fast node's whole stage (issue 22).

Exactness: a dynamic programme over (node, blocks placed so far) finds the
least bottleneck T*; a second one, over plans whose every stage takes at most
T*, picks the most balanced (least sum of squared stage times), and among
those the lexicographically smallest list of block counts, so ties are broken
the same way every time. Balance matters because the times are estimates: a
plan that fills the other nodes up to T* (as "least total time" would) turns
any timing error into a new bottleneck.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

from .partition import PartitionError, Shard, shards_from_sizes

INF = math.inf
LEAVE_OUT_GAIN = 0.9   # leave nodes out only when the ring gets at least 10% faster
MAX_LEAVE_OUT_NODES = 12  # rings tried: every subset keeping the starter (2^11 at most)


class PlanError(PartitionError):
    """No split fits the nodes' memory (or the ring has more nodes than blocks)."""


@dataclass(frozen=True)
class NodeCost:
    """What one node costs per decode step and per block, and what it can hold."""
    name: str
    block_ms: float                  # one block, one decode step of the run's group size
    extra_ms: float = 0.0            # embeddings (starter), norm + head + sampling (finisher)
    block_bytes: int = 0             # one block's weights + its KV cache at the run's shape
    fixed_bytes: int = 0             # embeddings (starter) or head (finisher) weights
    budget_bytes: int | None = None  # None: no limit known
    frame_ms: float = 0.0            # a frame's fixed cost on this node, whatever its blocks
    end_ms: float = 0.0              # head + sampling, should it end the ring early (leave_out)
    end_bytes: int = 0               # the head's weights, likewise

    def time_ms(self, k: int) -> float:
        return self.frame_ms + self.extra_ms + k * self.block_ms

    def bytes_for(self, k: int) -> int:
        return self.fixed_bytes + k * self.block_bytes

    def fits(self, k: int) -> bool:
        return self.budget_bytes is None or self.bytes_for(k) <= self.budget_bytes

    def as_end(self) -> "NodeCost":
        """This node's cost when it ends a ring it was not given to end."""
        return replace(self, extra_ms=self.extra_ms + self.end_ms,
                       fixed_bytes=self.fixed_bytes + self.end_bytes, end_ms=0.0, end_bytes=0)

    def max_blocks(self, n_layer: int) -> int:
        """The most blocks that fit this node's budget (at most n_layer)."""
        if self.budget_bytes is None:
            return n_layer
        room = self.budget_bytes - self.fixed_bytes
        if room < 0:
            return 0
        if self.block_bytes <= 0:
            return n_layer
        return min(n_layer, room // self.block_bytes)


@dataclass(frozen=True)
class LeftOut:
    """A node the plan gives no layers, and how often the ring would complete a
    lane's step (step_ms) with every node and without the nodes left out."""
    name: str
    with_ms: float      # the best plan that keeps every node
    without_ms: float   # the plan chosen

    def reason(self) -> str:
        return (f"the ring completes a step every ~{self.without_ms:.2f} ms without it, "
                f"~{self.with_ms:.2f} ms at best with it")

    def to_dict(self) -> dict:
        return {"node": self.name, "layers": None, "left_out": True, "reason": self.reason(),
                "step_ms_with": round(self.with_ms, 3),
                "step_ms_without": round(self.without_ms, 3)}


@dataclass(frozen=True)
class Plan:
    shards: list[Shard]
    costs: list[NodeCost]                                  # of the nodes in the ring, in order
    left_out: list[LeftOut] = field(default_factory=list)  # nodes given no layers

    @property
    def sizes(self) -> list[int]:
        return [s.n_blocks for s in self.shards]

    @property
    def stage_ms(self) -> list[float]:
        return [c.time_ms(s.n_blocks) for c, s in zip(self.costs, self.shards)]

    @property
    def bottleneck_ms(self) -> float:
        times = self.stage_ms
        return math.nan if any(math.isnan(t) for t in times) else max(times)

    def to_dicts(self) -> list[dict]:
        out = []
        for c, s, ms in zip(self.costs, self.shards, self.stage_ms):
            timed = not math.isnan(ms)  # even and manual splits are not timed
            d = {"node": c.name, "layers": [s.start, s.stop],
                 "ms_per_step": round(ms, 3) if timed else None,
                 "block_ms": round(c.block_ms, 4) if timed else None,
                 "memory_bytes": c.bytes_for(s.n_blocks),
                 "budget_bytes": c.budget_bytes}
            if timed and c.frame_ms:
                d["frame_ms"] = round(c.frame_ms, 4)
            out.append(d)
        return out + [x.to_dict() for x in self.left_out]

    def describe(self) -> str:
        """A few lines for the log: node, layers, estimated ms per step, memory."""
        lines = []
        for d in self.to_dicts():
            if d.get("left_out"):
                lines.append(f"  {d['node']:<16} left out: {d['reason']}")
                continue
            budget = "no limit" if d["budget_bytes"] is None else _mb(d["budget_bytes"])
            ms = "not timed" if d["ms_per_step"] is None else f"~{d['ms_per_step']:.2f} ms/step"
            lines.append(f"  {d['node']:<16} layers [{d['layers'][0]:>3}, {d['layers'][1]:>3})  "
                         f"{ms}  memory {_mb(d['memory_bytes'])} of {budget}")
        if not math.isnan(self.bottleneck_ms):
            lines.append(f"  slowest stage ~{self.bottleneck_ms:.2f} ms/step")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def plan_layers(n_layer: int, costs: Sequence[NodeCost], leave_out: bool = False,
                lanes: Callable[[Sequence[int]], int] | None = None) -> Plan:
    """The exact min-bottleneck contiguous split of n_layer blocks over `costs`
    (ring order); PlanError when none fits. leave_out: nodes after the starter
    may get no layers when the ring is clearly faster without them (see the
    module doc); lanes: the lanes a ring of the nodes at these indices would run
    (None: one per node, a full pipeline)."""
    n = len(costs)
    if n == 0:
        raise PlanError("a plan needs at least one node")
    if n_layer < n:
        raise PlanError(f"cannot split {n_layer} layers over {n} nodes: every node needs at "
                        "least one layer")
    caps = [c.max_blocks(n_layer) for c in costs]
    _check_fits(n_layer, costs, caps)
    every = _split(n_layer, list(costs))
    assert every is not None, "feasibility was checked"
    if not leave_out or n == 1 or n > MAX_LEAVE_OUT_NODES:
        return every
    lanes = lanes or len
    with_ms = step_ms(every, lanes(range(n)))
    best, best_key = every, (with_ms, -n)
    for keep in _subsets(n):
        plan = _split(n_layer, _ring_costs(costs, keep))
        if plan is not None:
            key = (step_ms(plan, lanes(keep)), -len(keep))
            if key < best_key:
                best, best_key = plan, key
    if best is every or best_key[0] > LEAVE_OUT_GAIN * with_ms:
        return every
    kept = {c.name for c in best.costs}
    return replace(best, left_out=[LeftOut(c.name, with_ms, best_key[0])
                                   for c in costs if c.name not in kept])


def step_ms(plan: Plan, lanes: int) -> float:
    """How often the ring completes a lane's step: every lane goes through every
    stage in turn, so with `lanes` lanes in flight the ring is bound by its
    slowest stage or, when there are fewer lanes than stages (nodes sharing
    cores), by the stages' sum over the lanes."""
    times = plan.stage_ms
    return max(max(times), sum(times) / max(1, lanes))


def _subsets(n: int) -> Iterator[tuple[int, ...]]:
    """The indices of every ring that keeps the starter and leaves out at least one
    other node, larger rings first."""
    for size in range(n - 1, 0, -1):
        for rest in itertools.combinations(range(1, n), size - 1):
            yield (0, *rest)


def _ring_costs(costs: Sequence[NodeCost], keep: Sequence[int]) -> list[NodeCost]:
    """The costs of a ring of the nodes at `keep`: the last of them carries the head."""
    ring = [costs[i] for i in keep]
    if keep[-1] != len(costs) - 1:
        ring[-1] = ring[-1].as_end()
    return ring


def _split(n_layer: int, costs: list[NodeCost]) -> Plan | None:
    """The min-bottleneck, most balanced split over every node of `costs`; None when
    it does not fit their memory."""
    caps = [c.max_blocks(n_layer) for c in costs]
    if n_layer < len(costs) or sum(caps) < n_layer or min(caps) < 1:
        return None
    best = _min_bottleneck(n_layer, costs)
    return Plan(shards_from_sizes(_most_balanced_under(n_layer, costs, best)), costs)


def _check_fits(n_layer: int, costs: Sequence[NodeCost], caps: list[int]) -> None:
    short = [c for c, k in zip(costs, caps) if k < 1]
    if not short and sum(caps) >= n_layer:
        return
    block = max((c.block_bytes for c in costs), default=0)
    lines = [f"{c.name}: budget {_fmt_budget(c.budget_bytes)}, holds at most {k} layer(s) "
             f"({_mb(c.fixed_bytes)} fixed + {_mb(c.block_bytes)} per layer)"
             for c, k in zip(costs, caps)]
    first, last = costs[0], costs[-1]
    need = first.fixed_bytes + (last.fixed_bytes if len(costs) > 1 else 0) + n_layer * block
    why = (f"{', '.join(c.name for c in short)} cannot hold even one layer" if short else
           f"the nodes hold at most {sum(caps)} of the model's {n_layer} layers")
    raise PlanError(f"the model does not fit these nodes' memory: {why}. The model needs about "
                    f"{_mb(need)} ({n_layer} layers of {_mb(block)} with their KV cache, plus "
                    f"embeddings and head); " + "; ".join(lines))


def _fmt_budget(b: int | None) -> str:
    return "unlimited" if b is None else _mb(b)


def _min_bottleneck(n_layer: int, costs: Sequence[NodeCost]) -> float:
    """dp[j]: least bottleneck placing the first j blocks on the nodes so far."""
    n = len(costs)
    dp = [INF] * (n_layer + 1)
    dp[0] = 0.0
    for i, c in enumerate(costs):
        new = [INF] * (n_layer + 1)
        rest = n - 1 - i  # nodes after this one, each needing a block
        cap = c.max_blocks(n_layer)
        for j in range(i + 1, n_layer - rest + 1):
            for k in range(1, min(cap, j - i) + 1):
                prev = dp[j - k]
                if prev == INF:
                    continue
                v = max(prev, c.time_ms(k))
                if v < new[j]:
                    new[j] = v
        dp = new
    assert dp[n_layer] < INF, "feasibility was checked"
    return dp[n_layer]


def _most_balanced_under(n_layer: int, costs: Sequence[NodeCost], limit: float) -> list[int]:
    """Among splits whose every stage takes <= limit: least sum of squared stage
    times, then the lexicographically smallest block counts."""
    n = len(costs)
    # best[j] = (total, sizes) for the first j blocks on the nodes so far
    best: list[tuple[float, tuple[int, ...]] | None] = [None] * (n_layer + 1)
    best[0] = (0.0, ())
    for i, c in enumerate(costs):
        new: list[tuple[float, tuple[int, ...]] | None] = [None] * (n_layer + 1)
        rest = n - 1 - i
        cap = c.max_blocks(n_layer)
        for j in range(i + 1, n_layer - rest + 1):
            for k in range(1, min(cap, j - i) + 1):
                prev = best[j - k]
                t = c.time_ms(k)
                if prev is None or t > limit:
                    continue
                cand = (prev[0] + t * t, prev[1] + (k,))
                if new[j] is None or _better(cand, new[j]):
                    new[j] = cand
        best = new
    assert best[n_layer] is not None, "the bottleneck is reachable"
    return list(best[n_layer][1])


def _better(a: tuple[float, tuple[int, ...]], b: tuple[float, tuple[int, ...]]) -> bool:
    tol = 1e-9 * max(1.0, abs(a[0]), abs(b[0]))  # sums of floats in another order
    if a[0] < b[0] - tol:
        return True
    if a[0] > b[0] + tol:
        return False
    return a[1] < b[1]


def plan_memory(n_layer: int, shards: Sequence[Shard], costs: Sequence[NodeCost]) -> Plan:
    """A given split (even, or the nodes file's `layers`) as a Plan, for printing;
    PlanError when it does not fit a node's budget."""
    plan = Plan(list(shards), list(costs))
    over = [(c, s) for c, s in zip(costs, shards)
            if c.budget_bytes is not None and c.bytes_for(s.n_blocks) > c.budget_bytes]
    if over:
        raise PlanError("the split does not fit: " + "; ".join(
            f"{c.name} would hold layers [{s.start}, {s.stop}) needing "
            f"{_mb(c.bytes_for(s.n_blocks))}, its budget is {_mb(c.budget_bytes)}"  # type: ignore[arg-type]
            for c, s in over))
    return plan
