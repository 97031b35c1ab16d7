"""The chat page at `/` in a real headless Chromium (driven over the DevTools pipe):
type a message, see the reply stream in, keep the conversation, stop a reply."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from cdp_pipe import Browser, find_chromium
from mdi.serve import BackgroundServer, ServeConfig, create_app
from serve_fakes import ChatCharTokenizer, FakeEngine, greedy_text

pytestmark = pytest.mark.slow
CHROMIUM = find_chromium()
STATE = """JSON.stringify({state: document.body.dataset.state, model: document.getElementById('model').textContent,
  replies: [...document.querySelectorAll('.msg.assistant')].map(e => e.firstChild ? e.firstChild.textContent : ''),
  errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent)})"""


def poll(browser: Browser, cond, timeout: float = 20.0) -> list[dict]:
    """Page states, every ~20 ms, until cond(state) holds; all of them, to look for partial text."""
    import json
    seen, deadline = [], time.monotonic() + timeout
    while True:
        s = json.loads(browser.eval(STATE))
        seen.append(s)
        if cond(s):
            return seen
        assert time.monotonic() < deadline, f"page never reached the state; last: {s}"
        time.sleep(0.02)


def send(browser: Browser, text: str) -> None:
    browser.eval("document.getElementById('input').focus()")
    browser.type_text(text)
    browser.press_enter()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_chat_page_streams_in_chromium(char_tokenizer, tmp_path):
    tok = ChatCharTokenizer(char_tokenizer.itos)
    engines: list[FakeEngine] = []

    def factory() -> FakeEngine:  # slow enough steps that streaming is visible: ~25 tokens/s
        engines.append(FakeEngine(tok, step_s=0.04))
        return engines[-1]

    app = create_app(factory, tok, ServeConfig(model_name="tiny-char", api_key="page-key"))
    with BackgroundServer(app) as srv:
        browser = Browser(CHROMIUM, tmp_path / "profile")
        try:
            browser.open(srv.url + "/")
            poll(browser, lambda s: "invalid" in s["model"].lower() or "key" in s["model"].lower())
            # the server wants a key: type it into the key field, then move focus (change event)
            browser.eval("document.getElementById('api-key').focus()")
            browser.type_text("page-key")
            browser.eval("document.getElementById('temperature').value = '0';"
                         "document.getElementById('max-tokens').value = '40'")
            browser.eval("document.getElementById('input').focus()")
            poll(browser, lambda s: s["model"] == "tiny-char")

            send(browser, "Hello there")
            seen = poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 1 and s["replies"][0])
            first = greedy_text(tok.encode("user: Hello there\nassistant:"), 40)
            assert seen[-1]["replies"] == [first] and not seen[-1]["errors"]
            partial = [s["replies"][0] for s in seen if s["state"] == "streaming" and s["replies"]
                       and 0 < len(s["replies"][0]) < len(first)]
            assert len(set(partial)) >= 3, "the reply did not appear piece by piece"
            assert all(first.startswith(p) for p in partial)

            # the second turn is generated from the whole conversation
            send(browser, "And you")
            seen = poll(browser, lambda s: s["state"] == "idle" and len(s["replies"]) == 2 and s["replies"][1])
            convo = f"user: Hello there\nassistant: {first}\nuser: And you\nassistant:"
            assert seen[-1]["replies"][1] == greedy_text(tok.encode(convo), 40)

            # stop: a long reply, stopped after some text; the server cancels its sequence
            browser.eval("document.getElementById('max-tokens').value = '100000'")
            send(browser, "Tell me more")
            poll(browser, lambda s: len(s["replies"]) == 3 and len(s["replies"][2]) >= 5)
            browser.eval("document.getElementById('stop').click()")
            poll(browser, lambda s: s["state"] == "idle")
            deadline = time.monotonic() + 5
            while not (engines[-1].handles[-1].cancelled and engines[-1].running == 0):
                assert time.monotonic() < deadline, "stopping in the page did not cancel the sequence"
                time.sleep(0.02)
            shot = browser.screenshot(tmp_path / "chat.png")
            assert shot.stat().st_size > 5000
            if out := os.environ.get("MDI_SCREENSHOT"):
                shutil.copy(shot, Path(out))
        finally:
            browser.close()
