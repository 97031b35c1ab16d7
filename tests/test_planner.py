"""The planner against brute force: exact optimum, memory respected, ties fixed."""
from __future__ import annotations

import itertools
import random

import pytest

from mdi.ring.plan.partition import even_split
from mdi.ring.plan.planner import NodeCost, PlanError, plan_layers, plan_memory


def compositions(n: int, parts: int):
    """Every way to write n as `parts` positive integers, in lexicographic order."""
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


def brute(n_layer: int, costs: list[NodeCost]):
    """(bottleneck, total, sizes) of the best feasible split, same tie rule; None if none."""
    best = None
    for sizes in compositions(n_layer, len(costs)):
        if any(c.budget_bytes is not None and c.bytes_for(k) > c.budget_bytes
               for c, k in zip(costs, sizes)):
            continue
        times = [c.time_ms(k) for c, k in zip(costs, sizes)]
        key = (max(times), sum(t * t for t in times), sizes)
        if best is None or key < best:
            best = key
    return best


def random_costs(rng: random.Random, n_nodes: int, n_layer: int) -> list[NodeCost]:
    out = []
    for i in range(n_nodes):
        block_bytes = rng.randint(1, 5)
        fixed = rng.randint(0, 4) if i in (0, n_nodes - 1) else 0
        budget = None if rng.random() < 0.3 else fixed + block_bytes * rng.randint(0, n_layer)
        out.append(NodeCost(f"n{i}", block_ms=float(rng.randint(1, 9)),  # whole numbers: exact sums
                            extra_ms=float(rng.randint(0, 12)) if i in (0, n_nodes - 1) else 0.0,
                            block_bytes=block_bytes, fixed_bytes=fixed, budget_bytes=budget))
    return out


def test_optimal_against_brute_force():
    rng = random.Random(12)
    checked = refused = 0
    for _ in range(400):
        n_nodes = rng.randint(1, 5)
        n_layer = rng.randint(n_nodes, 11)
        costs = random_costs(rng, n_nodes, n_layer)
        want = brute(n_layer, costs)
        if want is None:
            with pytest.raises(PlanError, match="does not fit"):
                plan_layers(n_layer, costs)
            refused += 1
            continue
        plan = plan_layers(n_layer, costs)
        assert plan.shards[0].start == 0 and plan.shards[-1].stop == n_layer
        assert (plan.bottleneck_ms, sum(t * t for t in plan.stage_ms), tuple(plan.sizes)) == want
        checked += 1
    assert checked >= 200 and refused >= 20


def test_real_valued_costs_reach_the_brute_force_bottleneck():
    rng = random.Random(7)
    for _ in range(200):
        n_nodes = rng.randint(2, 4)
        n_layer = rng.randint(n_nodes, 10)
        costs = [NodeCost(f"n{i}", rng.uniform(0.1, 3.0), rng.uniform(0, 4)) for i in range(n_nodes)]
        plan = plan_layers(n_layer, costs)
        assert plan.bottleneck_ms == pytest.approx(brute(n_layer, costs)[0], rel=1e-12)


def test_slow_node_gets_fewer_layers():
    # the bundled model's shape: 6 layers; the finisher at 0.3 of a core
    costs = [NodeCost("starter", 1.0), NodeCost("intermediate[0]", 1.0),
             NodeCost("finisher", 1 / 0.3)]
    plan = plan_layers(6, costs)
    assert plan.sizes == [2, 3, 1]  # ties: fewer on the starter
    assert plan.bottleneck_ms == pytest.approx(1 / 0.3)  # even (2, 2, 2) would be 6.67


def test_memory_cap_takes_layers_away():
    costs = [NodeCost("starter", 1.0, block_bytes=10), NodeCost("intermediate[0]", 1.0, block_bytes=10,
                                                                 budget_bytes=15),
             NodeCost("finisher", 1.0, block_bytes=10)]
    assert plan_layers(6, costs).sizes == [2, 1, 3]


