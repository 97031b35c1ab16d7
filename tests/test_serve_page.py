"""The chat page at `/` in a real headless Chromium (driven over the DevTools pipe):
type a message, see the reply stream in, keep the conversation (also across a reload),
the system prompt, the thinking indicator, invalid settings and failed requests."""
from __future__ import annotations

import json
import os
import re
import shutil
import string
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cdp_pipe import Browser, find_chromium
from mdi.engine.api import Event
from mdi.serve import BackgroundServer, ServeConfig, create_app
from serve_fakes import ChatCharTokenizer, FakeEngine, greedy_text

in_chromium = pytest.mark.skipif(find_chromium() is None,
                                 reason="chromium is not installed (Debian: apt-get install chromium)")
STATIC = Path(__file__).parent.parent / "mdi" / "serve" / "static"
TOK = ChatCharTokenizer(sorted(set(string.printable)))
STATE = """(() => { const q = (s) => [...document.querySelectorAll(s)]; return JSON.stringify({
  state: document.body.dataset.state, model: document.getElementById('model').textContent,
  replies: q('.msg.assistant .content').map(e => e.querySelector('.thinking') ? '' : e.textContent),
  users: q('.msg.user .content').map(e => e.textContent),
  errors: q('.msg.error').map(e => e.textContent), thinking: q('.thinking').length,
  saved: JSON.parse(localStorage.getItem('mdi-chat') || 'null')}) })()"""
# every request body the page sends, recorded in the page (installed after each load)
RECORD = """window.__bodies = []; const fetch0 = window.fetch;
window.fetch = (url, opts) => { if (opts && opts.body) __bodies.push(JSON.parse(opts.body));
                                return fetch0(url, opts); }"""


class ScriptedEngine(FakeEngine):
    """FakeEngine that can reply with a fixed `script` (one character a step, whatever
    the prompt) and hold every sequence back while `gate` is clear."""

    def __init__(self, tok: ChatCharTokenizer, script: str | None = None,
                 gate: threading.Event | None = None, **kw) -> None:
        super().__init__(tok, **kw)
        self.script, self.gate = script, gate

    def _step(self, h) -> None:
        if self.gate is not None and not self.gate.is_set() and not h.cancelled:
            return
        if self.script is None or h.cancelled:
            return super()._step(h)
        ch = self.script[h.stats.n_generated]
        h.stats.n_generated += 1
        h.queue.put_nowait(Event(token=self.tok.encode(ch)[0], text=ch))
        if h.stats.n_generated == len(self.script):
            self._finish(h, "stop")

    def prompts(self) -> list[str]:
        return [self.tok.decode(h.prompt) for h in self.handles]


@contextmanager
def chat_page(tmp_path: Path, factory: Callable[[], FakeEngine], **config) -> Iterator[tuple[Browser, str]]:
    app = create_app(factory, TOK, ServeConfig(model_name="tiny-char", **config))
    with BackgroundServer(app) as srv:
        browser = Browser(find_chromium(), tmp_path / "profile")
        try:
            browser.open(srv.url + "/")
            browser.eval(RECORD)
            yield browser, srv.url
        finally:
            browser.close()


def state(browser: Browser) -> dict:
    return json.loads(browser.eval(STATE))


def poll(browser: Browser, cond, timeout: float = 20.0) -> list[dict]:
    """Page states, every ~20 ms, until cond(state) holds; all of them, to look for partial text."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        seen.append(state(browser))
        if cond(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"page never reached the state; last: {seen[-1]}"
        time.sleep(0.02)


def type_into(browser: Browser, element_id: str, text: str) -> None:
    """Replace a field's text as typing would (input events fire)."""
    browser.eval(f"document.getElementById('settings').open = true;"
                 f"document.getElementById({element_id!r}).focus();"
                 f"document.getElementById({element_id!r}).select()")
    if text:
        browser.type_text(text)
    else:
        browser.eval("document.execCommand('delete')")


