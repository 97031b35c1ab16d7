"""The control plane of a real node process: every bad request gets a 4xx whose
message names the field, and the node's state does not change (a configured
run stays configured); afterwards the node still serves a legitimate run."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from cluster_helpers import (TOKEN, auth, build_tiny_ckpt, fake_upstream, init_body, raw_http,
                             start_ring, status, wait_state, weights_for)
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import RunOptions
from mdi.generate.sampling import SamplingConfig


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_ring")
    r = start_ring(root, build_tiny_ckpt(root / "ckpt"))
    yield r
    r.stop()


def snapshot(spec) -> dict:
    s = status(spec)
    return {k: s[k] for k in ("state", "run_id", "layers", "runs_completed", "pid")}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _model(ring, **over) -> dict:
    from mdi.checkpoint import read_info

    return {**read_info(ring.ckpt).config.to_dict(), **over}


def bad_inits(ring) -> list[tuple[str, dict | bytes, int, str]]:
    """(case, body, status, text the message must hold) for the finisher's /init."""
    good = init_body(ring, 62)
    return [
        ("malformed JSON", b'{"run_id": 62, "role": ', 422, "body: not valid JSON"),
        ("not an object", b"[1, 2, 3]", 422, "body:"),
        ("empty body", b"", 422, "body:"),
        ("missing role", _without(good, "role"), 422, "role: Field required"),
        ("missing model", _without(good, "model"), 422, "model: Field required"),
        ("start as text", {**good, "start": "2"}, 422, "start: Input should be a valid integer"),
        ("run_id negative", {**good, "run_id": -1}, 422, "run_id:"),
        ("run_id too big", {**good, "run_id": 2**40}, 422, "run_id:"),
        ("port as text", {**good, "next": {"addr": "127.0.0.1", "port": "x"}}, 422, "next.port:"),
        ("port 0", {**good, "next": {"addr": "127.0.0.1", "port": 0}}, 422, "next.port:"),
        ("unknown field", {**good, "evil": 1}, 422, "evil: Extra inputs are not permitted"),
        ("unknown role", {**good, "role": "starter"}, 422, "role:"),
        ("unknown dtype", {**good, "dtype": "float64"}, 422, "dtype:"),
        ("unknown quantize", {**good, "quantize": "int3"}, 422, "quantize: Input should be"),
        ("groups as text", {**good, "groups": "0-3"}, 422, "groups:"),
        ("negative temperature", {**good, "sampling": {"temperature": -1.0, "seed": 1}}, 422,
         "sampling.temperature:"),
        ("stop past the model", {**good, "stop": 99}, 400, "start/stop: layer range [2, 99)"),
        ("start at the embeddings", {**good, "start": 0}, 400, "start/stop: layer range [0, 3)"),
        ("empty range", {**good, "start": 2, "stop": 2}, 400, "start/stop:"),
        ("finisher without the last layer", {**good, "start": 1, "stop": 2}, 400, "role:"),
        ("intermediate with the last layer", {**good, "role": "intermediate"}, 400, "role:"),
        ("finisher without sampling", {**good, "sampling": None}, 400, "sampling:"),
        ("gap in the groups", {**good, "groups": [[0, 1], [2, 3]]}, 400, "groups[1]:"),
        ("empty group", {**good, "groups": [[0, 0]]}, 400, "groups[0]:"),
        ("too many samples", {**good, "groups": [[0, 70000]]}, 400, "groups: 70000 samples"),
        ("unknown model field", {**good, "model": _model(ring, evil=1)}, 400,
         "model: unknown model config field(s): evil"),
        ("model field as text", {**good, "model": _model(ring, n_layer="3")}, 400,
         "model: model config field 'n_layer'"),
        ("heads do not divide", {**good, "model": _model(ring, n_head=3)}, 400, "model:"),
        ("unusable device", {**good, "device": "no-such-device"}, 400, "device: 'no-such-device'"),
        ("local weights, no chunk", {**good, "weights": "local"}, 400, "weights: 'local' asked"),
        ("body too large", b"{" + b" " * (2 << 20) + b"}", 413, "body:"),
        # the adversarial pass (issue 13): refused at /init, before any upload, field named
        ("temperature Infinity", json.dumps(_without(good, "sampling"))[:-1].encode()
         + b', "sampling": {"temperature": Infinity, "top_k": null, "seed": 1}}', 422,
         "sampling.temperature:"),
        ("top_k 0", {**good, "sampling": {"temperature": 1.0, "top_k": 0, "seed": 1}}, 422,
         "sampling.top_k:"),
        ("cuda:99", {**good, "device": "cuda:99"}, 400, "device: 'cuda:99'"),
        ("hpu", {**good, "device": "hpu"}, 400, "device: 'hpu'"),
        ("privateuseone", {**good, "device": "privateuseone"}, 400, "device: 'privateuseone'"),
        ("block_size 10^9", {**good, "model": _model(ring, block_size=10**9),
                             "max_context": 10**9}, 400, "memory: the run needs "),
        ("65,536 samples", {**good, "groups": [[0, 1 << 16]], "model": _model(ring, block_size=1 << 16)},
         400, "memory: the run needs "),
        ("a 5,000-digit integer", json.dumps(good)[:-1].encode() + b', "x": ' + b"9" * 5000
         + b"}", 422, "body: not valid JSON (Exceeds the limit (4300 digits)"),
    ]


