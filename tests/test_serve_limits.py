"""What `mdi serve` refuses and bounds (issue 25): prompts past the context (400
context_length_exceeded, never cut), strict JSON types, JSON-only POSTs, keys in
URLs, malformed bodies; a large body prepared off the event loop; /health degraded
while the pipeline is silent; the stalled-sequence count in /metrics."""
from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

from mdi.bench.abuse import StreamGaps
from mdi.net.log_limit import QueryRedactor
from mdi.serve import BackgroundServer, ServeConfig, create_app
from serve_fakes import ChatCharTokenizer, FakeEngine

MODEL = "tiny-char"
CONTEXT = 64


@pytest.fixture(scope="module")
def tok(char_tokenizer) -> ChatCharTokenizer:
    return ChatCharTokenizer(char_tokenizer.itos)


@pytest.fixture(scope="module")
def srv(tok):
    app = create_app(lambda: FakeEngine(tok), tok, ServeConfig(MODEL, context=CONTEXT))
    with BackgroundServer(app) as s:
        yield s


def post(srv, body, path="/v1/completions", **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=30, **kw)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("body, n_prompt, asked", [
    ({"prompt": "a" * 60, "max_tokens": 10}, 60, 70),           # prompt + completion
    ({"prompt": "a" * 64}, 64, None),                            # the prompt alone fills it
    ({"prompt": [1] * 500}, 500, None),                          # token ids, measured first
    ({"prompt": "ab", "max_tokens": 2 ** 70}, 2, 2 + 2 ** 70),   # max_tokens <= context
])
def test_past_the_context_is_400_naming_both_numbers(srv, body, n_prompt, asked):
    """Issue 25.3: "A"*3000 + S gave the same text as S, billed 3097 prompt tokens."""
    err = error(post(srv, {"model": MODEL, **body}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in err["message"]
    assert str(asked if asked is not None else n_prompt) in err["message"]


def test_chat_past_the_context_and_usage_counts_what_was_computed(srv):
    long = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "u" * 20}]
    err = error(post(srv, {"model": MODEL, "messages": long, "max_tokens": 5}, "/v1/chat/completions"))
    rendered = len("system: " + "s" * 40 + "\nuser: " + "u" * 20 + "\nassistant:")
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"{rendered} in the messages" in err["message"]
    r = post(srv, {"model": MODEL, "prompt": "a" * 60})          # no max_tokens: what is left
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": 60, "completion_tokens": CONTEXT - 60, "total_tokens": CONTEXT}


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("n", "2"),
    ("stream", "true"), ("stream", 1), ("temperature", "0.5"), ("temperature", True),
    ("seed", "1"), ("top_p", False), ("echo", 0),
])
def test_types_are_strict_where_openai_is(srv, field, value):
    err = error(post(srv, {"model": MODEL, "prompt": "a", field: value}))
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize("prompt, what", [
    ([1, True, 2], "bool"), ([1, 2.0], "float"), ([5, 10 ** 30], "outside the vocabulary"),
    ([[1, 2], [-1]], "outside the vocabulary"), ([1, 99999], "outside the vocabulary"),
    ([], "must not be empty"), ({"a": 1}, "prompt must be"), ([None], "prompt must be"),
])
def test_token_ids_are_checked(srv, prompt, what):
    err = error(post(srv, {"model": MODEL, "prompt": prompt}))
    assert what in err["message"] and err["param"].startswith(("prompt", "n")), err


@pytest.mark.parametrize("content, media", [
    (b'{"model": "m", "prompt": "a"}', "text/plain"),                  # a cross-site "simple" POST
    (b'{"model": "m", "prompt": "a"}', "application/x-www-form-urlencoded"),
    (b'{"model": "m", "prompt": "a"}', None),
])
def test_post_bodies_must_say_json(srv, content, media):
    headers = {"content-type": media} if media else {}
    r = httpx.post(srv.url + "/v1/completions", content=content, headers=headers)
    assert error(r, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content, what", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": "m", "prompt": "a", "temperature": NaN}', "NaN"),
    (b'{"model": "m", "prompt": "a", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "nested"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"model": "m", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'"just a string"', "JSON object"),
])
def test_malformed_bodies_are_json_400s(srv, content, what):
    r = httpx.post(srv.url + "/v1/completions", content=content,
                   headers={"content-type": "application/json"})
    assert what in error(r)["message"]


