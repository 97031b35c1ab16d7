"""Live re-planning on a real ring of processes on loopback (ring/starter/replan.py):
a policy with no threshold (ratio 1: every window counts as drifted, no gain asked)
makes the starter re-plan mid-run (moving layers, or on fresh probes); the greedy
tokens equal a run with --replan off, and the result (what `mdi run --json`
prints) records every re-plan and the hops of every ring the run used."""
from __future__ import annotations

from pathlib import Path

import pytest

from mdi.checkpoint import load_model
from mdi.generate import SamplingConfig
from mdi.ring.cluster.local_cluster import LocalCluster
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import RunOptions
from mdi.ring.starter.replan import ReplanPolicy

pytestmark = pytest.mark.slow
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"
GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=1)
FORCED = ReplanPolicy(ratio=1.0, hold_steps=1, warmup_steps=1, min_gap_steps=60, min_gain=0.0,
                      poll_s=0.02)


@pytest.mark.parametrize("recovery, how", [("reprefill", "moved"), ("replay", "auto")])
def test_a_forced_replan_keeps_the_greedy_tokens_and_is_reported(recovery, how):
    """Layers move with their caches (the ring's nodes kept); with --recovery replay
    they cannot (its logs), and the ring is formed anew on fresh probes."""
    tok = load_model(str(BUNDLED)).tokenizer
    prompts = [tok.encode(t) for t in ("ROMEO:\nBut soft", "KING", "JULIET:\nO Romeo")]
    with LocalCluster(3, threads=1, node_timeout=5.0) as c:
        def run(replan: bool):
            opts = RunOptions(timeout=5.0, batch_invariant=True, replan=replan,
                              replan_policy=FORCED, recovery=recovery)
            # 100 tokens: twice the steps the first re-plan waits for (min_gap_steps), so
            # that a slow watch on a loaded machine still sees it
            return Starter(c.nodes, c.token, str(BUNDLED), opts).run(prompts, 100, GREEDY)

        fixed = run(False)
        moved = run(True)
    assert moved.tokens == fixed.tokens
    assert not fixed.recoveries and {h.ring for h in fixed.hops} == {0}
    out = moved.to_json()
    replans = [r for r in out["recoveries"] if r["recovery"] == "replan"]
    assert replans and len(replans) == len(out["recoveries"])
    sizes = [3] + [len(r["ring"]) for r in replans]  # a re-plan may leave a node out
    for r, size in zip(replans, sizes):  # each one's drift: a stage of the ring it left
        assert "slower than the plan predicted" in r["why"]
        # layers move, except where the new split leaves a node out (formed anew)
        assert r["plan"]["partition"] == how or (how == "moved" and len(r["ring"]) < size)
        assert r["paused_s"] is None or r["paused_s"] >= r["recovery_s"]
        assert isinstance(r["moved"], list) and len(r["drift"]) == size
    rings = sorted({h["ring"] for h in out["hops"]})
    assert rings == list(range(len(replans) + 1))  # every ring the run used
    for ring, size in zip(rings, sizes):  # each ring's hops: the starter's and every node's
        assert len([h for h in out["hops"] if h["ring"] == ring]) == size
