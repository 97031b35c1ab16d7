"""Every process of a ring says whether it computes with the fused decode kernels, and
the starter warns once when they disagree (their last bits differ: fused_check.py);
an older node that does not say is accepted as unknown."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi.testclient import TestClient

from cluster_helpers import TEXT, TOKEN, auth, child_env, run_cli, start_ring
from mdi.bench.report import fused_column
from mdi.checkpoint.format import save_checkpoint
from mdi.model import GPT, GPTConfig
from mdi.ring.cluster.nodes_config import NodeSpec, local_nodes_config
from mdi.ring.node.control_app import create_control_app
from mdi.ring.node.runtime import NodeRuntime
from mdi.ring.plan import fused_check, placement
from mdi.ring.plan.fused_check import check_ring, fused_of, mixed_warning, ring_states
from mdi.tokenizer import CharTokenizer

NAMES = ["starter", "intermediate[0]", "finisher"]


def _cap(fused=..., device="cpu") -> dict:
    """A /capabilities answer; fused=...: a node from before the field (no key)."""
    cap = {"device": device, "device_name": "cpu", "cpus": 2.0, "torch_threads": 2,
           "max_memory_bytes": None, "budget_bytes": 10**9}
    if fused is not ...:
        cap["fused_kernels"] = fused
    return cap


def _warn(caps: list[dict]) -> str:
    return mixed_warning(ring_states(NAMES, caps))


# ---- fast ---------------------------------------------------------------------
def test_a_mixed_ring_is_named_with_the_cost():
    why = _warn([_cap(True), _cap(False), _cap(True)])
    assert why.startswith("the ring's processes compute differently: intermediate[0] lacks "
                          "the fused decode kernels (starter, finisher have them)")
    assert "last bits" in why and "C++ compiler" in why and "MDI_FUSED_OPS=0" in why
    # the starter is a process of the ring too (it computes stage 0)
    why = _warn([_cap(False), _cap(True), _cap(True)])
    assert "starter lacks" in why and "(intermediate[0], finisher have them)" in why


def test_a_uniform_ring_is_not_warned():
    assert _warn([_cap(True)] * 3) == ""
    assert _warn([_cap(False)] * 3) == ""  # MDI_FUSED_OPS=0 everywhere: torch's arithmetic alike


def test_an_older_node_without_the_field_is_unknown_not_an_error(caplog):
    assert fused_of(_cap(), "n") is None and fused_of({}, "n") is None
    caplog.set_level(logging.INFO, logger=fused_check.__name__)
    assert check_ring(NAMES, [_cap(True), _cap(), _cap(True)]) == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "not known for intermediate[0]" in caplog.text
    # a node from before /capabilities ({}) among a mixed ring: the others still compared
    why = _warn([_cap(True), {}, _cap(False)])
    assert "finisher lacks" in why and "not known for intermediate[0]" in why


def test_a_bad_value_is_unknown_and_named(caplog):
    assert fused_of(_cap("yes"), "finisher") is None
    assert "finisher reports fused_kernels='yes'" in caplog.text


def test_gpu_processes_are_not_compared():
    # the kernels apply to CPU activations only: a GPU node computes with torch's anyway
    assert _warn([_cap(True), _cap(None, device="cuda:0"), _cap(True)]) == ""
    assert _warn([_cap(True), _cap(False, device="cuda:0"), _cap(True)]) == ""


def test_state_is_reported_on_a_gpu_as_unknown_and_never_builds_there(monkeypatch):
    monkeypatch.setattr(fused_check.fused_ops, "ops", lambda: pytest.fail("built on a GPU"))
    assert fused_check.local_state("cuda:0") is None
    assert fused_check.fused_state("cuda:0") is None


def test_local_state_follows_fused_ops(monkeypatch):
    state: dict = {}
    monkeypatch.setattr(fused_check.fused_ops, "_state", state)
    monkeypatch.setattr(fused_check.fused_ops, "_load", lambda: None)  # no compiler, or =0
    assert fused_check.fused_state() is None  # not asked yet: unknown, no build
    assert fused_check.local_state() is False and fused_check.fused_state() is False
    state.clear()  # (another process's answer)
    monkeypatch.setattr(fused_check.fused_ops, "_load", lambda: object())
    assert fused_check.local_state() is True and fused_check.fused_state() is True


def test_node_reports_the_field_in_capabilities_and_status(monkeypatch):
    monkeypatch.setattr(fused_check.fused_ops, "_state", {"ops": None})
    rt = NodeRuntime(NodeSpec("finisher", 0, "127.0.0.1", 1, 2, 3), TOKEN)
    with TestClient(create_control_app(rt)) as client:
        caps = client.get("/capabilities", headers=auth()).json()
        assert caps["fused_kernels"] is False
        assert client.get("/status", headers=auth()).json()["fused_kernels"] is False


def _place(monkeypatch, starter: bool, nodes: list[dict], dtype: str = "float32"):
    """place_layers over a 3-node ring whose /capabilities answers are `nodes`."""
    answers = iter(nodes)

    async def fake_capabilities(http, spec, timeout, retries):
        return next(answers)

    monkeypatch.setattr(placement, "_capabilities", fake_capabilities)
    monkeypatch.setattr(placement, "local_state", lambda device: starter)
    monkeypatch.setattr(placement, "node_capabilities", lambda device: _cap(starter))
    config = GPTConfig(vocab_size=16, block_size=16, n_layer=3, n_head=2, n_embd=16)
    ring = local_nodes_config(3, list(range(20000, 20006)))
    return asyncio.run(placement.place_layers(ring, config, TOKEN, "even", 1, 1, dtype))


def test_the_starter_warns_once_for_a_mixed_ring(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    p = _place(monkeypatch, True, [_cap(False), _cap(True)])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        "the ring's processes compute differently: intermediate[0] lacks")
    assert p.to_json()["fused_kernels"] == [True, False, True]  # --json's plan, for mdi bench
    caplog.clear()  # float16 activations: no process uses the kernels, nothing differs
    _place(monkeypatch, True, [_cap(False), _cap(True)], "float16")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_starter_accepts_an_older_node_in_a_uniform_ring(monkeypatch, caplog):
    p = _place(monkeypatch, True, [_cap(True), _cap()])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert p.to_json()["fused_kernels"] == [True, True, None]
    json.dumps(p.to_json(), allow_nan=False)


def test_bench_column_per_process():
    assert fused_column({"fused_kernels": [True, False, None]}) == "y/n/?"
    assert fused_column(None) == "" and fused_column({"partition": "even"}) == ""


# ---- a real ring ------------------------------------------------------------------
@pytest.mark.slow
def test_a_node_without_the_kernels_is_named_by_mdi_starter(tmp_path):
    if not fused_check.local_state():  # this process is the starter
        pytest.skip("the fused kernels do not build here (no C++ compiler?)")
    tok = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=3, n_head=2, n_embd=32)
    ckpt = save_checkpoint(tmp_path / "ckpt", GPT(config).eval(), tok, {"note": "random"})
    ring = start_ring(tmp_path, ckpt, envs=[child_env(MDI_TOKEN=TOKEN),
                                            child_env(MDI_TOKEN=TOKEN, MDI_FUSED_OPS="0")])
    try:
        rc, out, err = run_cli("starter", "--ckpt", ckpt, "--nodes-config", ring.nodes_path,
                               "--token", TOKEN, "--n-tokens", "4", "--n-samples", "1",
                               "--temperature", "0", "--json")
    finally:
        ring.stop()
    assert rc == 0, err
    assert "compute differently: finisher lacks the fused decode kernels (starter" in err
    assert err.count("compute differently") == 1
    plan = json.loads(out)["plan"]
    # the intermediate: true, or null had it still been building when asked
    assert plan["fused_kernels"][0] is True and plan["fused_kernels"][1] in (True, None)
    assert plan["fused_kernels"][2] is False

