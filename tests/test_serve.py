"""The OpenAI-compatible API (mdi.serve) with the official `openai` client, in-process
(uvicorn in a thread on a free loopback port) over a deterministic fake engine."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mdi.serve import BackgroundServer, ServeConfig, create_app
from serve_fakes import ChatCharTokenizer, FakeEngine, greedy_text

MODEL = "tiny-char"


@pytest.fixture(scope="module")
def tok(char_tokenizer) -> ChatCharTokenizer:
    return ChatCharTokenizer(char_tokenizer.itos)


def make_server(tok, factory=None, **config):
    factory = factory or (lambda: FakeEngine(tok))
    return BackgroundServer(create_app(factory, tok, ServeConfig(model_name=MODEL, **config)))


@pytest.fixture(scope="module")
def server(tok):
    with make_server(tok) as srv:
        yield srv


def client(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def engine_of(srv) -> FakeEngine:
    return srv.server.config.app.state.holder.engine


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- completions ------------------------------------------------------------------------------

def test_models(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")


def test_completion_greedy_usage_and_length(server, tok):
    r = client(server).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0)
    ids = tok.encode("ROMEO:")
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == greedy_text(ids, 20)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 20, 26)


def test_completion_stream_equals_whole(server, tok):
    chunks = list(client(server).completions.create(
        model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_text(tok.encode("ROMEO:"), 20)
    assert len(chunks) >= 20                          # streamed token by token, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == 6 and chunks[-1].usage.total_tokens == 26


def test_stop_strings(server, tok):
    prompt = tok.encode("a")
    full = greedy_text(prompt, 60)
    assert "friend" in full
    c = client(server)
    r = c.completions.create(model=MODEL, prompt="a", max_tokens=60, temperature=0, stop="friend")
    assert r.choices[0].text == full[:full.index("friend")] and r.choices[0].finish_reason == "stop"
    r2 = c.completions.create(model=MODEL, prompt="a", max_tokens=60, temperature=0, stop=["zzz", "How"])
    assert r2.choices[0].text == full[:full.index("How")]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="a", max_tokens=60, temperature=0, stop="friend", stream=True))
    assert streamed == r.choices[0].text


def test_n_choices_seeded_and_streamed(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="To be", max_tokens=12, temperature=1.0, seed=5, n=3)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]   # seeded: reproducible
    assert len({ch.text for ch in a.choices}) == 3                          # choices differ
    assert a.usage.completion_tokens == 36 and a.usage.prompt_tokens == 5
    texts = ["", "", ""]
    for chunk in c.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == [ch.text for ch in a.choices]


def test_prompt_list_and_token_ids(server, tok):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=5, temperature=0)
    assert [ch.text for ch in r.choices] == [greedy_text(tok.encode(p), 5) for p in ("ab", "cd")]
    ids = tok.encode("my")
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy_text(ids, 5)


# -- chat -------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_chat(server, tok):
    rendered = "system: Be brief.\nuser: Hi there\nassistant:"
    r = client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=15,
                                               temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(tok.encode(rendered), 15)
    assert r.usage.prompt_tokens == len(rendered) and r.usage.completion_tokens == 15
    r2 = client(server).chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                max_completion_tokens=4)
    assert r2.choices[0].message.content == greedy_text(tok.encode(rendered), 4)


def test_chat_stream(server, tok):
    rendered = "system: Be brief.\nuser: Hi there\nassistant:"
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(tok.encode(rendered), 15)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.prompt_tokens == len(rendered) and chunks[-1].usage.completion_tokens == 15


def test_chat_content_parts(server, tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = client(server).chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0)
    assert r.choices[0].message.content == greedy_text(tok.encode("user: Hi there\nassistant:"), 3)


def test_chat_bos_written_by_the_template_is_not_doubled(char_tokenizer):
    class BosTok(ChatCharTokenizer):
        chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        bos_token = "!"

        def __init__(self, vocab):
            super().__init__(vocab)
            self.bos_id = self.stoi["!"]

        def encode(self, text):  # adds BOS, as HF tokenizers with add_bos_token do
            return [self.bos_id] + super().encode(text)

    tok = BosTok(char_tokenizer.itos)
    with make_server(tok) as srv:
        r = client(srv).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens == 3                       # "!Hi", one BOS
        assert r.choices[0].message.content == greedy_text(tok.encode("Hi"), 3)


def test_chat_without_template_is_400(char_tokenizer):
    with make_server(char_tokenizer) as srv:
        with pytest.raises(openai.BadRequestError) as e:
            client(srv).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert "no chat template" in e.value.message and e.value.param == "messages"
        assert client(srv).completions.create(model=MODEL, prompt="a", max_tokens=2).choices


def test_chat_template_override_and_its_refusals(char_tokenizer):
    tpl = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be from "
           "the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with make_server(char_tokenizer, chat_template=tpl) as srv:
        with pytest.raises(openai.BadRequestError) as e:
            client(srv).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert "first message must be from the user" in e.value.message and e.value.param == "messages"
        r = client(srv).chat.completions.create(model=MODEL, messages=MESSAGES[1:], max_tokens=4,
                                                temperature=0)
        assert r.choices[0].message.content == greedy_text(char_tokenizer.encode("Hi there\n"), 4)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=1), "frequency_penalty"),
    (dict(logprobs=2), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(extra_body={"top_k": 0}), "top_k"),
    (dict(extra_body={"top_k": 2**31}), "top_k"),  # more than a node accepts in ADMIT
    (dict(seed=-1), "seed"),
    (dict(extra_body={"repetition_penalty": 1.2}), "repetition_penalty"),
])
def test_completion_400_names_the_field(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=MODEL, prompt="a", **kwargs)
    assert e.value.status_code == 400 and e.value.param == param, e.value.message
    assert param in e.value.message


@pytest.mark.parametrize("kwargs, param", [
    (dict(logprobs=True), "logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(presence_penalty=1.0), "presence_penalty"),
    (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    (dict(messages=[]), "messages"),
])
def test_chat_400_names_the_field(server, kwargs, param):
    kwargs = {"messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, **kwargs)
    assert e.value.param == param, e.value.message


def test_error_shape_unknown_model_and_bad_json(server, tok):
    with make_server(tok, strict_model_name=True) as strict:
        r = httpx.post(strict.url + "/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "\u00e9\u4e2d"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_body_size_limit(tok):
    with make_server(tok, max_body_bytes=1000) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "a" * 2000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200


def test_api_key(tok):
    with make_server(tok, api_key="s3cret") as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            client(srv, "wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(srv, "s3cret").completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        assert httpx.get(srv.url + "/health").status_code == 200   # health and the page are open
        assert httpx.get(srv.url + "/").status_code == 200


def test_busy_is_429_with_retry_after(tok):
    engine = {}

    def factory():
        engine["e"] = FakeEngine(tok, max_seqs=1, queue=0, step_s=0.01, retry_after=3)
        return engine["e"]

    with make_server(tok, factory) as srv:
        c = client(srv)
        stream = c.completions.create(model=MODEL, prompt="a", max_tokens=1000, stream=True)
        next(iter(stream))                                   # the only slot is taken
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "3"
        assert e.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):           # n=2 on a full engine: all or nothing
            c.completions.create(model=MODEL, prompt="b", max_tokens=2, n=2)
        stream.close()
        wait_for(lambda: engine["e"].running == 0)
        assert c.completions.create(model=MODEL, prompt="b", max_tokens=2).choices[0].text


def test_failure_is_500_naming_the_node_then_rebuilds(tok):
    built = []

    def factory():
        built.append(FakeEngine(tok, fail_submit=len(built) == 0, node="node-2"))
        return built[-1]

    with make_server(tok, factory) as srv:
        c = client(srv)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert e.value.status_code == 500 and "node-2" in e.value.message
        assert e.value.code == "engine_failure"
        wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200)
        assert len(built) == 2 and built[0].closed and not built[1].closed
        assert c.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].text
        h = httpx.get(srv.url + "/health").json()
        assert h["engine_builds"] == 2 and "node-2" in h["last_failure"]
        assert "mdi_engine_failures_total 1.0" in httpx.get(srv.url + "/metrics").text


def test_failure_mid_stream_is_an_error_event(tok):
    built = []

    def factory():
        built.append(FakeEngine(tok, fail_after=5 if not built else None, node="node-3", step_s=0.005))
        return built[-1]

    with make_server(tok, factory) as srv:
        c = client(srv)
        got = []
        with pytest.raises(openai.APIError) as e:
            for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100,
                                                   stream=True):
                got.append(chunk)
        assert "node-3" in e.value.message and got            # some text came before the failure
        # non-streaming, same failure: a 500 naming the node
        wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200)
        assert len(built) == 2
        assert c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3).choices


def test_disconnect_cancels_the_sequence(tok):
    with make_server(tok, lambda: FakeEngine(tok, step_s=0.01)) as srv:
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", srv.url + "/v1/completions",
                             json={"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": True}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["object"] == "text_completion"
                engine = engine_of(srv)
                assert engine.running == 1
        # the connection is closed: the server must cancel the sequence and free its slot
        wait_for(lambda: engine.running == 0 and engine.handles[-1].cancelled)
        assert engine.handles[-1].stats.n_generated < 2000


def test_disconnect_cancels_a_non_streaming_request(tok):
    with make_server(tok, lambda: FakeEngine(tok, step_s=0.01)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"model": MODEL, "prompt": "a", "max_tokens": 2000})
        engine = engine_of(srv)
        wait_for(lambda: engine.running == 0 and engine.handles[-1].cancelled)
        assert engine.handles[-1].stats.n_generated < 1000


def test_metrics(tok):
    with make_server(tok) as srv:
        c = client(srv)
        c.completions.create(model=MODEL, prompt="a", max_tokens=7)
        list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True))
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="a", temperature=9)
        text = httpx.get(srv.url + "/metrics").text
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert float(lines["mdi_generated_tokens_total"]) == 12
        assert float(lines["mdi_prompt_tokens_total"]) == 1 + len("system: Be brief.\nuser: Hi there\nassistant:")
        assert float(lines["mdi_time_to_first_token_seconds_count"]) == 2
        assert float(lines["mdi_inter_token_latency_seconds_count"]) == 6 + 4
        assert float(lines['mdi_requests_total{endpoint="/v1/completions",status="200"}']) == 1
        assert float(lines['mdi_requests_total{endpoint="/v1/completions",status="400"}']) == 1
        assert float(lines['mdi_requests_total{endpoint="/v1/chat/completions",status="200"}']) == 1
        assert lines["mdi_running_sequences"] == "0.0" and lines["mdi_queued_sequences"] == "0.0"


def test_concurrent_streams_equal_alone(tok):
    """32 concurrent greedy streams (8 engine slots, the rest queued) each equal the request alone."""
    prompts = [f"Prompt {'abcdefgh'[i % 8]}{'ijklmnop'[i // 8]}:" for i in range(32)]
    with make_server(tok, lambda: FakeEngine(tok, max_seqs=8, step_s=0.002)) as srv:
        c = client(srv)
        alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0).choices[0].text
                 for p in prompts]

        def streamed(p: str) -> str:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt=p, max_tokens=30, temperature=0, stream=True) if ch.choices)

        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(streamed, prompts))
    assert together == alone
    assert alone[0] == greedy_text(tok.encode(prompts[0]), 30)


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    js = httpx.get(server.url + "/static/chat.js")
    assert js.status_code == 200
    for body in (r.text, js.text):
        assert "http://" not in body and "https://" not in body   # no CDN, no external fonts
    assert "v1/chat/completions" in js.text


def test_event_stream_closes_on_disconnect_even_before_the_first_chunk():
    import asyncio

    from mdi.serve.sse import EventStreamResponse

    closed = []

    async def body():
        await asyncio.sleep(3600)
        yield b"never"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(3600)      # a client that reads nothing

    async def main():
        resp = EventStreamResponse(body(), on_close=lambda: closed.append(1))
        await asyncio.wait_for(resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send), 5)

    asyncio.run(main())
    assert closed == [1]


def test_unset_sampling_values_come_from_the_model_s_defaults(tok):
    """A request that sets no temperature, top_k or top_p gets the model's own (the
    server's ServeConfig.sampling); one that sets them keeps its own; with no model
    defaults, OpenAI's temperature 1."""
    from mdi.checkpoint.sampling_defaults import SamplingDefaults

    model = SamplingDefaults(temperature=0.2, top_k=40, top_p=0.9, source="test")
    with make_server(tok, sampling=model) as srv:
        c = client(srv)
        c.completions.create(model=MODEL, prompt="ab", max_tokens=2)
        c.completions.create(model=MODEL, prompt="ab", max_tokens=2, temperature=0.0, top_p=0.5,
                             extra_body={"top_k": 3})
        got = [(h.params.temperature, h.params.top_k, h.params.top_p) for h in engine_of(srv).handles]
    assert got == [(0.2, 40, 0.9), (0.0, 3, 0.5)]
    with make_server(tok) as srv:
        client(srv).completions.create(model=MODEL, prompt="ab", max_tokens=2)
        h = engine_of(srv).handles[0]
    assert (h.params.temperature, h.params.top_k, h.params.top_p) == (1.0, None, None)