def test_a_key_in_the_url_is_refused_and_never_logged(srv, tok):
    r = post(srv, {"model": MODEL, "prompt": "a"}, params={"api_key": "sk-secret"})
    assert error(r, 401)["code"] == "invalid_api_key" and "URL" in error(r, 401)["message"]
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4:5", "POST", "/v1/completions?api_key=sk-secret", "1.1", 401),
                               None)
    QueryRedactor().filter(record)
    assert "sk-secret" not in record.getMessage() and "/v1/completions" in record.getMessage()


def test_any_model_name_unless_strict(srv, tok):
    r = post(srv, {"model": "gpt-4o-mini", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    app = create_app(lambda: FakeEngine(tok), tok, ServeConfig(MODEL, strict_model_name=True))
    with BackgroundServer(app) as strict:
        assert error(post(strict, {"model": "gpt-4o-mini", "prompt": "a"}), 404)["code"] == \
            "model_not_found"


def test_health_is_degraded_while_the_pipeline_is_silent_and_metrics_count_stalls(srv):
    engine = srv.server.config.app.state.holder.engine
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    engine.silent_s, engine.stalled = 10.0, 3
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["silent_s"] == 10
        assert "mdi_stalled_sequences_cancelled 3.0" in httpx.get(srv.url + "/metrics").text
    finally:
        engine.silent_s, engine.stalled = 0.0, 0


def test_large_bodies_do_not_pause_the_streams(tok):
    """Issue 25.2: a 7.8 MB prompt of 3.9 M ids, parsed and checked on the event loop,
    paused every stream 2.2 s. Now a body past the size a prompt of the context can need
    (1 MiB here) is refused unread (413), and one below it is prepared on the parsing
    thread and refused from its length (400): a stream running meanwhile keeps its pace."""
    app = create_app(lambda: FakeEngine(tok, step_s=0.005), tok, ServeConfig(MODEL, context=CONTEXT))
    huge = json.dumps({"model": MODEL, "prompt": [1] * 3_900_000}, separators=(",", ":")).encode()
    large = json.dumps({"model": MODEL, "prompt": [1] * 500_000}, separators=(",", ":")).encode()
    with BackgroundServer(app) as s, StreamGaps(s.url, MODEL) as gaps:
        time.sleep(0.05)
        answers = [httpx.post(s.url + "/v1/completions", content=body, timeout=30,
                              headers={"content-type": "application/json"}) for body in (huge, large)]
    assert error(answers[0], 413)["code"] == "request_too_large"
    assert error(answers[1])["code"] == "context_length_exceeded" and "500000" in error(answers[1])["message"]
    print(f"longest gap between chunks: {max(gaps):.3f} s")
    assert max(gaps) < 0.5, max(gaps)


def test_a_stream_nobody_reads_is_held_in_a_small_buffer(tok):
    """Issue 25.4: Linux grows a send buffer to 4 MB, so the server took ~20,000 events of
    a stream whose client never read (kernel memory, and compute: a real sequence pauses
    only once its writes block). The API port keeps a connection's answers in about
    SEND_BUFFER: the server stops taking the stream's events after ~100 KB of them."""
    engine = FakeEngine(tok, step_s=0.0005)
    app = create_app(lambda: engine, tok, ServeConfig(MODEL, context=10 ** 6))
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 10 ** 6 - 8, "stream": True})
    with BackgroundServer(app) as srv, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((srv.host, srv.port))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (engine.handles and engine.handles[0].queue.qsize() >= 500):
            time.sleep(0.05)
        waiting = engine.handles[0].queue.qsize()
        taken = engine.handles[0].stats.n_generated - waiting
    assert waiting >= 500, f"the server took {taken} events and was still taking"
    assert taken < 3000


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    import argparse

    from mdi.cli.serve import api_key_of

    f = tmp_path / "key"
    f.write_text("from-file\n")
    monkeypatch.setenv("MDI_API_KEY", "from-env")
    assert api_key_of(argparse.Namespace(api_key_file=str(f), api_key=None)) == "from-file"
    assert api_key_of(argparse.Namespace(api_key_file=None, api_key=None)) == "from-env"
    monkeypatch.delenv("MDI_API_KEY")
    assert api_key_of(argparse.Namespace(api_key_file=None, api_key=None)) is None
    f.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        api_key_of(argparse.Namespace(api_key_file=str(f), api_key=None))
