"""One request's sequences on the engine: submit them all (or none), read their events
merged in arrival order, time them for the metrics, cancel what is left when the reader
goes away. Independent of HTTP; the routes in app.py translate."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine.api import Engine, EngineBusy, EngineFailure, Event, SeqHandle, SeqParams
from .metrics import ServeMetrics

log = logging.getLogger("mdi.serve")
MERGED_QUEUE = 64   # events of a request with several choices, read or not


@dataclass
class ChoiceState:
    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None
    submitted_s: float = 0.0
    last_token_s: float | None = None


class Run:
    """The sequences of one request, choice i = handles[i]."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SeqParams],
                 metrics: ServeMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.handles: list[SeqHandle] = []
        self.choices = [ChoiceState() for _ in prompts]
        try:
            for prompt, p in zip(prompts, params):
                self.choices[len(self.handles)].submitted_s = time.perf_counter()
                self.handles.append(engine.submit(prompt, p))
        except (EngineBusy, EngineFailure, ValueError):
            self.cancel()  # all or nothing: a half-admitted request holds slots for no one
            raise
        metrics.prompt.inc(sum(len(p) for p in prompts))

    @property
    def completion_tokens(self) -> int:
        return sum(c.n_tokens for c in self.choices)

    def cancel(self) -> None:
        for i, h in enumerate(self.handles):
            if self.choices[i].finish_reason is None:
                h.cancel()

    def _observe(self, i: int, ev: Event) -> None:
        c = self.choices[i]
        if ev.token is not None:
            t = time.perf_counter()
            if c.last_token_s is None:
                self.metrics.ttft.observe(t - c.submitted_s)
            else:
                self.metrics.itl.observe(t - c.last_token_s)
            c.last_token_s = t
            c.n_tokens += 1
            self.metrics.generated.inc()
        c.text += ev.text
        if ev.finish_reason is not None:
            if ev.finish_reason == "error":
                raise EngineFailure(f"the engine ended sequence {self.handles[i].id} with an error")
            c.finish_reason = ev.finish_reason

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come, over all choices; when the consumer stops
        early (disconnect, error), the unfinished sequences are cancelled."""
        try:
            if len(self.handles) == 1:  # the common case: no tasks, no queue
                async for ev in self.handles[0].events():
                    self._observe(0, ev)
                    yield 0, ev
                    if ev.finish_reason is not None:
                        break
                return
            async with aclosing(self._merged()) as merged:
                async for item in merged:
                    yield item
        finally:
            self.cancel()

    async def _merged(self) -> AsyncIterator[tuple[int, Event]]:
        # bounded: when the client stops reading, the pumps stop too and the events wait
        # on the engine's queues, where the stall timeout sees them
        queue: asyncio.Queue = asyncio.Queue(maxsize=MERGED_QUEUE)

        async def pump(i: int) -> None:
            try:
                async for ev in self.handles[i].events():
                    await queue.put((i, ev, None))
                    if ev.finish_reason is not None:
                        return
                await queue.put((i, None, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises
                await queue.put((i, None, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.handles))]
        try:
            left = len(tasks)
            while left:
                i, ev, exc = await queue.get()
                if exc is not None:
                    raise exc
                if ev is None:
                    left -= 1
                    continue
                self._observe(i, ev)
                yield i, ev
                if ev.finish_reason is not None:
                    left -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self) -> None:
        async with aclosing(self.events()) as events:
            async for _ in events:
                pass