def send(browser: Browser, text: str) -> None:
    browser.eval("document.getElementById('input').focus()")
    browser.type_text(text)
    browser.press_enter()


def test_chat_page_assets_are_served_and_build_no_html():
    """Without a browser: every file the page names is served, and no script of the page
    turns text into HTML (the Markdown renderer builds DOM nodes; see the tests below)."""
    with BackgroundServer(create_app(lambda: FakeEngine(TOK), TOK, ServeConfig(model_name="m"))) as srv:
        page = urllib.request.urlopen(srv.url + "/").read().decode()
        names = re.findall(r'(?:src|href)="(static/[^"]+)"', page)
        assert {"static/chat.js", "static/markdown.js", "static/settings.js", "static/chat.css"} <= {*names}
        for name in names:
            assert urllib.request.urlopen(f"{srv.url}/{name}").status == 200, name
    sinks = re.compile(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function")
    for script in STATIC.glob("*.js"):
        assert not sinks.search(script.read_text()), f"{script.name}: {sinks.search(script.read_text())}"


def keep_shot(browser: Browser, tmp_path: Path, name: str) -> Path:
    """A screenshot, copied to $MDI_SCREENSHOT_DIR when set (to look at the layout)."""
    shot = browser.screenshot(tmp_path / name)
    assert shot.stat().st_size > 5000
    if where := os.environ.get("MDI_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(where) / name)
    return shot


def squeeze(text: str) -> str:
    """Text without whitespace: paragraphs drop a reply's trailing newline when rendered."""
    return "".join(text.split())


@pytest.mark.slow
@in_chromium
def test_chat_page_streams_in_chromium(tmp_path):
    engines: list[FakeEngine] = []

    def factory() -> FakeEngine:  # slow enough steps that streaming is visible: ~25 tokens/s
        engines.append(FakeEngine(TOK, step_s=0.04))
        return engines[-1]

    with chat_page(tmp_path, factory, api_key="page-key") as (browser, _):
        poll(browser, lambda s: "key" in s["model"].lower())
        type_into(browser, "api-key", "page-key")
        type_into(browser, "temperature", "0")
        type_into(browser, "max-tokens", "40")
        browser.eval("document.getElementById('input').focus()")   # the key field's change event
        poll(browser, lambda s: s["model"] == "tiny-char")
        # the key is kept for this tab only: never in localStorage
        assert browser.eval("sessionStorage.getItem('mdi-api-key')") == "page-key"
        assert "page-key" not in browser.eval("JSON.stringify(localStorage)")

        send(browser, "Hello there")
        seen = poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 1 and s["replies"][0])
        first = greedy_text(TOK.encode("user: Hello there\nassistant:"), 40)
        assert squeeze(seen[-1]["replies"][0]) == squeeze(first) and not seen[-1]["errors"]
        assert seen[-1]["saved"]["messages"][-1]["content"] == first
        partial = [s["replies"][0] for s in seen if s["state"] == "streaming" and s["replies"]
                   and 0 < len(squeeze(s["replies"][0])) < len(squeeze(first))]
        assert len(set(partial)) >= 3, "the reply did not appear piece by piece"
        assert all(squeeze(first).startswith(squeeze(p)) for p in partial)
        body = browser.eval("__bodies")[-1]
        assert body["temperature"] == 0 and body["max_tokens"] == 40 and "top_p" not in body

        # the second turn is generated from the whole conversation
        send(browser, "And you")
        seen = poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 2 and s["replies"][1])
        convo = f"user: Hello there\nassistant: {first}\nuser: And you\nassistant:"
        assert seen[-1]["saved"]["messages"][-1]["content"] == greedy_text(TOK.encode(convo), 40)

        # stop: a long reply (as long as the 2048-token context allows), stopped after some
        # text; the server cancels its sequence
        type_into(browser, "max-tokens", "1500")
        send(browser, "Tell me more")
        poll(browser, lambda s: len(s["replies"]) == 3 and len(s["replies"][2]) >= 5)
        browser.eval("document.getElementById('stop').click()")
        poll(browser, lambda s: s["state"] == "idle")
        deadline = time.monotonic() + 5
        while not (engines[-1].handles[-1].cancelled and engines[-1].running == 0):
            assert time.monotonic() < deadline, "stopping in the page did not cancel the sequence"
            time.sleep(0.02)


