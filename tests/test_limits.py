"""A node's limits, in process (no sockets but loopback, no child process): what a run
may cost (weights + KV caches, checked at /init before anything is allocated), the
checks every /init field gets before any upload, devices this build cannot use,
bodies larger than their headers say, and log lines a peer cannot forge or flood.

The regression tests of the adversarial pass (issue 13) that need a real node
process live in test_security.py."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

import httpx
import psutil
import pytest
import torch

from mdi.checkpoint import st_io
from mdi.model import GPT, GPTConfig
from mdi.ring.plan import limits
from mdi.net.log_limit import LogLimiter, printable
from mdi.ring.node.control_app import MAX_JSON_BYTES, Guard, create_control_app
from mdi.ring.node.runtime import NodeRuntime
from mdi.ring.node.validate import InitError, validate_device
from mdi.ring.cluster.nodes_config import NodeSpec

TOKEN = "test-token-0123456789abcdef0123456789abcdef"
CONFIG = GPTConfig(vocab_size=40, block_size=32, n_layer=3, n_head=2, n_embd=32)
SPEC = NodeSpec("finisher", 0, "127.0.0.1", 1, 2, 3)


def body(**over) -> dict:
    b = {"run_id": 5, "role": "finisher", "start": 2, "stop": 3, "model": CONFIG.to_dict(),
         "dtype": "float32", "groups": [[0, 2]], "next": {"addr": "127.0.0.1", "port": 9},
         "prev_addr": "127.0.0.1", "sampling": {"temperature": 0.0, "top_k": None, "seed": 1}}
    b.update(over)
    return b


def stage_bytes(config: GPTConfig, start: int, stop: int) -> bytes:
    """The safetensors stream of a random stage, as the starter would send it."""
    from safetensors.torch import save

    torch.manual_seed(0)
    return save({k: v.contiguous() for k, v in GPT(config, start, stop).state_dict().items()})


async def post(rt: NodeRuntime, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_control_app(rt))
    async with httpx.AsyncClient(transport=transport, base_url="http://node",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        return await http.post(path, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---- sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,n", [("512MB", 512 * 10**6), ("2GB", 2 * 10**9), ("2GiB", 2 * 2**30),
                                    ("1.5G", 1_500_000_000), ("100 MiB", 100 * 2**20),
                                    ("4096", 4096), ("3kb", 3000)])
def test_parse_size(text, n):
    assert limits.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "two", "-1GB", "0", "0MB", "5XB", "1e9", "GB"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="size"):
        limits.parse_size(text)


def test_format_size():
    assert limits.format_size(3_270_000_000) == "3.27 GB"
    assert limits.format_size(999) == "999 bytes"


@pytest.mark.parametrize("start,stop,n", [(1, 3, 1), (2, 3, 5), (1, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_is_what_the_stage_allocates(start, stop, n, dtype):
    stage = GPT(CONFIG, start, stop).to(dtype)
    assert limits.kv_cache_bytes(CONFIG, stop - start, n, dtype) == stage.new_cache(n).nbytes()


def test_kv_cache_bytes_counts_kv_heads_with_grouped_query_attention():
    mha = GPTConfig(vocab_size=16, block_size=10, n_layer=2, n_head=8, n_embd=64)
    gqa = GPTConfig(vocab_size=16, block_size=10, n_layer=2, n_head=8, n_embd=64, n_kv_head=2)
    assert limits.kv_cache_bytes(mha, 1, 1, torch.float32) == 2 * 8 * 10 * 8 * 4
    assert limits.kv_cache_bytes(gqa, 1, 1, torch.float32) == 2 * 2 * 10 * 8 * 4
    assert limits.kv_cache_bytes(gqa, 1, 3, torch.float32) == GPT(gqa, 0, 1).new_cache(3).nbytes()


@pytest.mark.parametrize("start,stop", [(1, 2), (1, 3), (2, 3), (0, 3), (0, 1), (1, 5), (2, 6)])
def test_stage_weight_bytes_is_what_the_stage_holds(start, stop):
    config = GPTConfig(vocab_size=40, block_size=32, n_layer=6, n_head=2, n_embd=32)
    stage = GPT(config, start, stop).to(torch.float16)
    held = sum(p.numel() * p.element_size() for p in stage.parameters())
    if start == 0 and stop == config.n_layer:  # a tied head is one tensor, counted twice
        held += config.vocab_size * config.n_embd * 2
    assert limits.stage_weight_bytes(config, start, stop, torch.float16) == held


def test_stage_weight_bytes_of_a_million_layers_is_computed_not_built():
    config = GPTConfig(vocab_size=40, block_size=32, n_layer=10**6, n_head=2, n_embd=32)
    one = limits.stage_weight_bytes(config, 5, 6, torch.float32)
    assert limits.stage_weight_bytes(config, 1, 10**6 - 1, torch.float32) == (10**6 - 2) * one


# ---- memory at /init -------------------------------------------------------------------------
def test_a_run_larger_than_free_memory_is_refused_before_allocation():
    """Issue 13.2: block_size 10^6 (or 2^31 - 1) with one sample took 3 GB at /weights.
    Now only a run that asks to keep that many positions (max_context) would."""
    rt = NodeRuntime(SPEC, TOKEN)
    rss = psutil.Process().memory_info().rss
    huge = {**CONFIG.to_dict(), "block_size": 2**31 - 1}
    r = run(post(rt, "/init", json=body(model=huge, groups=[[0, 1]], max_context=2**31 - 1)))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    kv = limits.kv_cache_bytes(GPTConfig(**huge), 1, 1, torch.float32, 2**31 - 1)
    assert detail.startswith("memory: the run needs ")
    assert f"KV caches {limits.format_size(kv)} in float32 for 1 samples of 2147483647 positions" in detail
    assert "(free system memory)" in detail
    assert rt.run is None and psutil.Process().memory_info().rss - rss < 50 * 2**20


def test_a_huge_block_size_costs_the_default_context_unless_asked():
    """The KV cache follows min(block_size, max_context), max_context 2048 by default."""
    huge = GPTConfig(**{**CONFIG.to_dict(), "block_size": 2**31 - 1})
    assert limits.kv_cache_bytes(huge, 1, 1, torch.float32) == \
        limits.kv_cache_bytes(GPTConfig(**{**CONFIG.to_dict(), "block_size": 2048}), 1, 1, torch.float32)
    rt = NodeRuntime(SPEC, TOKEN)
    r = run(post(rt, "/init", json=body(model=huge.to_dict(), groups=[[0, 1]])))
    assert r.status_code == 200, r.text
    assert rt.run.limits.block_size == 2048
    r = run(post(rt, "/init", json=body(model=huge.to_dict(), groups=[[0, 1]], max_context=100,
                                        run_id=9)))
    assert r.status_code == 200 and rt.run.limits.block_size == 100
    assert rt.run.mem_bytes == limits.stage_weight_bytes(huge, 2, 3, torch.float32) + \
        limits.kv_cache_bytes(huge, 1, 1, torch.float32, 100)
    r = run(post(rt, "/init", json=body(groups=[[0, 1]], max_context=0, run_id=10)))
    assert r.status_code == 422 and "max_context" in r.text, r.text


def test_max_memory_caps_a_run_and_names_both_numbers():
    """8192 samples at block 128 (3.4 GB in the adversarial pass) against --max-memory 2GB."""
    rt = NodeRuntime(SPEC, TOKEN, max_memory=limits.parse_size("2GB"))
    model = {"vocab_size": 49152, "block_size": 128, "n_layer": 30, "n_head": 9, "n_embd": 576}
    req = body(model=model, start=20, stop=30, groups=[[0, 8192]])
    r = run(post(rt, "/init", json=req))
    assert r.status_code == 400, r.text
    weights = limits.stage_weight_bytes(GPTConfig(**model), 20, 30, torch.float32)
    kv = limits.kv_cache_bytes(GPTConfig(**model), 10, 8192, torch.float32)
    assert r.json()["detail"] == (
        f"memory: the run needs {limits.format_size(weights + kv)} on cpu (weights "
        f"{limits.format_size(weights)} for layers [20, 30) in float32, KV caches "
        f"{limits.format_size(kv)} in float32 for 8192 samples of 128 positions), this node has 2.00 GB "
        "(--max-memory); ask for fewer samples, a smaller --max-context or fewer layers")
    # the same run with 4 samples fits, and the current run's memory counts as free again
    ok = run(post(rt, "/init", json={**req, "groups": [[0, 4]]}))
    packed = limits.packed_copy_bytes(GPTConfig(**model), 20, 30, torch.float32)  # it has room
    assert ok.status_code == 200 and rt.run.mem_bytes == weights + packed + limits.kv_cache_bytes(
        GPTConfig(**model), 10, 4, torch.float32)
    rt.max_memory = rt.run.mem_bytes + 1
    assert run(post(rt, "/init", json={**req, "groups": [[0, 4]], "run_id": 6})).status_code == 200


# ---- every field at /init, before any upload ----------------------------------------------------
LATE = [  # (case, body, status, text the message must hold)
    ("temperature Infinity", '"sampling": {"temperature": Infinity, "top_k": null, "seed": 1}', 422,
     "sampling.temperature:"),
    ("temperature NaN", '"sampling": {"temperature": NaN, "top_k": null, "seed": 1}', 422,
     "sampling.temperature:"),
    ("top_k 0", '"sampling": {"temperature": 1.0, "top_k": 0, "seed": 1}', 422, "sampling.top_k:"),
    ("top_k 2^40", '"sampling": {"temperature": 1.0, "top_k": 1099511627776, "seed": 1}', 422,
     "sampling.top_k:"),
    ("seed of 5,000 digits", '"sampling": {"temperature": 1.0, "top_k": 3, "seed": ' + "9" * 5000
     + "}", 422, "body: not valid JSON (Exceeds the limit (4300 digits)"),
    ("model int of 5,000 digits", '"model": {"block_size": ' + "9" * 5000 + "}", 422,
     "body: not valid JSON (Exceeds the limit (4300 digits)"),
    ("model int 2^40", '"model": {"block_size": 1099511627776}', 400,
     "model.block_size: 1099511627776 is larger than 2147483647"),
    ("model eps NaN", '"model": {"layer_norm_eps": NaN}', 400,
     "model.layer_norm_eps: nan is not a finite number"),
    ("group of 4,000 digits", '"groups": [[0, ' + "9" * 4000 + "]]", 422, "groups.0.1:"),
    ("stop 2^40", '"stop": 1099511627776', 422, "stop:"),
    ("device hpu", '"device": "hpu"', 400, "device: 'hpu': this node runs on cpu, cuda, mps"),
    ("device privateuseone", '"device": "privateuseone"', 400, "device: 'privateuseone'"),
    ("device meta", '"device": "meta"', 400, "device: 'meta'"),
    ("device of 100 chars", '"device": "' + "c" * 100 + '"', 422, "device:"),
    ("nested 200k deep", '"model": ' + "[" * 200_000 + "]" * 200_000, 422,
     "body: not valid JSON (maximum recursion depth exceeded"),
]


@pytest.mark.parametrize("case,field,code,text", LATE, ids=[c[0] for c in LATE])
def test_every_init_field_is_checked_at_init(case, field, code, text):
    """Issue 13.5/13.6: refused at /init with the field named, never a 500 after the upload."""
    rt = NodeRuntime(SPEC, TOKEN)
    good = body()
    key = field.split(":", 1)[0].strip('"')
    good.pop(key, None)
    if key == "model":
        inner = field.split(":", 1)[1].strip()
        if inner.startswith("{"):
            field = '"model": ' + json.dumps(CONFIG.to_dict())[:-1] + ", " + inner[1:]
    raw = json.dumps(good)[:-1] + ", " + field + "}"
    assert len(raw) < MAX_JSON_BYTES
    r = run(post(rt, "/init", content=raw.encode(), headers={"content-type": "application/json"}))
    assert r.status_code == code, (case, r.text[:300])
    assert text in r.json()["detail"], (case, r.json()["detail"][:300])
    assert rt.run is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only build's answer")
@pytest.mark.parametrize("device", ["cuda", "cuda:99", "cuda:0"])
def test_cuda_on_a_cpu_build_is_a_400(device):
    with pytest.raises(InitError, match=f"^device: '{device}': this node has no CUDA device$"):
        validate_device(device)
    r = run(post(NodeRuntime(SPEC, TOKEN), "/init", json=body(device=device)))
    assert r.status_code == 400 and r.json()["detail"].startswith(f"device: '{device}'")


@pytest.mark.parametrize("device", ["no-such-device", "cpu:x", "xla", "ipu", "", "cpu:-1"])
def test_other_unusable_devices_name_the_field(device):
    with pytest.raises(InitError, match="^device: "):
        validate_device(device)


def test_cpu_is_usable():
    assert validate_device("cpu") == "cpu"


# ---- the weights' safetensors header -------------------------------------------------------------
def _stream(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("header", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}",
], ids=["nested 200k deep", "5000-digit shape", "5000-digit offset"])
def test_hostile_safetensors_headers_are_400(header):
    with pytest.raises(st_io.SafetensorsFormatError, match="header is not JSON"):
        st_io.parse_header(header)
    rt = NodeRuntime(SPEC, TOKEN)
    assert run(post(rt, "/init", json=body())).status_code == 200
    with pytest.raises(InitError, match="^weights: not a valid safetensors stream: header is not JSON"):
        run(rt.load_weights(5, _stream(header)))
    assert rt.state == "awaiting_weights"
    assert run(rt.load_weights(5, stage_bytes(CONFIG, 2, 3)))["state"] == "ready"


# ---- bodies: the bytes that arrive, not the headers ---------------------------------------------
async def _through_guard(path: str, headers: list, chunks: list[bytes]) -> tuple[int, dict, bool]:
    """Drive Guard with a body in pieces; (status, answer, whether the app ran)."""
    ran, sent = [], []
    it = iter(chunks)

    async def app(scope, receive, send):
        ran.append(True)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        chunk = next(it, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), *headers]}
    try:
        await Guard(app, TOKEN)(scope, receive, send)
    except Exception as e:  # noqa: BLE001 - the route's exception handler answers these
        return -1, {"detail": str(e)}, bool(ran)
    return sent[0]["status"], json.loads(sent[1]["body"]), bool(ran)


def test_the_json_cap_counts_bytes_read_whatever_the_headers_say():
    """Issue 13.3: chunked + a small Content-Length read 100 MiB; now the cap counts bytes."""
    mib = [b" " * (1 << 16)] * 17  # 1.06 MiB in 64 KiB pieces
    code, answer, ran = run(_through_guard("/init", [(b"content-length", b"10")], mib))
    assert (code, answer, ran) == (413, {"detail": f"body: more than {MAX_JSON_BYTES} bytes"}, False)
    for headers, code_want in (([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], 400),
                               ([(b"transfer-encoding", b"chunked")], 411),
                               ([(b"content-length", b"1e9")], 400)):
        code, answer, ran = run(_through_guard("/init", headers, [b"{}"]))
        assert code == code_want and not ran and answer["detail"].startswith("body:"), answer
    code, answer, ran = run(_through_guard("/weights/1", [(b"content-length", b"100")], mib))
    assert (code, ran) == (-1, True) and answer["detail"] == \
        "body: more than the 100 bytes of its Content-Length"
    assert run(_through_guard("/init", [(b"content-length", b"2")], [b"{", b"}"]))[:2] == (200, {})


# ---- logs -----------------------------------------------------------------------------------------
def test_peer_strings_are_logged_escaped(caplog):
    """Issue 13.4: a %0a in the path forged log lines."""
    assert printable("/x\nFORGED 127.0.0.1\r\x1b[31m") == "/x\\nFORGED 127.0.0.1\\r\\x1b[31m"
    assert printable("\u00e9" * 300).startswith("\\xe9") and len(printable("a" * 300)) == 203
    rt = NodeRuntime(SPEC, TOKEN)

    async def scenario():
        transport = httpx.ASGITransport(app=create_control_app(rt))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            await http.get("/x%0aWARNING forged line")
            await http.post("/init", json={**body(), "evil\nWARNING forged": 1},
                            headers={"Authorization": f"Bearer {TOKEN}"})
            await http.post("/init", json=body(model={**CONFIG.to_dict(), "evil\nx": 1}),
                            headers={"Authorization": f"Bearer {TOKEN}"})
    with caplog.at_level(logging.WARNING, logger="mdi.ring.node.control_app"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "mdi.ring.node.control_app"]
    assert len(lines) == 3 and not any("\n" in m for m in lines), lines
    assert lines[0] == "refused GET /x\\nWARNING forged line from 127.0.0.1: missing or wrong token"
    assert "evil\\nWARNING forged: Extra inputs are not permitted" in lines[1]
    assert "unknown model config field(s): evil\\nx" in lines[2]


def test_warnings_are_rate_limited_with_a_count():
    limiter = LogLimiter(per_second=20)
    logger = logging.getLogger("test_limits.flood")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(limiter)
    logger.propagate = False
    try:
        for i in range(2500):  # the adversarial pass's rate of refused requests in one second
            logger.warning("refused GET /%d from 127.0.0.1: missing or wrong token", i)
        logger.error("errors always pass")
        assert len(records) == 21 and records[-1].levelno == logging.ERROR
        other = logging.LogRecord("test_limits.other", logging.WARNING, __file__, 0,
                                  "another logger has its own budget", None, None)
        assert limiter.filter(other)
        limiter.window[logger.name] -= 1.0  # the next second
        logger.warning("refused once more")
        assert records[-1].getMessage() == \
            "refused once more [2480 warnings not logged: more than 20 a second]"
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limiter)


# ---- /connect, the token file, ports -----------------------------------------------------------------
def test_connect_timeout_names_its_reason():
    """Issue 13.7: the timeout message had an empty reason."""
    async def scenario():
        async def silent(reader, writer):  # accepts, never sends the CHALLENGE
            await asyncio.sleep(5)
            writer.close()
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rt = NodeRuntime(SPEC, TOKEN, timeout=0.3)
        assert (await post(rt, "/init", json=body(next={"addr": "127.0.0.1", "port": port}))
                ).status_code == 200
        await rt.load_weights(5, stage_bytes(CONFIG, 2, 3))
        r = await post(rt, "/connect", json={"run_id": 5})
        server.close()
        return r
    r = run(scenario())
    assert r.status_code == 502
    assert r.json()["detail"].endswith(": no answer within 0.3 s"), r.json()


def test_a_shared_token_file_gets_a_warning(tmp_path, caplog):
    from mdi.ring.protocol.auth import resolve_token

    f = tmp_path / "token"
    f.write_text(TOKEN)
    f.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="mdi.ring.protocol.auth"):
        assert resolve_token(None, str(f)) == TOKEN
        assert not caplog.records
        f.chmod(0o644)
        assert resolve_token(None, str(f)) == TOKEN
    (rec,) = caplog.records
    assert rec.getMessage() == (f"--token-file {f} has mode 0o644: other users can read or change "
                                f"the cluster token; chmod 600 {f}")


@pytest.mark.parametrize("which", ["control", "data"])
def test_a_taken_port_exits_4_and_names_it(which, tmp_path, capsys, caplog, monkeypatch):
    """Issue 13.7: a taken control port logged "serving control on ..." and exited 3."""
    from mdi.cli.main import main
    from mdi.ring.cluster.nodes_config import local_nodes_config

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    other = free.getsockname()[1]
    free.close()
    ports = [taken, other] if which == "control" else [other, taken]
    config = local_nodes_config(2, [1, 2, ports[0], ports[1], 3, 4])
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps(config.to_dict()))
    monkeypatch.setenv("MDI_TOKEN", TOKEN)
    try:
        with caplog.at_level(logging.INFO):
            rc = main(["node", "--nodes-config", str(nodes), "--role", "finisher"])
    finally:
        blocker.close()
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"cannot listen for {which} on 127.0.0.1:{taken}: " in err
    assert "in use" in err.lower()
    assert not any("serving control" in r.getMessage() for r in caplog.records)


# ---- the packed copy of large float32 weights (model/layers.py:packed_weight) -------------------
WIDE = GPTConfig(vocab_size=1024, block_size=32, n_layer=4, n_head=4, n_embd=512)  # 2^19-weight MLPs


@pytest.mark.skipif(not limits.packed_copy_bytes(WIDE, 0, 4, torch.float32),
                    reason="this torch build has no oneDNN prepacked linear")
def test_packed_copy_is_counted_when_it_fits_and_dropped_when_it_does_not(caplog):
    """Review: packing the large float32 Linear weights takes memory beside the plain
    ones, which /init did not count. The packed copy now replaces each plain weight
    (one copy), so what it adds is one weight held twice while packing (and tied
    heads beside their embedding); a node counts it when it has the room and runs
    on the plain layers (same numbers, slower) when only the plain weights fit."""
    extra = limits.packed_copy_bytes(WIDE, 2, 4, torch.float32)
    assert extra == 4 * 512 * 2048  # the largest packed weight, an MLP layer
    # a whole model with a tied head: its packed copy stays beside the embedding's rows
    assert limits.packed_copy_bytes(WIDE, 0, 4, torch.float32) == 4 * 1024 * 512 + extra
    assert limits.packed_copy_bytes(WIDE, 2, 4, torch.float32, "int8") == 0
    assert limits.packed_copy_bytes(WIDE, 2, 4, torch.bfloat16) == 0
    assert limits.packed_copy_bytes(WIDE, 2, 4, torch.float32, device="cuda:0") == 0
    weights = limits.stage_weight_bytes(WIDE, 2, 4, torch.float32)
    kv = limits.kv_cache_bytes(WIDE, 2, 2, torch.float32)
    req = body(model=WIDE.to_dict(), start=2, stop=4, sequences=True, sampling=None)

    rt = NodeRuntime(SPEC, TOKEN, max_memory=weights + kv + extra)
    assert run(post(rt, "/init", json=req)).status_code == 200
    assert rt.run.pack and rt.run.mem_bytes == weights + kv + extra
    run(rt.load_weights(5, stage_bytes(WIDE, 2, 4)))
    assert rt.run.stage.packed_linears

    rt = NodeRuntime(SPEC, TOKEN, max_memory=weights + kv + extra - 1)
    with caplog.at_level(logging.INFO, logger="mdi.ring.node.validate"):
        assert run(post(rt, "/init", json=req)).status_code == 200
    assert not rt.run.pack and rt.run.mem_bytes == weights + kv
    assert "no room for the" in caplog.text and "plain layers" in caplog.text
    run(rt.load_weights(5, stage_bytes(WIDE, 2, 4)))
    assert rt.run.stage.packed_linears is False
