"""The starter's split: decided from the nodes' reports, printed and in --json, refused
when it cannot fit before any weights move; the text is the same whatever the split."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from cluster_helpers import TOKEN, TEXT, auth, run_cli, start_ring, status
from mdi.checkpoint.format import save_checkpoint
from mdi.model import GPT, GPTConfig
from mdi.ring.plan.capability import Speed, node_capabilities
from mdi.ring.cluster.nodes_config import local_nodes_config
from mdi.ring.plan.placement import Placement, _costs, _differences, compute_units
from mdi.ring.starter.options import lane_count, typical_context
from mdi.ring.plan.capability import StageMemory
from mdi.ring.plan.partition import even_split
from mdi.ring.plan.planner import plan_memory
from mdi.tokenizer import CharTokenizer


# ---- fast ---------------------------------------------------------------------
def _caps(**over) -> dict:
    return {"device_name": "cpu", "cpus": 2.0, "torch_threads": 2, "max_memory_bytes": None,
            "budget_bytes": 10**9, **over}


def test_differences_name_what_differs():
    ring = local_nodes_config(3, list(range(20000, 20006))).ring
    assert _differences(ring, [_caps(), _caps(), _caps()]) == ""
    # fewer threads than CPUs: the threads are what counts
    assert _differences(ring, [_caps(), _caps(cpus=4.0), _caps()]) == ""
    why = _differences(ring, [_caps(), _caps(), _caps(cpus=0.3)])
    assert why == "the nodes differ in CPUs (starter: 2.0, intermediate[0]: 2.0, finisher: 0.3)"
    assert "memory caps" in _differences(ring, [_caps(), _caps(max_memory_bytes=2**31), _caps()])
    # a node from before /capabilities reports nothing: not a difference
    assert _differences(ring, [_caps(), {}, _caps()]) == ""


def test_compute_units_count_shared_cores_once():
    def cpu(host, cores, device="cpu"):
        return {"host_id": host, "cpu_set": cores, "device": device}
    # three processes on one 2-core machine: two can compute at once
    assert compute_units([cpu("a", [0, 1]), cpu("a", [0, 1]), cpu("a", [0, 1])]) == 2
    # pinned to one core each (bench --isolate): one each
    assert compute_units([cpu("a", [0]), cpu("a", [1]), cpu("a", [1])]) == 2
    # separate machines, GPUs, and nodes that do not say where they run count alone
    assert compute_units([cpu("a", [0]), cpu("b", [0]), cpu("c", [0])]) == 3
    assert compute_units([cpu("a", [0]), cpu("a", [0], "cuda:0"), cpu("a", [0], "cuda:1")]) == 3
    assert compute_units([cpu("a", [0, 1]), {}, {}]) == 3
    assert compute_units([cpu("a", [0, 1, 2, 3])] * 3) == 3


def test_lanes_follow_the_cores_unless_asked():
    assert lane_count(3, None, 2) == 2      # 3 nodes sharing 2 cores
    assert lane_count(3, None, 3) == 3
    assert lane_count(3, None, 0) == 3      # unknown: one lane per node
    assert lane_count(3, 3, 2) == 3         # --micro-batches wins
    assert lane_count(2, 1, 2) == 1


def test_blocks_are_timed_halfway_through_the_longest_sequence():
    assert typical_context([[1, 2, 3], [4]], 100) == 53
    assert typical_context([[1]], 1) == 1


def test_node_reports_its_machine_and_cores():
    caps = node_capabilities("cpu")
    assert caps["cpu_set"] and all(isinstance(c, int) for c in caps["cpu_set"])
    assert caps["host_id"] == node_capabilities("cpu")["host_id"]


def test_costs_put_the_extras_on_the_end_nodes():
    ring = local_nodes_config(3, list(range(20000, 20006))).ring
    mem = StageMemory(block_bytes=100, embed_bytes=7, head_bytes=9)
    speeds = [Speed(1.0, 0.5, 0.25), Speed(2.0, 0.5, 0.25), Speed(3.0, 0.5, 0.25)]
    costs = _costs(ring, [_caps(budget_bytes=1000)] * 3, mem, speeds)
    assert [(c.block_ms, c.extra_ms, c.fixed_bytes, c.budget_bytes) for c in costs] == [
        (1.0, 0.5, 7, 1000), (2.0, 0.0, 0, 1000), (3.0, 0.25, 9, 1000)]


def test_untimed_plan_is_valid_json():
    ring = local_nodes_config(2, list(range(20000, 20004))).ring
    costs = _costs(ring, [_caps(), {}], StageMemory(10, 1, 1), None)
    plan = plan_memory(4, even_split(4, 2), costs)
    d = Placement("even", "--partition even", plan.shards, plan).to_json()
    json.dumps(d, allow_nan=False)
    assert d["nodes"][0]["ms_per_step"] is None and d["nodes"][1]["budget_bytes"] is None
    assert "bottleneck_ms" not in d


# ---- real nodes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ring6(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    tok = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=6, n_head=2, n_embd=32)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt6", GPT(config).eval(), tok, {"note": "random, 6 layers"})
    r = start_ring(root, ckpt)
    yield r
    r.stop()


def _starter(ring, *extra):
    return run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path, "--token",
                   TOKEN, "--n-tokens", "6", "--n-samples", "3", "--temperature", "0", "--json",
                   *extra)


@pytest.mark.slow
def test_auto_gives_a_slow_starter_fewer_layers_same_text(ring6, monkeypatch):
    # the starter (this process) reports itself 50x slower than any node
    monkeypatch.setattr("mdi.ring.plan.placement._LOCAL_PROBES.get",
                        lambda *a: (Speed(50.0, 0.0, 0.0), False))
    rc, out, err = _starter(ring6, "--partition", "auto")
    assert rc == 0, err[-3000:]
    auto = json.loads(out)
    plan = auto["plan"]
    assert plan["partition"] == "auto" and plan["reason"] == "--partition auto"
    assert [n["node"] for n in plan["nodes"]] == ["starter", "intermediate[0]", "finisher"]
    assert plan["nodes"][0]["layers"] == [0, 1]  # the least it can hold
    assert plan["nodes"][-1]["layers"][1] == 6
    assert plan["nodes"][0]["ms_per_step"] == pytest.approx(50.0, abs=0.01)
    assert plan["bottleneck_ms"] == max(n["ms_per_step"] for n in plan["nodes"])
    assert all(n["memory_bytes"] > 0 and n["budget_bytes"] > 0 for n in plan["nodes"])
    assert "partition auto (--partition auto):" in err and "slowest stage" in err
    rc, out, err = _starter(ring6, "--partition", "even")
    assert rc == 0, err[-3000:]
    even = json.loads(out)
    assert [n["layers"] for n in even["plan"]["nodes"]] == [[0, 2], [2, 4], [4, 6]]
    assert even["samples"] == auto["samples"]
    # no --partition: these nodes report alike, so even (and nothing is timed)
    rc, out, err = _starter(ring6)
    assert rc == 0, err[-3000:]
    default = json.loads(out)["plan"]
    assert default["partition"] == "even" and default["reason"].startswith("the nodes report the same")
    assert all(n["ms_per_step"] is None for n in default["nodes"])


@pytest.mark.slow
def test_model_that_does_not_fit_is_refused_before_upload(ring6, monkeypatch):
    before = [status(n.spec)["runs_completed"] for n in ring6.procs]
    marks = [n.log_mark() for n in ring6.procs]
    small = {**node_capabilities("cpu"), "budget_bytes": 2**16}  # 64 KiB for the starter
    monkeypatch.setattr("mdi.ring.plan.placement.node_capabilities", lambda device: small)
    rc, out, err = _starter(ring6, "--partition", "auto")
    assert rc == 1 and out == ""
    line = [ln for ln in err.splitlines() if "error:" in ln][-1]
    assert "the model does not fit these nodes' memory: starter cannot hold even one layer" in line
    assert "starter: budget 0.1 MiB, holds at most 0 layer(s)" in line
    assert "needs about" in line and "intermediate[0]: budget" in line
    for n, b, mark in zip(ring6.procs, before, marks):
        s = status(n.spec)
        assert s["state"] == "idle" and s["runs_completed"] == b
        assert "configured run" not in n.log()[mark:]
    # even refuses too, naming the node and its share
    rc, out, err = _starter(ring6, "--partition", "even")
    assert rc == 1 and "starter would hold layers [0, 2) needing" in err


@pytest.mark.slow
def test_small_max_memory_gets_fewer_layers(tmp_path_factory):
    """mdi node --max-memory: the capped node reports its budget, the default partition
    turns to auto and gives it what fits; even is refused before any upload."""
    root = tmp_path_factory.mktemp("maxmem")
    tok = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=6, n_head=2, n_embd=32)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt6", GPT(config).eval(), tok, {"note": "random, 6 layers"})
    from mdi.ring.plan.capability import stage_memory

    per_layer = stage_memory(config, 3).block_bytes  # 3 samples' KV cache included
    cap = int(1.5 * per_layer)  # room for one layer, not two
    ring = start_ring(root, ckpt, token_args=[["--max-memory", str(cap)], []])
    try:
        caps = httpx.get(ring.inter.spec.url + "/capabilities", headers=auth(), timeout=10).json()
        assert caps["max_memory_bytes"] == cap and caps["budget_bytes"] == cap
        rc, out, err = _starter(ring)
        assert rc == 0, err[-3000:]
        plan = json.loads(out)["plan"]
        assert plan["partition"] == "auto" and "memory caps" in plan["reason"]
        inter = plan["nodes"][1]
        assert inter["layers"][1] - inter["layers"][0] == 1
        assert inter["memory_bytes"] == per_layer <= inter["budget_bytes"] == cap
        rc, out, err = _starter(ring, "--partition", "even")
        assert rc == 1
        assert (f"intermediate[0] would hold layers [2, 4) needing {2 * per_layer / 2**20:.1f} MiB, "
                f"its budget is {cap / 2**20:.1f} MiB") in err
        assert status(ring.inter.spec)["state"] == "idle"
    finally:
        ring.stop()