@pytest.mark.slow
@in_chromium
def test_chat_page_system_prompt_thinking_and_reload(tmp_path):
    gate = threading.Event()
    engine = ScriptedEngine(TOK, gate=gate, step_s=0.01)
    with chat_page(tmp_path, lambda: engine) as (browser, _):
        poll(browser, lambda s: s["model"] == "tiny-char")
        # the sampling fields are empty by default: the model's defaults apply
        assert browser.eval("['max-tokens', 'temperature', 'top-p'].map(i => "
                            "document.getElementById(i).value + '|' + document.getElementById(i).placeholder)"
                            ) == ["|model default"] * 3
        type_into(browser, "system", "Answer briefly.")
        type_into(browser, "temperature", "0")
        send(browser, "Hello there")
        # until the first token: the thinking indicator, no reply text
        s = poll(browser, lambda s: s["state"] == "thinking" and s["thinking"] == 1)[-1]
        assert s["replies"] == [""] and s["users"] == ["Hello there"]
        keep_shot(browser, tmp_path, "chat-thinking.png")
        time.sleep(0.3)
        assert state(browser)["thinking"] == 1 and engine.handles[-1].stats.n_generated == 0
        gate.set()
        s = poll(browser, lambda s: s["state"] == "idle" and s["replies"][-1])[-1]
        assert s["thinking"] == 0
        prompt = "system: Answer briefly.\nuser: Hello there\nassistant:"
        assert engine.prompts() == [prompt]
        first = s["saved"]["messages"][1]["content"]   # as long as the server's default allows
        assert first and first == greedy_text(TOK.encode(prompt), len(first))
        assert s["saved"]["messages"] == [{"role": "user", "content": "Hello there"},
                                          {"role": "assistant", "content": first,
                                           "note": "(token limit reached)"}]
        body = browser.eval("__bodies")[-1]
        assert body["temperature"] == 0 and "max_tokens" not in body and "top_p" not in body
        assert body["messages"][0] == {"role": "system", "content": "Answer briefly."}

        # a reload shows the conversation and the settings, and the next turn carries on from them
        browser.reload()
        s = poll(browser, lambda s: s["model"] == "tiny-char")[-1]
        assert s["users"] == ["Hello there"] and squeeze(s["replies"][0]) == squeeze(first)
        assert browser.eval("document.getElementById('system').value") == "Answer briefly."
        assert browser.eval("document.getElementById('temperature').value") == "0"
        send(browser, "Thanks")
        poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 2 and s["replies"][1])
        assert engine.prompts()[-1] == f"{prompt} {first}\nuser: Thanks\nassistant:"

        # a new conversation forgets the turns (also after a reload) but keeps the system prompt
        browser.eval("document.getElementById('clear').click()")
        browser.reload()
        s = state(browser)
        assert s["users"] == [] and s["replies"] == [] and s["saved"]["messages"] == []
        assert browser.eval("document.getElementById('system').value") == "Answer briefly."
        browser.eval(RECORD)
        send(browser, "Hi")
        poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 1 and s["replies"][0])
        assert engine.prompts()[-1] == "system: Answer briefly.\nuser: Hi\nassistant:"