def test_equal_nodes_tie_is_deterministic():
    costs = [NodeCost(f"n{i}", 2.0) for i in range(3)]
    # bottleneck 4 ms with (2, 2, 2) or ... only (2,2,2) has no stage above 2 blocks
    assert plan_layers(6, costs).sizes == [2, 2, 2]
    # 7 layers: (2, 2, 3), (2, 3, 2), (3, 2, 2) are the most balanced; the smallest wins
    assert plan_layers(7, costs).sizes == [2, 2, 3]
    assert plan_layers(7, costs).sizes == plan_layers(7, list(costs)).sizes


def test_head_cost_moves_layers_off_the_finisher():
    costs = [NodeCost("starter", 1.0, 0.1), NodeCost("finisher", 1.0, 3.0)]
    assert plan_layers(8, costs).sizes == [5, 3]  # 5.1 and 6.0 ms; even (4, 4) has 7.0


def test_infeasible_refused_with_the_numbers():
    mib = 2**20
    costs = [NodeCost("starter", 1.0, block_bytes=10 * mib, fixed_bytes=5 * mib, budget_bytes=30 * mib),
             NodeCost("finisher", 1.0, block_bytes=10 * mib, fixed_bytes=5 * mib, budget_bytes=20 * mib)]
    with pytest.raises(PlanError) as e:
        plan_layers(6, costs)
    msg = str(e.value)
    assert "at most 3 of the model's 6 layers" in msg
    assert "starter: budget 30.0 MiB, holds at most 2 layer(s)" in msg
    assert "finisher: budget 20.0 MiB, holds at most 1 layer(s)" in msg
    assert "needs about 70.0 MiB" in msg


def test_node_that_holds_nothing_is_named():
    costs = [NodeCost("starter", 1.0, block_bytes=10), NodeCost("finisher", 1.0, block_bytes=10,
                                                                 fixed_bytes=50, budget_bytes=40)]
    with pytest.raises(PlanError, match="finisher cannot hold even one layer"):
        plan_layers(4, costs)


def test_more_nodes_than_layers_refused():
    with pytest.raises(PlanError, match="every node needs at least one layer"):
        plan_layers(2, [NodeCost(f"n{i}", 1.0) for i in range(3)])


def test_plan_memory_checks_a_given_split():
    costs = [NodeCost("starter", 1.0, block_bytes=10, budget_bytes=100),
             NodeCost("finisher", 1.0, block_bytes=10, budget_bytes=25)]
    assert plan_memory(4, even_split(4, 2), costs).sizes == [2, 2]
    with pytest.raises(PlanError, match=r"finisher would hold layers \[1, 4\)"):
        plan_memory(4, [even_split(4, 2)[0].__class__(0, 1, 4), even_split(4, 2)[0].__class__(1, 4, 4)],
                    costs)


def test_plan_dicts_and_description():
    plan = plan_layers(6, [NodeCost("starter", 1.0, 0.5, block_bytes=2**20, budget_bytes=2**30),
                           NodeCost("finisher", 2.0, 1.0, block_bytes=2**20)])
    d = plan.to_dicts()
    assert [x["layers"] for x in d] == [[0, 4], [4, 6]]
    assert [x["ms_per_step"] for x in d] == [4.5, 5.0]
    assert d[0]["memory_bytes"] == 4 * 2**20 and d[1]["budget_bytes"] is None
    text = plan.describe()
    assert "starter" in text and "layers [  0,   4)" in text and "slowest stage ~5.00 ms/step" in text


def test_non_bottleneck_stages_are_balanced():
    # GPT-2 small measured here: the capped finisher's block + head sets the pace
    # (59 ms); the other 11 blocks are spread evenly, not piled on the faster node
    costs = [NodeCost("starter", 6.2, 0.1), NodeCost("intermediate[0]", 6.6),
             NodeCost("finisher", 20.0, 39.0)]
    plan = plan_layers(12, costs)
    assert plan.sizes == [6, 5, 1]
    assert plan.bottleneck_ms == pytest.approx(59.0)
