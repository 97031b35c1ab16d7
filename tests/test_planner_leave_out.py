"""The planner may leave nodes out (zero layers) when the ring is clearly faster
without them: against brute force, a slow node's per-frame cost, memory, the starter."""
from __future__ import annotations

import itertools
import random

import pytest

from mdi.ring.cluster.nodes_config import local_nodes_config
from mdi.ring.plan.planner import LEAVE_OUT_GAIN, NodeCost, PlanError, plan_layers, step_ms


def brute(n_layer: int, costs: list[NodeCost], lanes):
    """(step_ms, -ring size, sizes with zeros) of the fastest ring that keeps the
    starter, each ring split as the planner does (checked against brute force in
    test_planner); None when none fits."""
    best = None
    for size in range(len(costs), 0, -1):
        for rest in itertools.combinations(range(1, len(costs)), size - 1):
            keep = (0, *rest)
            ring = [costs[i] for i in keep]
            if keep[-1] != len(costs) - 1:
                ring[-1] = ring[-1].as_end()
            try:
                plan = plan_layers(n_layer, ring)
            except PlanError:
                continue
            sizes = [0] * len(costs)
            for i, k in zip(keep, plan.sizes):
                sizes[i] = k
            times = plan.stage_ms
            key = (max(max(times), sum(times) / lanes(keep)), -len(keep), tuple(sizes))
            if best is None or key[:2] < best[:2]:
                best = key
    return best


def random_costs(rng: random.Random, n: int, n_layer: int) -> list[NodeCost]:
    out = []
    for i in range(n):
        block_bytes = rng.randint(1, 5)
        head = rng.randint(0, 4)
        fixed = (rng.randint(0, 4) if i == 0 else 0) + (head if i == n - 1 else 0)
        budget = None if rng.random() < 0.4 else fixed + head + block_bytes * rng.randint(1, n_layer)
        out.append(NodeCost(f"n{i}", float(rng.randint(1, 9)), float(rng.randint(0, 6)),
                            block_bytes, fixed, budget, frame_ms=float(rng.choice([0, 1, 5, 30])),
                            end_ms=float(head) if i < n - 1 else 0.0,
                            end_bytes=head if i < n - 1 else 0))
    return out


@pytest.mark.parametrize("cores", [None, 2])
def test_leaving_out_is_exact_against_brute_force(cores):
    rng = random.Random(22)

    def lanes(keep):
        return len(keep) if cores is None else min(len(keep), cores)

    left = kept = 0
    for _ in range(300):
        n = rng.randint(2, 4)
        n_layer = rng.randint(n, 7)
        costs = random_costs(rng, n, n_layer)
        try:
            every = plan_layers(n_layer, costs)
        except PlanError:
            continue  # refused as before (test_planner)
        with_ms = step_ms(every, lanes(range(n)))
        best = brute(n_layer, costs, lanes)
        plan = plan_layers(n_layer, costs, leave_out=True, lanes=lanes)
        if best[0] <= LEAVE_OUT_GAIN * with_ms:
            assert [x.name for x in plan.left_out] == [
                c.name for c, k in zip(costs, best[2]) if k == 0]
            assert all(x.with_ms == with_ms and x.without_ms == best[0] for x in plan.left_out)
            assert plan.sizes == [k for k in best[2] if k]
            assert step_ms(plan, lanes([i for i, k in enumerate(best[2]) if k])) == best[0]
            left += 1
        else:
            assert plan.left_out == [] and plan.sizes == every.sizes
            kept += 1
        assert all(c.fits(s.n_blocks) for c, s in zip(plan.costs, plan.shards))
    assert left >= 30 and kept >= 30


def _bundled(slow_frame: float, slow_block: float) -> list[NodeCost]:
    """The bundled model's shape: 6 layers, the finisher capped."""
    return [NodeCost("starter", 0.3, 0.1, frame_ms=0.5, end_ms=0.2),
            NodeCost("intermediate[0]", 0.3, frame_ms=0.5, end_ms=0.2),
            NodeCost("finisher", slow_block, 0.2 / 0.3, frame_ms=slow_frame)]


def test_a_slow_node_with_a_high_frame_cost_is_left_out():
    plan = plan_layers(6, _bundled(slow_frame=0.5 / 0.3, slow_block=0.3 / 0.3), leave_out=True)
    assert plan.sizes == [3, 3]
    assert [c.name for c in plan.costs] == ["starter", "intermediate[0]"]
    # the intermediate ends the ring now: it carries the head
    assert plan.stage_ms == pytest.approx([0.5 + 0.1 + 0.9, 0.5 + 0.9 + 0.2])
    (out,) = plan.left_out
    assert out.name == "finisher" and out.without_ms == pytest.approx(1.6)
    assert out.with_ms == pytest.approx(0.5 / 0.3 + 1.0 + 0.2 / 0.3)  # one layer, the least
    d = plan.to_dicts()
    assert [x["node"] for x in d] == ["starter", "intermediate[0]", "finisher"]
    assert d[2]["left_out"] is True and d[2]["layers"] is None
    assert d[2]["step_ms_without"] == 1.6 and "without it" in d[2]["reason"]
    assert "finisher         left out: the ring completes a step every ~1.60 ms" in plan.describe()
    # without leave_out: every node keeps a layer, as before
    assert plan_layers(6, _bundled(0.5 / 0.3, 1.0)).sizes == [2, 3, 1]


def test_a_fast_node_is_kept():
    costs = _bundled(slow_frame=0.5, slow_block=0.3)
    plan = plan_layers(6, costs, leave_out=True)
    assert plan.left_out == [] and len(plan.sizes) == 3
    # slower blocks alone (a cheap frame) give it fewer layers, not none
    plan = plan_layers(6, _bundled(slow_frame=0.5, slow_block=0.6), leave_out=True)
    assert plan.left_out == [] and plan.sizes[-1] >= 1