@pytest.mark.slow
@in_chromium
def test_chat_page_invalid_settings_and_failed_requests(tmp_path):
    engines: list[FakeEngine] = []

    def factory() -> FakeEngine:   # the first engine fails at submit, the second after a token
        engines.append(ScriptedEngine(TOK, script="Fine.", fail_submit=len(engines) == 0,
                                      fail_after=1 if len(engines) == 1 else None))
        return engines[-1]

    def field_error(name: str) -> str:
        return browser.eval(f"document.getElementById('{name}-error').textContent")

    with chat_page(tmp_path, factory) as (browser, _):
        poll(browser, lambda s: s["model"] == "tiny-char")
        type_into(browser, "temperature", "warm")
        assert field_error("temperature") == '"warm" is not a number (empty: the model\'s default)'
        type_into(browser, "temperature", "3")
        assert "from 0 to 2" in field_error("temperature")
        type_into(browser, "top-p", "0")
        assert "more than 0" in field_error("top-p")
        type_into(browser, "max-tokens", "2.5")
        assert "whole number" in field_error("max-tokens")
        keep_shot(browser, tmp_path, "chat-invalid.png")
        # sending is refused with the error in view: nothing is sent, the text stays
        browser.eval("document.getElementById('settings').open = false")
        send(browser, "Hello")
        assert browser.eval("document.getElementById('settings').open") is True
        assert browser.eval("document.activeElement.id") == "max-tokens"
        assert browser.eval("document.getElementById('input').value") == "Hello"
        assert browser.eval("__bodies") == [] and state(browser)["users"] == []

        # fixed (emptied: the model's default): the errors go, the request leaves the field out
        for name, value in (("temperature", "0.5"), ("top-p", ""), ("max-tokens", "")):
            type_into(browser, name, value)
            assert field_error(name) == ""
        browser.eval("document.getElementById('input').focus()")
        browser.press_enter()
        # the engine fails: the error is shown in the bubble, not an empty one, and the
        # message goes back to the input, out of the conversation
        s = poll(browser, lambda s: s["state"] == "idle" and s["errors"])[-1]
        assert "engine failure at node node-2" in s["errors"][0]
        keep_shot(browser, tmp_path, "chat-error.png")
        assert s["replies"] == [] and not (s["saved"] or {}).get("messages")
        assert browser.eval("document.querySelector('.msg.user').classList.contains('unsent')")
        assert browser.eval("document.getElementById('input').value") == "Hello"
        assert browser.eval("__bodies")[-1] == {"model": "tiny-char", "stream": True, "temperature": 0.5,
                                                "messages": [{"role": "user", "content": "Hello"}]}
        # failing after some text: the text stays, with the error under it
        poll(browser, lambda s: len(engines) == 2 and engines[1].started, timeout=10)
        browser.eval("document.getElementById('input').focus()")
        browser.press_enter()
        s = poll(browser, lambda s: s["state"] == "idle" and s["replies"])[-1]
        assert s["replies"] == ["F"] and len(s["errors"]) == 1   # the earlier one
        failed = browser.eval("document.querySelector('.meta.failed').textContent")
        assert "engine failure at node node-2" in failed
        assert s["saved"]["messages"][-1]["failed"] is True
        poll(browser, lambda s: len(engines) == 3 and engines[2].started, timeout=10)
        send(browser, "Again")
        s = poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 2)[-1]
        assert s["replies"][1] == "Fine."
        assert engines[2].prompts() == ["user: Hello\nassistant: F\nuser: Again\nassistant:"]


