"""When the starter re-plans a drifting ring (ring/starter/replan.py): pure, no processes."""
from __future__ import annotations

import math

import pytest

from mdi.ring.plan.partition import Shard
from mdi.ring.plan.planner import NodeCost
from mdi.ring.starter.replan import (Drift, ReplanPolicy, drifted_costs, moved_layers,
                                     predicted_gain)

POLICY = ReplanPolicy(ratio=1.3, hold_steps=20, warmup_steps=10, min_gap_steps=50, min_gain=1.2)
EVEN = [Shard(0, 2, 6), Shard(2, 4, 6), Shard(4, 6, 6)]


def feed(drift: Drift, windows: list[tuple[int, list[float]]]) -> list[int]:
    """The steps seen so far at each window where the drift fired."""
    fired = []
    for steps, times in windows:
        if drift.observe(steps, times):
            fired.append(drift.steps)
    return fired


def test_a_steady_ring_never_fires():
    d = Drift(POLICY, 3)
    assert feed(d, [(5, [0.002, 0.003, 0.004])] * 200) == []
    assert d.predicted == pytest.approx([0.002, 0.003, 0.004])


def test_a_uniform_slowdown_is_no_drift():
    d = Drift(POLICY, 3)
    fired = feed(d, [(5, [0.002, 0.003, 0.004])] * 4 + [(5, [0.006, 0.009, 0.012])] * 100)
    assert fired == []
    assert d.drift == pytest.approx([1.0, 1.0, 1.0])


def test_a_slowed_stage_fires_once_it_held_for_hold_steps_and_not_before_the_gap():
    d = Drift(POLICY, 3)
    # warm-up (10 steps), then stage 2 five times slower from step 10 on
    fired = feed(d, [(5, [0.002, 0.002, 0.002])] * 2 + [(5, [0.002, 0.002, 0.010])] * 20)
    # drifted from step 15 (its first window after the warm-up); held 20 steps at 30,
    # but the first re-plan waits for min_gap_steps (50); then every hold_steps again
    assert fired == [50, 70, 90, 110]
    assert d.drift == pytest.approx([1.0, 1.0, 5.0])


def test_drift_below_the_ratio_or_interrupted_does_not_fire():
    d = Drift(POLICY, 3)
    slow, ok = [0.002, 0.002, 0.0025], [0.002, 0.002, 0.002]   # 1.25x: under 1.3
    assert feed(d, [(5, ok)] * 2 + [(5, slow)] * 100) == []
    d = Drift(POLICY, 3)
    bad = [0.002, 0.002, 0.004]
    # drifted for 15 steps at a time, back to the plan in between: never 20 in a row
    assert feed(d, [(5, ok)] * 12 + ([(5, bad)] * 3 + [(5, ok)]) * 20) == []


def test_a_stage_that_drifts_but_is_not_the_slowest_does_not_fire():
    d = Drift(POLICY, 3)
    # stage 0 gets 1.5x slower but stage 2 (as predicted) stays the slowest
    fired = feed(d, [(5, [0.002, 0.002, 0.010])] * 2 + [(5, [0.003, 0.002, 0.010])] * 50)
    assert fired == []


def test_windows_without_steps_or_with_unknown_times_are_ignored():
    d = Drift(POLICY, 3)
    assert not d.observe(0, [0.001, 0.001, 0.001])
    assert not d.observe(5, [0.001, math.nan, 0.001])
    assert not d.observe(5, [0.001, 0.0, 0.001])
    assert d.steps == 0
    with pytest.raises(ValueError, match="2 stage times for a ring of 3"):
        d.observe(5, [0.001, 0.001])


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        ReplanPolicy(ratio=0.9)
    with pytest.raises(ValueError, match="hold_steps"):
        ReplanPolicy(hold_steps=0)


def test_gain_from_measured_times_moves_blocks_off_the_slowed_stage():
    costs = [NodeCost(n, math.nan) for n in ("starter", "a", "b")]
    scaled = drifted_costs(costs, EVEN, [0.002, 0.002, 0.002], [1.0, 1.0, 5.0])
    assert [c.block_ms for c in scaled] == pytest.approx([1.0, 1.0, 5.0])
    gain, shards = predicted_gain(scaled, EVEN, lanes=3)
    # now: 10 ms on the slowed stage; best: 2 + 3 + 1 blocks -> max(2, 3, 5) = 5 ms (the
    # most balanced, then the smallest counts first)
    assert [s.n_blocks for s in shards] == [2, 3, 1]
    assert gain == pytest.approx(2.0)


