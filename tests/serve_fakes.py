"""A small deterministic engine for the API server's tests (the contract: mdi/engine/api.py).

It "generates" a fixed script of characters, rotated by the prompt (greedy) or drawn
with a seeded RNG (temperature > 0), one token per sequence per step, for up to
`max_seqs` sequences at a time with a bounded queue behind them, and applies stop
strings, stop ids and the token budget the way the contract says. It can be told to
fail (EngineFailure naming a node) at submit or after some tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import random
from typing import AsyncIterator

from mdi.engine.api import EngineBusy, EngineFailure, Event, SeqParams, SeqStats
from mdi.tokenizer import CharTokenizer

SCRIPT = "Hello there, friend! How are you today?\nWell, I thank you.\n"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


class ChatCharTokenizer(CharTokenizer):
    """A char tokenizer that carries a chat template, as HF tokenizers do."""
    chat_template = CHAT_TEMPLATE


def greedy_text(prompt: list[int], n: int) -> str:
    """What FakeEngine produces greedily for `prompt` in n tokens (no stop)."""
    off = sum(prompt) % len(SCRIPT)
    return "".join(SCRIPT[(off + i) % len(SCRIPT)] for i in range(n))


class FakeHandle:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SeqParams) -> None:
        self.id = next(self._ids)
        self.prompt, self.params = prompt, params
        self.stats = SeqStats(n_prompt=len(prompt))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rng = random.Random(params.seed)
        self.pending = ""             # text held back while a stop string may begin
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class FakeEngine:
    def __init__(self, tok: CharTokenizer, *, max_seqs: int = 8, queue: int = 64, step_s: float = 0.001,
                 fail_submit: bool = False, fail_after: int | None = None, node: str = "node-2",
                 retry_after: float = 3.0) -> None:
        self.tok, self.max_seqs, self.max_queue, self.step_s = tok, max_seqs, queue, step_s
        self.fail_submit, self.fail_after, self.node = fail_submit, fail_after, node
        self.retry_after = retry_after
        self.waiting: list[FakeHandle] = []
        self.active: list[FakeHandle] = []
        self.handles: list[FakeHandle] = []   # every handle ever submitted (for assertions)
        self.steps = 0
        self.silent_s = 0.0                   # as PipelineEngine's: set by tests
        self.stalled = 0
        self.started = self.closed = False
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    async def start(self) -> None:
        self.started = True
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, prompt: list[int], params: SeqParams) -> FakeHandle:
        if self.fail_submit:
            raise EngineFailure("connection to the node was reset", node=self.node)
        if len(self.active) + len(self.waiting) >= self.max_seqs + self.max_queue:
            raise EngineBusy("the admission queue is full", retry_after=self.retry_after)
        h = FakeHandle(list(prompt), params)
        self.waiting.append(h)
        self.handles.append(h)
        return h

    async def _loop(self) -> None:
        while True:
            while self.waiting and len(self.active) < self.max_seqs:
                self.active.append(self.waiting.pop(0))
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                self._finish(h, "cancelled")
            for h in list(self.active):
                self._step(h)
            self.active = [h for h in self.active if not h.done]
            self.steps += 1
            if self.fail_after is not None and self.steps >= self.fail_after and self.active:
                err = EngineFailure("the node stopped answering", node=self.node)
                for h in self.active:
                    h.done = True
                    h.queue.put_nowait(err)
                self.active = []
            await asyncio.sleep(self.step_s)

    def _finish(self, h: FakeHandle, reason: str, text: str = "") -> None:
        h.done = True
        h.queue.put_nowait(Event(token=None, text=text, finish_reason=reason))

    def _step(self, h: FakeHandle) -> None:
        if h.cancelled:
            self._finish(h, "cancelled")
            return
        p, n = h.params, h.stats.n_generated
        if p.temperature == 0:
            ch = SCRIPT[(sum(h.prompt) + n) % len(SCRIPT)]
        else:
            ch = h.rng.choice(SCRIPT)
        token = self.tok.encode(ch)[0]
        h.stats.n_generated += 1
        if token in p.stop_ids:
            self._finish(h, "stop", h.pending)
            return
        h.pending += ch
        for s in p.stop:
            at = h.pending.find(s)
            if at >= 0:
                h.queue.put_nowait(Event(token=token, text=h.pending[:at]))
                self._finish(h, "stop")
                return
        keep = max((k for s in p.stop for k in range(1, len(s)) if h.pending.endswith(s[:k])),
                   default=0)
        out, h.pending = h.pending[:len(h.pending) - keep], h.pending[len(h.pending) - keep:]
        h.queue.put_nowait(Event(token=token, text=out))
        if h.stats.n_generated >= p.max_tokens:
            self._finish(h, "length", h.pending)