MARKDOWN = [   # (the model's text, the HTML that the page's renderer builds from it)
    ("**bold**, *it*, _it_ and `a<b`",
     "<p><strong>bold</strong>, <em>it</em>, <em>it</em> and <code>a&lt;b</code></p>"),
    ("snake_case_name, 2 * 3 * 4, \\*x\\*", "<p>snake_case_name, 2 * 3 * 4, *x*</p>"),
    ("***both*** `` a`b `` `open", "<p><strong><em>both</em></strong> <code>a`b</code> `open</p>"),
    ("- a\n- b\n  - c\n\n3. three\n4. four",
     '<ul><li><p>a</p></li><li><p>b</p><ul><li><p>c</p></li></ul></li></ul>'
     '<ol start="3"><li><p>three</p></li><li><p>four</p></li></ol>'),
    ("```py\nif a < b:\n    print('<b>')\n```\nafter",
     "<pre><code data-lang=\"py\">if a &lt; b:\n    print('&lt;b&gt;')</code></pre><p>after</p>"),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ("# Title\n> quoted\n\n---\nline one\nline two",
     "<h1>Title</h1><blockquote><p>quoted</p></blockquote><hr><p>line one\nline two</p>"),
    ("[site](https://example.com/x?a=1&b=2) [bad](javascript:alert(1)) <http://e.org/> see https://e.org/a.",
     '<p><a href="https://example.com/x?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">site</a> '
     '[bad](javascript:alert(1)) <a href="http://e.org/" target="_blank" rel="noopener noreferrer">'
     'http://e.org/</a> see <a href="https://e.org/a" target="_blank" rel="noopener noreferrer">'
     'https://e.org/a</a>.</p>'),
    ('<img src=x onerror="alert(1)"><script>x</script>',
     '<p>&lt;img src=x onerror="alert(1)"&gt;&lt;script&gt;x&lt;/script&gt;</p>'),
]
INJECTION = ('Hi <img src=x onerror="window.pwned=1"> **bold**\n\n'
             '```html\n<script>window.pwned=2</script>\n```\n\n'
             '- [x](javascript:window.pwned=3)\n- [ok](https://example.com/a)\n')
INSPECT = """JSON.stringify({pwned: window.pwned === undefined ? null : window.pwned,
  tags: [...document.querySelectorAll('#log *')].map(e => e.tagName.toLowerCase()),
  links: [...document.querySelectorAll('#log a')].map(a => [a.getAttribute('href'), a.rel, a.target]),
  text: [...document.querySelectorAll('.msg .content')].map(e => e.textContent)})"""
PLACEHOLDERS = """(() => { const ctx = document.createElement('canvas').getContext('2d');
  return ['input', 'max-tokens', 'temperature', 'top-p', 'api-key', 'system'].map((id) => {
    const e = document.getElementById(id), cs = getComputedStyle(e);
    ctx.font = cs.font;
    return [id, ctx.measureText(e.placeholder).width,
            e.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)]; }); })()"""


@pytest.mark.slow
@in_chromium
def test_chat_page_renders_markdown_safely(tmp_path):
    engine = ScriptedEngine(TOK, script=INJECTION)
    with chat_page(tmp_path, lambda: engine) as (browser, _):
        got = browser.eval(f"""{json.dumps([md for md, _ in MARKDOWN])}.map((md) => {{
            const div = document.createElement('div'); div.appendChild(mdiMarkdown.render(md));
            return div.innerHTML; }})""")
        assert got == [html for _, html in MARKDOWN]

        # the model's reply (and the user's text) reach the page as text: no element, no script
        poll(browser, lambda s: s["model"] == "tiny-char")
        send(browser, "<b>me</b>")
        poll(browser, lambda s: s["state"] == "idle" and s["replies"] and s["replies"][0])
        for when in ("streamed", "reloaded"):
            page = json.loads(browser.eval(INSPECT))
            assert page["pwned"] is None, when
            assert not {"img", "script", "b"} & set(page["tags"]), when
            assert {"strong", "pre", "code", "ul", "li", "a"} <= set(page["tags"]), when
            assert page["links"] == [["https://example.com/a", "noopener noreferrer", "_blank"]], when
            assert page["text"][0] == "<b>me</b>"
            assert '<img src=x onerror="window.pwned=1">' in page["text"][1]
            assert "<script>window.pwned=2</script>" in page["text"][1]
            assert "[x](javascript:window.pwned=3)" in page["text"][1]
            browser.reload()
            poll(browser, lambda s: s["model"] == "tiny-char")

        # the layout, narrow and wide, with the settings open and a field in error
        type_into(browser, "temperature", "hot")
        for width, mobile in ((375, True), (1000, False)):
            browser.set_viewport(width, 720, mobile)
            assert browser.eval("document.documentElement.scrollWidth") <= width, "the page scrolls sideways"
            for name, need, room in browser.eval(PLACEHOLDERS):
                assert need <= room, f"the placeholder of #{name} is clipped at {width} px"
            keep_shot(browser, tmp_path, f"chat-{width}.png")
