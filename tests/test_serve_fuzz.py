"""Property-based: generated request bodies against the API in-process (the app over the
fake engine, through ASGI, no sockets). Whatever the body, the answer is a 2xx or 4xx
with OpenAI's error shape, never a 500, and a stream never carries an internal error.

MDI_FUZZ_EXAMPLES sets the number of bodies per endpoint (default 300, ~10 s; the
issue's 10,000 were run with MDI_FUZZ_EXAMPLES=5000)."""
from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdi.serve import ServeConfig, create_app
from serve_fakes import ChatCharTokenizer, FakeEngine

MODEL = "tiny-char"
EXAMPLES = int(os.environ.get("MDI_FUZZ_EXAMPLES", "300"))

leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 70),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
anything = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ids = st.lists(st.integers(-2, 80), max_size=70)
prompt = st.one_of(st.text(max_size=80), ids, st.lists(st.text(max_size=12), max_size=5),
                   st.lists(ids, max_size=4), anything)
part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                 st.dictionaries(st.sampled_from(["type", "text", "image_url"]), anything, max_size=3))
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), anything)},
    optional={"content": st.one_of(st.text(max_size=40), st.lists(part, max_size=3), anything),
              "name": st.text(max_size=5)})
COMMON = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=10), anything),
    "max_tokens": st.one_of(st.integers(-2, 80), anything),
    "temperature": st.one_of(st.floats(-1, 3), anything),
    "top_p": st.one_of(st.floats(-0.5, 1.5), anything),
    "top_k": st.one_of(st.integers(-1, 2 ** 32), anything),
    "seed": st.one_of(st.integers(-1, 2 ** 64), anything),
    "n": st.one_of(st.integers(-1, 20), anything),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=6), anything),
    "stream": st.one_of(st.booleans(), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "presence_penalty": st.one_of(st.just(0), anything),
    "logit_bias": anything,
    "user": anything,
}
extra = st.dictionaries(st.text(max_size=10), anything, max_size=2)


def bodies(required: dict, optional: dict) -> st.SearchStrategy[bytes]:
    objects = st.builds(lambda d, e: {**e, **d},
                        st.fixed_dictionaries(required, optional={**COMMON, **optional}), extra)
    return st.one_of(objects.map(lambda d: json.dumps(d).encode()),
                     anything.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40))


COMPLETION = bodies({"prompt": prompt}, {"echo": anything, "best_of": anything, "suffix": anything})
CHAT = bodies({"messages": st.lists(message, max_size=4)},
              {"max_completion_tokens": st.one_of(st.integers(-1, 80), anything),
               "response_format": anything, "tools": anything, "logprobs": anything})


@pytest.fixture(scope="module")
def api(char_tokenizer):
    """(loop, client) over the app; the lifespan runs for the module."""
    tok = ChatCharTokenizer(char_tokenizer.itos)
    app = create_app(lambda: FakeEngine(tok, step_s=0, queue=1000), tok, ServeConfig(MODEL, context=64))
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    yield loop, client
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.close()


def check(api, path: str, body: bytes) -> None:
    loop, client = api
    r = loop.run_until_complete(client.post(path, content=body, timeout=30,
                                            headers={"content-type": "application/json"}))
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    else:
        assert r.json()["choices"] and r.json()["model"] == MODEL


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=COMPLETION)
def test_completions_never_500(api, body):
    check(api, "/v1/completions", body)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=CHAT)
def test_chat_never_500(api, body):
    check(api, "/v1/chat/completions", body)