@pytest.mark.slow
def test_bad_init_is_refused_by_field_and_changes_nothing(ring):
    fin = ring.fin.spec

    async def scenario():
        async with fake_upstream(ring, run_id=61):  # a configured run that must survive
            before = snapshot(fin)
            assert before["state"] == "ready" and before["run_id"] == 61
            async with httpx.AsyncClient(headers=auth(), timeout=5.0) as http:
                for case, body, code, text in bad_inits(ring):
                    kw = {"content": body, "headers": {"content-type": "application/json"}} \
                        if isinstance(body, bytes) else {"json": body}
                    r = await http.post(fin.url + "/init", **kw)
                    assert r.status_code == code, (case, r.status_code, r.text)
                    assert text in r.json()["detail"], (case, r.json()["detail"])
                    assert snapshot(fin) == before, case
    asyncio.run(asyncio.wait_for(scenario(), 60))
    wait_state(fin, "idle", 5.0)


def _tensors(ring) -> dict[str, torch.Tensor]:
    return st_load(weights_for(ring, 1, 2))


def bad_weights(ring) -> list[tuple[str, bytes, str]]:
    good = _tensors(ring)
    name = next(k for k in good if k.endswith("attn.c_attn.weight"))
    other_layer = name.replace(".h.1.", ".h.2.")
    return [
        ("not safetensors", b"\x80\x04garbage" * 10, "weights: not a valid safetensors stream"),
        ("empty", b"", "weights:"),
        ("an extra tensor", st_save({**good, "evil": torch.zeros(2)}),
         "weights: tensor(s) not part of layers [1, 2): evil"),
        ("another layer's tensor", st_save({**good, other_layer: good[name].clone()}),
         f"not part of layers [1, 2): {other_layer}"),
        ("a missing tensor", st_save({k: v for k, v in good.items() if k != name}),
         f"weights: missing tensor '{name}'"),
        ("a wrong shape", st_save({**good, name: torch.zeros(3, 3)}),
         f"weights: tensor '{name}' has shape (3, 3)"),
        ("integer weights", st_save({**good, name: torch.zeros_like(good[name], dtype=torch.int32)}),
         "expected floating point"),
        ("a config for another model", st_save({k: torch.zeros(*v.shape[:-1], v.shape[-1] * 2)
                                                for k, v in good.items()}), "has shape"),
        ("a header nested 200k deep", _st_header(b"[" * 200_000 + b"]" * 200_000),
         "weights: not a valid safetensors stream: header is not JSON"),
        ("a 5,000-digit integer in the header",
         _st_header(b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
         "weights: not a valid safetensors stream: header is not JSON"),
    ]


def _st_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.slow
def test_bad_weights_and_connect_are_refused_and_change_nothing(ring):
    inter = ring.inter.spec
    body = init_body(ring, 63, role="intermediate", start=1, stop=2, sampling=None,
                     next_spec=ring.config.finisher)
    with httpx.Client(headers=auth(), timeout=5.0) as http:
        r = http.post(inter.url + "/init", json=body)
        assert r.status_code == 200, r.text
        before = snapshot(inter)
        assert before["state"] == "awaiting_weights" and before["run_id"] == 63

        def refused(r: httpx.Response, code: int, text: str, case: str) -> None:
            assert r.status_code == code, (case, r.status_code, r.text)
            assert text in r.json()["detail"], (case, r.json()["detail"])
            assert snapshot(inter) == before, case

        for case, data, text in bad_weights(ring):
            refused(http.put(f"{inter.url}/weights/63", content=data), 400, text, case)
        refused(http.put(f"{inter.url}/weights/64", content=weights_for(ring, 1, 2)), 400,
                "run_id: 64 is not the configured run", "another run's weights")
        refused(http.put(f"{inter.url}/weights/x", content=b"1"), 422, "run_id:", "run_id as text")
        # A declared size past what layers [1, 2) can need: refused before the body is read.
        code, reply = raw_http(inter.addr, inter.port,
                               f"PUT /weights/63 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                               f"{TOKEN}\r\nContent-Length: {10**12}\r\n\r\n")
        assert code == 400 and "exceed" in reply, reply
        assert snapshot(inter) == before
        refused(http.post(inter.url + "/connect", json={"run_id": 63}), 400,
                "weights: not loaded yet", "connect before weights")
        refused(http.post(inter.url + "/connect", json={"run_id": "63"}), 422, "run_id:",
                "connect with a text run_id")
        refused(http.post(inter.url + "/connect", json={}), 422, "run_id: Field required",
                "connect without run_id")
        refused(http.post(inter.url + "/stop", json={"run_id": "x"}), 422, "run_id:",
                "stop with a text run_id")

        r = http.put(f"{inter.url}/weights/63", content=weights_for(ring, 1, 2))
        assert r.status_code == 200 and r.json()["state"] == "ready", r.text
        before = snapshot(inter)
        # The next node (the finisher) has no run, so it refuses the link: 502, named.
        fin = ring.config.finisher
        refused(http.post(inter.url + "/connect", json={"run_id": 63}), 502,
                f"cannot reach the next node at {fin.addr}:{fin.port_in}", "next node refuses")
        refused(http.post(inter.url + "/connect", json={"run_id": 64}), 400,
                "run_id: 64 is not the configured run", "connect another run")

        # /stop for another run leaves this one alone; for this run it drops it.
        r = http.post(inter.url + "/stop", json={"run_id": 64})
        assert r.status_code == 200 and snapshot(inter) == before
        r = http.post(inter.url + "/stop", json={"run_id": 63})
        assert r.status_code == 200 and r.json()["state"] == "idle"
        assert status(inter)["last_run"] == {**status(inter)["last_run"], "run_id": 63,
                                             "reason": "stopped by the starter"}


@pytest.mark.slow
def test_node_serves_a_run_after_bad_requests(ring):
    r = Starter(ring.config, TOKEN, str(ring.ckpt), RunOptions(timeout=3)).run(
        [[1, 2, 3], [4]], 6, SamplingConfig(temperature=0.0, top_k=None, seed=1))
    assert [len(t) for t in r.tokens] == [6, 6]
    for spec in ring.config.secondaries:
        assert status(spec)["state"] == "idle"
