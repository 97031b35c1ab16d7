"""A submitted sequence (the handle a driver reads events from) and a lane of
slots, as the engine (scheduler.py) keeps them."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from ..generate.schedule import SampleState
from .api import Event, SeqParams, SeqStats
from .text import TextStream

# A sequence's unread events: past this many, or when its reader has taken none for the
# engine's `stall_timeout` seconds while some wait, the sequence is cancelled (a client
# that stopped reading must not hold a slot, nor make its queue grow, for ever).
MAX_UNREAD = 8192
# With this many unread the sequence is paused: the engine leaves it out of its lane's
# steps (it costs no compute) until its reader has taken all but half of them. A
# client that reads slowly is kept in step with its reading; one that stopped reading
# holds its slot, at no cost but its cache, until the stall timeout.
PAUSE_UNREAD = 64


class Owner(Protocol):
    """What a sequence needs of the engine that runs it."""
    stall_timeout: float

    def cancel_sequence(self, seq: "Sequence") -> None: ...
    def sequence_resumed(self, seq: "Sequence") -> None: ...
    def sequence_stalled(self, seq: "Sequence", unread: int, idle_s: float) -> None: ...


class Sequence:
    """A submitted sequence: the SeqHandle a driver reads events from."""

    def __init__(self, engine: Owner, seq_id: int, prompt: list[int], params: SeqParams,
                 seed: int, decode: Callable[[list[int]], str]) -> None:
        self.id = seq_id
        self.params = params
        self.seed = seed
        self.stats = SeqStats(n_prompt=len(prompt), submitted_s=time.perf_counter())
        self.state = SampleState.from_prompt(prompt)
        self.text = TextStream(decode, params.stop)
        self.slot: int | None = None
        self.cancelled = False
        self.finish_reason: str | None = None
        self.paused = False  # its reader is PAUSE_UNREAD events behind: left out of the steps
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._read_t = time.monotonic()   # when the reader last took an event, or when the
                                          # queue last became non-empty, whichever is later

    @property
    def generated(self) -> list[int]:
        return self.state.generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def events(self) -> AsyncIterator[Event]:
        """Events until the final one (finish_reason set); raises EngineFailure if the
        backend fails first."""
        while True:
            ev = await self._queue.get()
            self._read_t = time.monotonic()
            if self.paused and self._queue.qsize() <= PAUSE_UNREAD // 2:
                self.paused = False
                self._engine.sequence_resumed(self)
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        self._engine.cancel_sequence(self)

    def emit(self, ev: Event | BaseException) -> None:
        """The engine hands the sequence an event (or its failure) for the reader."""
        now, unread = time.monotonic(), self._queue.qsize()
        if unread == 0:
            self._read_t = now
        elif isinstance(ev, Event) and not self.cancelled and (
                unread >= MAX_UNREAD or now - self._read_t > self._engine.stall_timeout):
            self._engine.sequence_stalled(self, unread, now - self._read_t)
        self._queue.put_nowait(ev)
        if unread + 1 >= PAUSE_UNREAD and not (self.paused or self.done or self.cancelled):
            self.paused = True  # the engine's _plans leave it out until its reader catches up
            self._check_stall()

    def _check_stall(self) -> None:
        """A paused sequence emits nothing, so nothing else would see that its reader
        stopped: cancelled once the stall timeout has passed without a read."""
        if not self.paused or self.done or self.cancelled:
            return
        timeout, idle = self._engine.stall_timeout, time.monotonic() - self._read_t
        if idle >= timeout:
            self._engine.sequence_stalled(self, self._queue.qsize(), idle)
        elif timeout < float("inf"):
            asyncio.get_running_loop().call_later(timeout - idle, self._check_stall)


@dataclass
class Lane:
    """A micro-batch of slots: its sequences and the step it has in the pipeline."""
    index: int
    slots: range                                     # global slot ids of the lane
    seqs: dict[int, Sequence] = field(default_factory=dict)  # slot -> sequence
    in_flight: tuple[int, ...] | None = None          # slots of the Decode in the pipeline

    def free_slots(self) -> list[int]:
        return [s for s in self.slots if s not in self.seqs]
