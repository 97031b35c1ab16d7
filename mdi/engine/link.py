"""The engine's view of the rest of the pipeline: a Link.

The engine (running the first stage) sends messages (Admit, Retire, Prefill,
Decode) down the pipeline and receives Tokens back, in the order their Decodes
were sent. Production: the TCP link of the ring (mdi/ring/engine_link.py),
which encodes messages as data-plane frames. Tests: MemoryLink below, a ring
of in-process stages with one asyncio task per stage, so scheduling (lanes in
flight, admission, retirement, slot reuse) is tested without sockets or
processes.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Protocol

from .messages import Message, Tokens
from .slots import SlotStage


class LinkClosed(ConnectionError):
    """The pipeline behind a link is gone; `node` names the failing node when known."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class Reform(LinkClosed):
    """Not a failure: the backend wants its pipeline formed again (nodes came back);
    it goes through the recovery path like a LinkClosed, and is dropped once the
    engine is closing."""


class Link(Protocol):
    async def send(self, msg: Message) -> None: ...
    async def recv(self) -> Tokens: ...       # raises LinkClosed
    async def close(self) -> None: ...


_CLOSE = object()


class MemoryLink:
    """Stages 1..N-1 of a pipeline in this process, each an asyncio task taking
    messages from its inbox and passing results on: the in-memory fake ring.

    `delay` (seconds per message per stage) lets tests make stages slow, so
    several lanes are really in flight at once. `fail_at` makes stage i raise
    after handling that many messages (a dead node). `hop` (message, the stage
    whose lanes apply) is applied to every message that crosses a hop, e.g. a
    round trip through the wire format."""

    def __init__(self, stages: list[SlotStage], delay: float = 0.0,
                 fail_at: tuple[int, int] | None = None,
                 hop: Callable[[Message | Tokens, SlotStage], Message | Tokens] | None = None
                 ) -> None:
        if not stages or not stages[-1].stage.has_head:
            raise ValueError("a MemoryLink needs the stages after the first, the last with the head")
        self.stages = stages
        self.delay = delay
        self.fail_at = fail_at
        self.hop = hop
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(stages) + 1)]
        self.tasks: list[asyncio.Task] = []
        self.handled = [0] * len(stages)
        self.sent: list[Message] = []        # what the engine sent, for tests
        self.error: BaseException | None = None

    def _start(self) -> None:
        if not self.tasks:
            self.tasks = [asyncio.create_task(self._serve(i)) for i in range(len(self.stages))]

    async def _serve(self, i: int) -> None:
        inbox, outbox = self.queues[i], self.queues[i + 1]
        while True:
            m = await inbox.get()
            if m is _CLOSE:
                await outbox.put(_CLOSE)
                return
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_at is not None and self.fail_at == (i, self.handled[i]):
                    raise LinkClosed(f"node {i + 1} stopped answering", node=f"node {i + 1}")
                if self.hop is not None:
                    m = self.hop(m, self.stages[i])
                out = self.stages[i].handle(m)
                self.handled[i] += 1
            except Exception as e:  # noqa: BLE001 - the fake node dies, the engine hears of it
                self.error = e
                await self.queues[-1].put(_CLOSE)
                return
            if out is not None:
                await outbox.put(out)

    async def send(self, msg: Message) -> None:
        self._start()
        self.sent.append(msg)
        await self.queues[0].put(msg)

    async def recv(self) -> Tokens:
        self._start()
        m = await self.queues[-1].get()
        if m is _CLOSE:
            e = self.error
            raise LinkClosed(f"the ring closed: {e}" if e else "the ring closed",
                             node=getattr(e, "node", None))
        return self.hop(m, self.stages[-1]) if self.hop is not None else m

    async def close(self) -> None:
        """Let every stage handle what was sent (as STOP does on the ring), then stop."""
        if self.tasks:
            await self.queues[0].put(_CLOSE)
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
