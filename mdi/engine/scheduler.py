"""The engine: sequences scheduled over the pipeline's lanes.

Lanes are the pipeline's micro-batches: `lanes = min(max_seqs, n_stages)`
groups of slots (KV-cache rows). A lane is either *in flight* (its step is
somewhere in the pipeline) or at a *step boundary*. At a boundary the engine
retires the lane's finished sequences (freeing their slots on every stage),
admits waiting sequences into free slots (Admit + Prefill), prefills again the
ones whose context overflowed (the shared policy of generate/schedule.py), and
sends one Decode for all the lane's active sequences. Recurrent pipelining:
every lane with work is in flight at once, so with as many lanes as stages no
stage waits for its own previous output.

The first stage runs here, on one worker thread so that the loop keeps serving
(a decode shorter than INLINE_BELOW_S on the loop itself), or every step on the
loop (`compute_inline`) or on `compute_thread` (compute_thread.py says why). The
rest is behind a Link (the TCP ring, or the tests' fake); no link: one device.

Tokens come back per lane in the order the lanes were sent; each becomes an
Event on its sequence's queue (text released as it becomes final, see
text.py). A sequence ends at a stop id, a stop string, its token budget or a
cancel. Call submit/cancel from the engine's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Callable

from ..generate.schedule import StepPlan, accept, needs_prefill, plan_chunk
from ..model import GPT
from .api import EngineBusy, EngineFailure, Event, SeqParams
from .compute_thread import ComputeThread
from .link import Link, LinkClosed, Reform
from .messages import Admit, Message, Retire, Tokens
from .replay import Confirmed, rewind
from .sequence import Lane, Sequence
from .slots import SlotError, SlotStage, lane_sizes
from .step_times import DEFAULT_PREFILL_CHUNK, INLINE_BELOW_S, StepTimes, prefill_budget

log = logging.getLogger(__name__)
_WAKE = object()


class PipelineEngine:
    """Continuous batching over a pipeline of `n_stages` stages.

    first: the first stage (the whole model when link is None).
    decode: token ids -> text (Tokenizer.decode), for stop strings and Event.text.
    max_seqs: sequences running at once (KV slots). max_queue: sequences waiting
    for a slot (beyond the free ones) before submit raises EngineBusy (default
    4 * max_seqs; 0: only as many as there are free slots). stall_timeout: seconds a
    sequence's reader may leave its events unread before the sequence is cancelled
    (counted in `stalled`); `silent_s`: how long the pipeline has been owing tokens.
    """
    stall_timeout: float = float("inf")
    prefill_share: float = 0.0  # >0: chunks cut to this many decode steps' time while others decode
    batch_prefill: bool = True  # a step's prefill chunks as one forward and one frame (False: one each)
    compute_inline: bool = False  # every step on the loop's thread (batch.generate_local)
    compute_thread: ComputeThread | None = None  # every step there (serve; the caller owns it)

    def __init__(self, first: GPT, decode: Callable[[list[int]], str], max_seqs: int,
                 n_stages: int = 1, link: Link | None = None, max_queue: int | None = None,
                 retry_after: float = 1.0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if not first.has_embeddings:
            raise ValueError("the engine runs the first stage: it needs the embeddings")
        if link is not None and first.has_head:
            raise ValueError("with a link the first stage must not hold the head")
        if max_seqs <= 0:
            raise ValueError(f"max_seqs must be positive, got {max_seqs}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be 0 (no chunks) or positive, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.sizes = lane_sizes(max_seqs, max(1, n_stages))
        self.first = SlotStage(first, self.sizes)
        self.config = first.config
        self.decode = decode
        self.link = link
        self.max_seqs = max_seqs
        self.max_queue = 4 * max_seqs if max_queue is None else max_queue
        self.retry_after = retry_after
        self.lanes = [Lane(i, range(self.first.first[i], self.first.first[i] + n))
                      for i, n in enumerate(self.sizes)]
        self.waiting: deque[Sequence] = deque()
        self.failure: EngineFailure | None = None
        self.max_in_flight = 0           # most lanes in the pipeline at once
        self._order: deque[int] = deque()  # lanes in flight, in the order sent
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._next_id = 0
        self._closing = False
        self._task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._executor = ComputeThread("mdi-engine")  # started by a first step
        self.times = StepTimes()             # the first stage's decode step, prefill token
        self.stalled = 0                     # sequences cancelled because nobody read them
        self._progress_t = time.monotonic()  # last tokens back, or a send into an idle pipeline
        self.confirmed = Confirmed()         # positions every stage holds (replay.py)
        self._keep: dict[int, int] = {}      # set by _recover: slots that go on (slot -> n)

    def _relane(self, n_lanes: int) -> None:
        """Regroup the slots into n_lanes lanes; only while no lane holds a sequence
        (before the first admission: waiting sequences are not in a lane yet)."""
        if any(lane.seqs or lane.in_flight for lane in self.lanes):
            raise RuntimeError("lanes can change only while no sequence holds a slot")
        self.sizes = lane_sizes(self.max_seqs, n_lanes)
        self.first = SlotStage(self.first.stage, self.sizes)
        self.lanes = [Lane(i, range(self.first.first[i], self.first.first[i] + n))
                      for i, n in enumerate(self.sizes)]

    # ---- the Engine protocol -------------------------------------------------
    async def start(self) -> None:
        if self.link is None and not self.first.stage.has_head:
            raise ValueError("without a link the first stage must be the whole model")
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
            if self.link is not None:
                self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Cancel every sequence, let the lanes in flight come back, stop."""
        self._closing = True
        self._wake()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.link is not None:
            await self.link.close()
        self._executor.close()

    def submit(self, prompt: list[int], params: SeqParams) -> Sequence:
        if self.failure is not None:
            raise self.failure
        if self._closing:
            raise EngineFailure("the engine is shutting down")
        if not prompt:
            raise ValueError("prompt: a prompt must have at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary of "
                             f"{self.config.vocab_size}")
        if params.seed is not None and not 0 <= params.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {params.seed}")
        free = self.first.n_slots - self.running  # taken at the next step boundary
        if len(self.waiting) >= free + self.max_queue:
            raise EngineBusy(f"{self.max_seqs} sequences are running and {self.queued - free} "
                             f"waiting (the queue holds {self.max_queue}); try again later",
                             self.retry_after)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(self, self._next_id, list(prompt), params, seed, self.decode)
        self._next_id += 1
        self.waiting.append(seq)
        self._wake()
        return seq

    @property
    def running(self) -> int:
        return sum(len(lane.seqs) for lane in self.lanes)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def context(self) -> int:
        """Positions a sequence may hold: its prompt and its completion."""
        return self.first.context

    @property
    def silent_s(self) -> float:
        """Seconds since the pipeline last answered, while it owes an answer (else 0)."""
        return time.monotonic() - self._progress_t if self._order else 0.0

    def sequence_stalled(self, seq: Sequence, unread: int, idle_s: float) -> None:
        self.stalled += 1
        log.warning("sequence %d: %d events unread for %.1f s; cancelled (stall timeout %g s)",
                    seq.id, unread, idle_s, self.stall_timeout)
        self.cancel_sequence(seq)

    # ---- scheduling ------------------------------------------------------------
    def _wake(self, seq: Sequence | None = None) -> None:
        self._inbox.put_nowait(_WAKE)

    sequence_resumed = _wake  # a paused sequence's reader caught up: in the next step again

    def cancel_sequence(self, seq: Sequence) -> None:
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled")
        # an active sequence ends when its lane's step comes back
        self._wake()

    async def _read(self) -> None:
        assert self.link is not None
        try:
            while True:
                self._inbox.put_nowait(await self.link.recv())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the scheduler, which fails the run
            self._inbox.put_nowait(e)

    async def _loop(self) -> None:
        while True:
            try:
                await self._schedule()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every sequence must hear of it (Ctrl-C goes up)
                if not (isinstance(e, LinkClosed) and not self._closing
                        and await self._try_recover(e)):
                    self._fail(e)
                    return
                self._rewind()

    async def _schedule(self) -> None:
        while True:
            if self._closing:
                for seq in list(self.waiting):
                    self.cancel_sequence(seq)
                for lane in self.lanes:
                    for seq in lane.seqs.values():
                        seq.cancelled = True
            for lane in self.lanes:
                if lane.in_flight is None:
                    await self._boundary(lane)
            if self._closing and not self._order:
                return
            item = await self._inbox.get()
            if item is _WAKE:
                continue
            if isinstance(item, Reform) and self._closing:
                continue  # no new pipeline for an engine that is closing
            if isinstance(item, BaseException):
                raise item
            self._arrive(item)

    async def _try_recover(self, e: LinkClosed) -> bool:
        try:
            return await self._recover(e)
        except Exception as err:  # noqa: BLE001 - a failed recovery fails the run with its cause
            log.error("recovery failed: %s", err, exc_info=err)
            return False

    async def _recover(self, e: LinkClosed) -> bool:
        """The pipeline behind the link failed: a backend that can rebuild it (a new
        first stage and link, see ring_engine.py) does so and returns True; the
        engine then resumes every sequence (_rewind). False fails them all."""
        return False

    def _rewind(self) -> None:
        """After _recover: the steps in flight are lost. Every live sequence goes back to
        the head of the queue, to be admitted again and prefilled from its tokens so far
        (replay.rewind; a greedy one goes on exactly as it would have), but those in the
        slots _recover kept (`_keep`: a ring healed by replay) go on from their positions."""
        if self._reader is not None:
            self._reader.cancel()
        keep, self._keep = self._keep, {}
        resumed = rewind(self.lanes, keep, self._live)
        self._order.clear()
        self.first.keep(keep)
        self.confirmed.reset({s: m for s, m in self.marks().items() if s in keep})
        self.waiting.extendleft(reversed(resumed))
        while not self._inbox.empty():  # answers of the old pipeline, and its failure
            self._inbox.get_nowait()
        if self.link is not None:
            self._reader = asyncio.create_task(self._read())
        log.info("resuming %d sequence(s) on the new pipeline (%d kept their caches)",
                 len(resumed) + len(keep), len(keep))

    def marks(self) -> dict[int, tuple[int, int, int]]:
        """Each occupied slot's (sequence id, window, positions cached)."""
        return {slot: (seq.id, seq.state.window, seq.state.cached)
                for lane in self.lanes for slot, seq in lane.seqs.items()}

    def kept_positions(self) -> dict[int, int]:
        """slot -> positions every stage holds, for each live sequence (0: unknown)."""
        live = {slot for lane in self.lanes for slot, seq in lane.seqs.items() if not seq.done}
        return {s: n for s, n in self.confirmed.positions(self.marks()).items() if s in live}

    def _fail(self, e: BaseException) -> None:
        node = getattr(e, "node", None)
        if isinstance(e, EngineFailure):
            failure = e
        else:
            what = "the pipeline failed" if isinstance(e, (LinkClosed, SlotError)) else \
                f"the engine failed ({type(e).__name__})"
            failure = EngineFailure(f"{what}: {e}", node=node)
            failure.__cause__ = e  # drivers that know the backend read the details there
            if not isinstance(e, (LinkClosed, SlotError)):
                log.error("engine failure", exc_info=e)
        self.failure = failure
        seqs = list(self.waiting) + [s for lane in self.lanes for s in lane.seqs.values()]
        self.waiting.clear()
        for lane in self.lanes:
            lane.seqs.clear()
            lane.in_flight = None
        self._order.clear()
        for seq in seqs:
            if not seq.done:
                seq.finish_reason = "error"
                seq.emit(failure)

    async def _boundary(self, lane: Lane) -> None:
        """A lane between steps: retire, admit, and send its next step if it has work."""
        for seq in lane.seqs.values():
            if seq.cancelled and not seq.done:  # cancelled between steps: ends here
                self._finish(seq, "cancelled")
        retire = [slot for slot, seq in lane.seqs.items() if seq.done]
        for slot in retire:
            del lane.seqs[slot]
        admit = []
        if not self._closing:
            for slot in lane.free_slots():
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
                seq.slot = slot
                lane.seqs[slot] = seq
                admit.append(seq)
        msgs: list[Message] = [Retire(s) for s in retire]
        msgs += [Admit(s.slot, s.params.temperature, s.params.top_k, s.params.top_p, s.seed)
                 for s in admit]
        plans = self._plans(lane)
        if not plans:
            if msgs:  # free the slots downstream now; nothing to compute
                await self._send(await self._compute(lane.index, msgs, {}))
            return
        slots = tuple(s for s, p in plans.items() if p.decodes)
        if slots:
            lane.in_flight = slots
            if not self._order:
                self._progress_t = time.monotonic()
            self._order.append(lane.index)
            self.confirmed.sent(self.marks())
            self.max_in_flight = max(self.max_in_flight, len(self._order))
        out = await self._compute(lane.index, msgs, plans)
        if self.link is None and slots:
            tokens = out.pop()
            assert isinstance(tokens, Tokens)
            self._inbox.put_nowait(tokens)
        await self._send(out)
        # chunks alone: nothing comes back; the lane goes on at the next arrival while another
        # lane is in flight (not at once: its chunks queued ahead of that lane at every stage)
        if not slots and not any(other.in_flight for other in self.lanes if other is not lane):
            self._wake()

    def _plans(self, lane: Lane) -> dict[int, StepPlan]:
        """This step of each of the lane's sequences, in slot order: prefills share
        the step's budget of prefill_chunk tokens (a sequence that gets none waits
        for a later step); a sequence decodes once its cache holds its context."""
        budget = left = self._prefill_budget(lane)
        plans = {}
        for slot in sorted(lane.seqs):
            seq = lane.seqs[slot]
            if seq.paused or budget and not left and needs_prefill(seq.state, self.first.context):
                continue
            plan = plan_chunk(seq.state, self.first.context, left if budget else 0)
            left -= len(plan.prefill)
            plans[slot] = plan
        return plans

    def _prefill_budget(self, lane: Lane) -> int:
        """This step's prefill tokens (step_times.prefill_budget)."""
        return prefill_budget(self.prefill_chunk, self.prefill_share, self.times, lane,
                              self.lanes, self.first.context)

    async def _compute(self, lane: int, msgs: list[Message], plans: dict[int, StepPlan]
                       ) -> list[Message | Tokens]:
        decode_only = not any(p.prefill for p in plans.values())
        # A short step runs right here: the hand-off to the worker thread and back
        # costs more than it computes, and blocks the loop for less than INLINE_BELOW_S.
        ema = None if self.compute_thread else self.times.decode  # given one: always there
        inline = self.compute_inline or (decode_only and ema is not None and ema < INLINE_BELOW_S)
        t0 = time.perf_counter()
        if inline:
            out = self.first.first_step(lane, msgs, plans, self.batch_prefill)
        else:
            out = await (self.compute_thread or self._executor).run(
                self.first.first_step, lane, msgs, plans, self.batch_prefill)
        took = time.perf_counter() - t0
        if plans:
            self.times.stepped(took, not decode_only)
        if inline:
            await asyncio.sleep(0)  # the loop's other tasks (readers of the events) get a turn
        if decode_only and plans:
            self.times.decoded(took)
        elif plans:
            self.times.prefilled(took, sum(len(p.prefill) for p in plans.values()),
                                 any(p.decodes for p in plans.values()))
        return out

    async def _send(self, msgs: list[Message | Tokens]) -> None:
        if self.link is None:
            return
        for m in msgs:
            await self.link.send(m)  # type: ignore[arg-type]

    def _arrive(self, tokens: Tokens) -> None:
        """A lane's step came back: one token per slot it decoded."""
        if not self._order:
            raise EngineFailure("tokens arrived with no lane in flight")
        lane = self.lanes[self._order.popleft()]
        self.confirmed.arrived()
        if tokens.lane != lane.index or tokens.slots != lane.in_flight:
            raise EngineFailure(f"expected tokens for lane {lane.index} slots {lane.in_flight}, "
                                f"got lane {tokens.lane} slots {tokens.slots}")
        lane.in_flight = None
        self._progress_t = time.monotonic()
        now = time.perf_counter()
        for slot, tok in zip(tokens.slots, tokens.tokens):
            if not 0 <= tok < self.config.vocab_size:
                raise EngineFailure(f"token id {tok} outside the vocabulary")
            if self._live(lane.seqs[slot]):
                self._token(lane.seqs[slot], tok, now)

    def _live(self, seq: Sequence) -> bool:
        """Does seq go on? A cancelled one ends here (its step's token is dropped)."""
        if seq.cancelled and not seq.done:
            self._finish(seq, "cancelled")
        return not seq.done

    def _token(self, seq: Sequence, tok: int, now: float) -> None:
        p = seq.params
        if tok in p.stop_ids:
            self._finish(seq, "stop", seq.text.flush())
            return
        accept(seq.state, tok)
        st = seq.stats
        st.n_generated += 1
        st.token_times.append(now)
        if st.first_token_s is None:
            st.first_token_s = now
        text, matched = seq.text.push(tok)
        seq.emit(Event(tok, text))
        if matched:
            self._finish(seq, "stop")
        elif st.n_generated >= p.max_tokens:
            self._finish(seq, "length", seq.text.flush())

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> None:
        seq.finish_reason = reason
        seq.emit(Event(None, text, reason))