def test_gain_from_the_probes_scales_every_part_of_a_stage():
    costs = [NodeCost("starter", 1.0, extra_ms=0.5, frame_ms=0.2),
             NodeCost("a", 1.0, frame_ms=0.2, end_ms=0.4),
             NodeCost("b", 1.0, extra_ms=0.4, frame_ms=0.2)]
    scaled = drifted_costs(costs, EVEN, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert scaled == costs  # no drift: the probes' own costs
    gain, shards = predicted_gain(scaled, EVEN, lanes=3)
    assert gain == pytest.approx(1.0) and shards == EVEN[:1] + shards[1:]  # nothing to gain
    scaled = drifted_costs(costs, EVEN, [1.0, 1.0, 1.0], [1.0, 2.0, 1.0])
    assert (scaled[1].block_ms, scaled[1].frame_ms, scaled[1].end_ms) == (2.0, 0.4, 0.8)
    gain, shards = predicted_gain(scaled, EVEN, lanes=3)
    assert [s.n_blocks for s in shards] == [2, 1, 3] and gain > 1.2


def test_moved_layers_names_runs_of_blocks_and_their_holders():
    old = [("starter", Shard(0, 2, 6)), ("a", Shard(2, 4, 6)), ("b", Shard(4, 6, 6))]
    new = [("starter", Shard(0, 3, 6)), ("a", Shard(3, 5, 6)), ("b", Shard(5, 6, 6))]
    assert moved_layers(old, new) == [{"layers": [2, 3], "from": "a", "to": "starter"},
                                      {"layers": [4, 5], "from": "b", "to": "a"}]
    assert moved_layers(old, old) == []
    gone = [("starter", Shard(0, 3, 6)), ("a", Shard(3, 6, 6))]  # b left out
    assert moved_layers(old, gone) == [{"layers": [2, 3], "from": "a", "to": "starter"},
                                       {"layers": [4, 6], "from": "b", "to": "a"}]


def test_a_window_is_seconds_a_step_per_stage_and_unknown_without_frames():
    from mdi.ring.starter.replan_watch import Sample, window

    a = Sample(10, [10, 20, 30], [0.1, 0.2, 0.3])
    b = Sample(20, [20, 30, 30], [0.2, 0.5, 0.3])
    steps, times = window(a, b)
    assert steps == 10 and times[:2] == pytest.approx([0.01, 0.03]) and math.isnan(times[2])


def _engine(policy: ReplanPolicy):
    from types import SimpleNamespace

    ring = [SimpleNamespace(name=n) for n in ("starter", "intermediate[0]", "finisher")]
    return SimpleNamespace(shards=EVEN, sizes=[1, 1, 1], placement=None,
                           nodes=SimpleNamespace(ring=ring), opts=SimpleNamespace(
                               replan_policy=policy))


def test_decide_replans_only_for_a_predicted_gain():
    from mdi.ring.starter.replan import Replan
    from mdi.ring.starter.replan_watch import decide

    d = Drift(POLICY, 3)
    feed(d, [(5, [0.002, 0.002, 0.002])] * 2 + [(5, [0.002, 0.002, 0.010])] * 10)
    r = decide(_engine(POLICY), d)
    assert isinstance(r, Replan) and r.drift == [1.0, 1.0, 5.0]
    assert r.why.startswith("finisher runs 5.00x slower") and "[2, 3, 1]" in r.why
    assert "2.00x faster than [2, 2, 2]" in r.why
    greedy = ReplanPolicy(ratio=1.3, hold_steps=20, warmup_steps=10, min_gap_steps=50,
                          min_gain=2.5)  # the same drift, but more gain asked
    d = Drift(greedy, 3)
    feed(d, [(5, [0.002, 0.002, 0.002])] * 2 + [(5, [0.002, 0.002, 0.010])] * 10)
    assert decide(_engine(greedy), d) is None


def test_a_replan_whose_ring_did_not_form_counts_as_failed():
    """The watch waits twice as long after each re-plan that went back to the old ring
    (a node that cannot be probed afresh would otherwise pause the ring every few
    hundred steps, and use up the recovery budget)."""
    from types import SimpleNamespace

    from mdi.ring.starter.replan_watch import failed_replans

    formed = SimpleNamespace(recoveries=[{"recovery": "replan"}])
    assert failed_replans(formed, asked=1, failed=0) == 0
    back = SimpleNamespace(recoveries=[{"recovery": "replan"}, {"recovery": "reprefill"}])
    assert failed_replans(back, asked=2, failed=0) == 1
    assert failed_replans(back, asked=2, failed=1) == 1   # counted once
    lost = SimpleNamespace(recoveries=[{"recovery": "reprefill"}])  # a node failure, no ask
    assert failed_replans(lost, asked=0, failed=0) == 0