def test_a_gain_under_the_threshold_keeps_every_node():
    # the finisher's frame costs just enough that the ring without it is faster, but
    # by less than 1 - LEAVE_OUT_GAIN: estimates are not that precise
    costs = [NodeCost("starter", 1.0, frame_ms=1.0), NodeCost("finisher", 1.0, frame_ms=2.2)]
    plan = plan_layers(2, costs, leave_out=True)  # (1, 1): 2.0 and 3.2; alone: 3.0
    assert plan.left_out == [] and plan.sizes == [1, 1]
    costs = [NodeCost("starter", 1.0, frame_ms=1.0), NodeCost("finisher", 1.0, frame_ms=3.5)]
    plan = plan_layers(2, costs, leave_out=True)  # 4.5 with it, 3.0 alone
    assert plan.sizes == [2] and [x.name for x in plan.left_out] == ["finisher"]


def test_memory_keeps_a_slow_node_the_others_cannot_do_without():
    slow = _bundled(slow_frame=5.0, slow_block=1.0)
    # the others hold 2 layers each: the finisher must take two
    capped = [NodeCost(c.name, c.block_ms, c.extra_ms, 10, 0, 25, c.frame_ms, c.end_ms)
              if i < 2 else c for i, c in enumerate(slow)]
    plan = plan_layers(6, capped, leave_out=True)
    assert plan.left_out == [] and plan.sizes == [2, 2, 2]
    # neither the starter nor the intermediate can hold the head: nobody but the
    # finisher ends the ring, and leaving the intermediate out gains nothing
    no_head = [NodeCost("starter", 0.3, 0.1, 1, 0, 10, 0.5, 0.2, end_bytes=100),
               NodeCost("intermediate[0]", 0.3, 0.0, 1, 0, 10, 0.5, 0.2, end_bytes=100), slow[2]]
    plan = plan_layers(6, no_head, leave_out=True)
    assert plan.left_out == [] and len(plan.sizes) == 3 and plan.sizes[-1] == 1


def test_a_slow_middle_node_is_left_out_and_the_finisher_ends_as_given():
    costs = [NodeCost("starter", 0.3, 0.1, frame_ms=0.5),
             NodeCost("intermediate[0]", 1.0, frame_ms=5.0, end_ms=0.2),
             NodeCost("finisher", 0.3, 0.2, frame_ms=0.5)]
    plan = plan_layers(6, costs, leave_out=True)
    assert [c.name for c in plan.costs] == ["starter", "finisher"]
    assert plan.costs[-1] == costs[-1]  # its head was in its extra already
    assert [x.name for x in plan.left_out] == ["intermediate[0]"]


def test_the_starter_is_never_left_out():
    costs = [NodeCost("starter", 1.0, frame_ms=100.0),
             NodeCost("intermediate[0]", 0.1, frame_ms=0.1, end_ms=0.1),
             NodeCost("finisher", 0.1, 0.1, frame_ms=0.1)]
    plan = plan_layers(6, costs, leave_out=True)
    assert plan.costs[0].name == "starter" and plan.sizes[0] == 1
    assert plan.left_out == []
    # the starter alone, when the others are slower still
    costs = [NodeCost("starter", 0.2, frame_ms=0.2),
             NodeCost("intermediate[0]", 1.0, frame_ms=9.0, end_ms=1.0),
             NodeCost("finisher", 1.0, 1.0, frame_ms=9.0)]
    plan = plan_layers(6, costs, leave_out=True)
    assert plan.sizes == [6] and [c.name for c in plan.costs] == ["starter"]
    assert [x.name for x in plan.left_out] == ["intermediate[0]", "finisher"]


def test_nodes_left_out_become_spares_only_where_the_run_has_spares():
    nodes = local_nodes_config(3, list(range(20000, 20006)))
    ring = nodes.leaving_out({"finisher"})
    assert [s.name for s in ring.ring] == ["starter", "intermediate[0]"] and ring.spares == ()
    assert nodes.leaving_out(set()) is nodes
    spared = local_nodes_config(3, list(range(20000, 20008)), n_spares=1)
    ring = spared.leaving_out({"intermediate[0]"})
    assert [s.name for s in ring.ring] == ["starter", "finisher"]
    assert [s.name for s in ring.spares] == ["spare[0]", "intermediate[0]"]
    # a live re-plan keeps the nodes it leaves out as spares, spares or not
    ring = nodes.leaving_out({"finisher"}, keep=True)
    assert [s.name for s in ring.ring] == ["starter", "intermediate[0]"]
    assert [s.name for s in ring.spares] == ["finisher"]


def test_nodes_sharing_cores_leave_a_stage_out():
    # three alike nodes on two cores run two lanes: every lane still crosses three
    # stages, so the ring of two completes a step sooner (4 ms, not 9 / 2)
    costs = [NodeCost("starter", 1.0, frame_ms=1.0, end_ms=0.0),
             NodeCost("intermediate[0]", 1.0, frame_ms=1.0), NodeCost("finisher", 1.0, frame_ms=1.0)]
    plan = plan_layers(6, costs, leave_out=True, lanes=lambda keep: min(len(keep), 2))
    assert plan.sizes == [3, 3] and [x.name for x in plan.left_out] == ["finisher"]
    assert (plan.left_out[0].with_ms, plan.left_out[0].without_ms) == (4.5, 4.0)
    # on machines of their own (a lane per node) all three stay
    assert plan_layers(6, costs, leave_out=True).left_out == []
