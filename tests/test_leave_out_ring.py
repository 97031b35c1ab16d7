"""A ring planned without its slow nodes: the starter forms it of the nodes the plan
keeps, the ones left out stay idle, and the text is the single-device text."""
from __future__ import annotations

import json

import pytest

from cluster_helpers import TOKEN, run_cli, status
from mdi.ring.plan.capability import Speed
from test_placement import ring6  # noqa: F401 - the same 6-layer ring, started for this module

ARGS = ("--n-tokens", "8", "--n-samples", "3", "--temperature", "0", "--batch-invariant",
        "--json")


def _slow(monkeypatch, slow: set[int]) -> None:
    """The probes' answers, as if the nodes at `slow` (ring order) spent 50 ms on
    every frame whatever their layers (a device at a sliver of a core): a test hook
    in the starter, in place of timing real nodes."""
    async def speeds(http, ring, config, batch, dtype, device, context=None, fresh=False):
        return [Speed(0.2, 0.05, 0.05, 50.0 if i in slow else 0.3) for i in range(len(ring))]

    monkeypatch.setattr("mdi.ring.plan.placement._speeds", speeds)


def _runs(ring) -> list[int]:
    return [status(n.spec)["runs_completed"] for n in ring.procs]


@pytest.mark.slow
@pytest.mark.parametrize("slow, kept", [
    ({2}, [("starter", [0, 3]), ("intermediate[0]", [3, 6])]),   # the intermediate finishes
    ({1}, [("starter", [0, 3]), ("finisher", [3, 6])]),          # a ring of the two ends
    ({1, 2}, [("starter", [0, 6])]),                              # the starter alone
])
def test_slow_nodes_are_left_out_and_the_text_is_single_devices(ring6, monkeypatch, slow, kept):
    rc, out, err = run_cli("sample", "--ckpt", ring6.ckpt, *ARGS)
    assert rc == 0, err[-3000:]
    single = json.loads(out)["samples"]
    _slow(monkeypatch, slow)
    before = _runs(ring6)
    rc, out, err = run_cli("starter", "--ckpt", ring6.ckpt, "--nodes-config", ring6.nodes_path,
                           "--token", TOKEN, "--partition", "auto", *ARGS)
    assert rc == 0, err[-3000:]
    res = json.loads(out)
    assert res["samples"] == single
    nodes = res["plan"]["nodes"]
    assert [(n["node"], n["layers"]) for n in nodes if not n.get("left_out")] == kept
    gone = [n for n in nodes if n.get("left_out")]
    names = ["intermediate[0]", "finisher"]
    assert [n["node"] for n in gone] == [names[i - 1] for i in sorted(slow)]
    assert all(n["layers"] is None and n["step_ms_without"] < n["step_ms_with"] for n in gone)
    for n in gone:
        assert f"{n['node']} is left out of the ring: the ring completes a step every" in err
    # the nodes left out took no part in the run; the others each completed one
    after = _runs(ring6)
    for i, (b, a) in enumerate(zip(before, after), start=1):
        assert a == b + (0 if i in slow else 1), (i, b, a)
    ring6.assert_alive()


@pytest.mark.slow
def test_resend_context_forms_the_ring_without_the_nodes_left_out(ring6, monkeypatch):
    def starter(*extra):
        rc, out, err = run_cli("starter", "--ckpt", ring6.ckpt, "--nodes-config",
                               ring6.nodes_path, "--token", TOKEN, "--resend-context", *ARGS,
                               *extra)
        assert rc == 0, err[-3000:]
        return json.loads(out)

    even = starter("--partition", "even")
    _slow(monkeypatch, {2})
    before = _runs(ring6)
    auto = starter("--partition", "auto")
    assert [n["layers"] for n in auto["plan"]["nodes"]] == [[0, 3], [3, 6], None]
    assert auto["samples"] == even["samples"]
    assert [a - b for a, b in zip(_runs(ring6), before)] == [1, 0]
