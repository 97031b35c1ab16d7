"""One stage's per-sequence state: a KV-cache row (a *slot*) per sequence.

Slots are numbered globally and grouped into lanes (the pipeline's
micro-batches): lane l owns slots [first_l, first_l + size_l), and each lane has
its own KVCache whose rows are its slots. A Decode names a subset of one lane's
slots; each contiguous run of them is one cached forward over `cache.rows(a, b)`
(the cached forward is batch-invariant per row, so how slots are grouped into
runs does not change any number).

The same class serves single-device generation (the whole model: ids in,
sampled tokens out), the starter's first stage, every node of the ring and the
in-memory fake ring of the tests. Messages that break the slot rules (an
unknown or free slot, slots of two lanes, a position past the stage's context,
min(block_size, --max-context)) raise
SlotError: on a node that is a bad frame, the run is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generate import step
from ..generate.sampling import SamplingConfig, sample_token, seeded_generator
from ..generate.schedule import StepPlan, make_groups
from ..model import GPT, KVCache
from .messages import Admit, Decode, Message, Prefill, Prefills, Replay, Retire, Tokens
from .replay import ActivationLog
from .step_times import PACK_TOKENS


class SlotError(ValueError):
    """A message that does not fit the stage's slots."""


@dataclass
class _Slot:
    lane: int
    row: int
    active: bool = False
    position: int = 0                       # next position to decode (= tokens in the cache)
    sampling: SamplingConfig | None = None  # last stage only
    generator: torch.Generator | None = None


def lane_sizes(max_seqs: int, n_lanes: int) -> list[int]:
    """Near-equal lane sizes, the larger first: make_groups' split of the slots."""
    if max_seqs <= 0 or n_lanes <= 0:
        raise ValueError(f"max_seqs and lanes must be positive, got {max_seqs} and {n_lanes}")
    return [len(g) for g in make_groups(max_seqs, n_lanes)]


class SlotStage:
    def __init__(self, stage: GPT, sizes: list[int]) -> None:
        self.stage = stage
        self.sizes = list(sizes)
        self.context = stage.context  # the caches' length: positions 0..context-1
        self.caches: list[KVCache] = [stage.new_cache(n) for n in sizes]
        self.slots = [_Slot(lane, row) for lane, n in enumerate(sizes) for row in range(n)]
        self.first = [sum(sizes[:i]) for i in range(len(sizes))]  # first slot of each lane
        p = stage.first_param()
        self.device = p.device
        self.log: ActivationLog | None = None  # what went downstream (keep_log)
        self.due: dict[int, int] = {}          # slot -> positions its replay will fill

    def keep_log(self) -> None:
        """Keep the activations sent downstream for a replay (not on the last stage)."""
        if not self.stage.has_head and self.log is None:
            self.log = ActivationLog(self.n_slots, self.context, self.stage.config.n_embd)

    def clear(self) -> None:
        """Free every slot (the caches' stale rows are never read: a slot reads
        only the positions written since its admission)."""
        for s in self.slots:
            if s.active:
                self.caches[s.lane].release(s.row)
        self.slots = [_Slot(s.lane, s.row) for s in self.slots]
        self.due = {}
        if self.log is not None:
            self.log.clear()

    def keep(self, positions: dict[int, int]) -> None:
        """After a loss: each slot of `positions` goes on holding its first n
        positions (cache and log); every other slot is freed."""
        self.due = {}
        for i, s in enumerate(self.slots):
            n = positions.get(i, 0)
            if n > s.position or (n and not s.active):
                raise SlotError(f"slot {i} holds {s.position if s.active else 0} positions, "
                                f"{n} to keep")
            if n <= 0 and s.active:
                self.retire(Retire(i))
            s.position = max(n, 0)
            if self.log is not None:
                self.log.cut(i, n)

    def expect_replay(self, m: Admit, positions: int) -> None:
        """The replacement of a lost stage: the slot is admitted and waits for the
        replay of `positions` positions before anything else."""
        if positions < 1 or positions > self.context:
            raise SlotError(f"replay of {positions} positions for slot {m.slot}, the context "
                            f"is {self.context}")
        self.admit(m)
        self.due[m.slot] = positions

    def replay_of(self, positions: dict[int, int], chunk: int = 256) -> list[Replay]:
        """The upstream survivor's replay: each slot's logged positions 0..n-1, in
        pieces of at most `chunk` positions (the replacement computes one while the
        next is on its way, and no frame costs it more than a prefill chunk)."""
        if self.log is None:
            raise SlotError("this stage keeps no log to replay")
        out = []
        for slot, n in sorted(positions.items()):
            x = self.log.read(slot, n) if n > 0 else None
            out += [Replay(slot, x[:, a:a + chunk], a) for a in range(0, n, chunk)]
        return out

    @torch.inference_mode()
    def replay(self, m: Replay) -> None:
        """Fill the slot's cache from a replay; nothing goes on (see Replay)."""
        due = self.due.get(m.slot)
        if due is None:
            raise SlotError(f"replay for slot {m.slot}, which awaits none")
        s = self.slots[m.slot]
        t = m.x.shape[1]
        if m.start != s.position or m.start + t > due:
            raise SlotError(f"replay of positions {m.start}..{m.start + t - 1} for slot "
                            f"{m.slot}, which holds {s.position} of the {due} replayed")
        del self.due[m.slot]
        self.prefill(Prefill(m.slot, m.x, m.start))
        if s.position < due:
            self.due[m.slot] = due

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def lane_of(self, slot: int) -> int:
        if not 0 <= slot < len(self.slots):
            raise SlotError(f"slot {slot} outside 0..{len(self.slots) - 1}")
        return self.slots[slot].lane

    def is_whole_lane(self, slots: tuple[int, ...]) -> bool:
        """Do `slots` make up one whole lane, in order?"""
        lane = self.lane_of(slots[0])
        first, n = self.first[lane], self.sizes[lane]
        return slots == tuple(range(first, first + n))

    def _slot(self, slot: int, active: bool | None = True) -> _Slot:
        if not 0 <= slot < len(self.slots):
            raise SlotError(f"slot {slot} outside 0..{len(self.slots) - 1}")
        s = self.slots[slot]
        if active is not None and s.active != active:
            raise SlotError(f"slot {slot} is {'free' if active else 'in use'}")
        return s

    # ---- messages -----------------------------------------------------------
    def admit(self, m: Admit) -> None:
        s = self._slot(m.slot, active=None)  # re-admitting a slot resets it
        if s.active:
            self.caches[s.lane].release(s.row)
        s.active, s.position = True, 0
        self.due.pop(m.slot, None)
        if self.log is not None:
            self.log.free(m.slot)
        if self.stage.has_head:  # parameters checked where they entered (SeqParams, ADMIT frame)
            s.sampling = m.sampling
            s.generator = seeded_generator(m.seed)

    def retire(self, m: Retire) -> None:
        s = self._slot(m.slot)
        s.active, s.sampling, s.generator = False, None, None
        self.caches[s.lane].release(s.row)  # its pages go back to the OS (a paged cache)
        self.due.pop(m.slot, None)
        if self.log is not None:
            self.log.free(m.slot)

    @torch.inference_mode()
    def prefill(self, m: Prefill) -> torch.Tensor | None:
        """Fill the slot at positions m.start..; returns the activations (1, T, C)
        for the next stage, None on the last stage (prefill needs no logits)."""
        s = self._slot(m.slot)
        t = m.x.shape[1]
        self._check_prefill(m.slot, s, m.start, t)
        x = m.x.to(self.device, copy=True)  # aligned memory, whatever the source
        h = step.prefill(self.stage, self.caches[s.lane], s.row, x, m.start)
        s.position = m.start + t
        if self.log is not None:
            self.log.record(m.slot, m.start, h[0])
        return None if self.stage.has_head else h

    @torch.inference_mode()
    def prefills(self, m: Prefills) -> torch.Tensor | None:
        """Several slots' chunks as one forward (step.prefill_rows), each checked as a
        Prefill is; returns the activations (1, N, C) packed alike, None on the last stage."""
        n = len(m.slots)
        if not n or not n == len(m.starts) == len(m.lengths):
            raise SlotError(f"prefills of {n} slots with {len(m.starts)} starts and "
                            f"{len(m.lengths)} lengths")
        if len(set(m.slots)) != n:
            raise SlotError(f"prefills name a slot twice: {list(m.slots)}")
        total = m.x.shape[1] if m.x.dim() >= 2 and m.x.shape[0] == 1 else -1
        if min(m.lengths) < 1 or sum(m.lengths) != total:
            raise SlotError(f"prefills of lengths {list(m.lengths)} for {total} packed tokens "
                            f"(shape {tuple(m.x.shape)})")
        slots = [self._slot(i) for i in m.slots]
        for i, s, start, t in zip(m.slots, slots, m.starts, m.lengths):
            if s.lane != m.lane:
                raise SlotError(f"prefills for lane {m.lane} name slot {i} of lane {s.lane}")
            self._check_prefill(i, s, start, t)
        x = m.x.to(self.device, copy=True)  # aligned memory, whatever the source
        h = step.prefill_rows(self.stage, self.caches[m.lane], [s.row for s in slots],
                              m.starts, m.lengths, x)
        a = 0
        for i, s, start, t in zip(m.slots, slots, m.starts, m.lengths):
            s.position = start + t
            if self.log is not None:
                self.log.record(i, start, h[0, a:a + t])
            a += t
        return None if self.stage.has_head else h

    def _check_prefill(self, slot: int, s: _Slot, start: int, t: int) -> None:
        if slot in self.due:
            raise SlotError(f"slot {slot} awaits its replay")
        if not 1 <= t <= self.context - start:
            raise SlotError(f"prefill of {t} tokens at position {start}, the context is "
                            f"{self.context} positions")
        if start and start != s.position:
            raise SlotError(f"prefill chunk at position {start}, slot {slot} holds "
                            f"{s.position} positions")

    @torch.inference_mode()
    def decode(self, m: Decode) -> torch.Tensor:
        """One token per slot at each slot's position; returns activations (B, 1, C),
        or logits (B, V) on the last stage."""
        slots = [self._slot(i) for i in m.slots]
        if self.due and any(i in self.due for i in m.slots):
            raise SlotError(f"decode of slots {list(m.slots)}, some await their replay")
        if not slots or m.x.shape[0] != len(slots):
            raise SlotError(f"decode of {m.x.shape[0]} rows for {len(slots)} slots")
        if any(s.lane != m.lane for s in slots):
            raise SlotError(f"decode for lane {m.lane} names slots of another lane: {list(m.slots)}")
        rows = [s.row for s in slots]
        if any(b <= a for a, b in zip(rows, rows[1:])):
            raise SlotError(f"decode slots must be ascending and distinct: {list(m.slots)}")
        if m.position is not None and slots[0].position != m.position:
            raise SlotError(f"decode at position {m.position}, slot {m.slots[0]} is at "
                            f"{slots[0].position}")
        if max(s.position for s in slots) >= self.context:
            raise SlotError(f"decode past the context ({self.context} positions) without a prefill")
        x = m.x.to(self.device, copy=True)  # aligned memory, whatever the source
        cache = self.caches[m.lane]
        outs, i = [], 0
        while i < len(rows):  # contiguous runs of rows: one forward each
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            outs.append(step.decode(self.stage, cache.rows(rows[i], rows[j - 1] + 1), x[i:j],
                                    [slots[k].position for k in range(i, j)]))
            i = j
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        for k, (i, s) in enumerate(zip(m.slots, slots)):
            if self.log is not None:
                self.log.record(i, s.position, out[k])
            s.position += 1
        return out

    def sample(self, slots: tuple[int, ...], logits: torch.Tensor) -> tuple[int, ...]:
        """One token per slot from logits (B, V), each with its own parameters and stream."""
        logits = logits.detach().to("cpu", torch.float32)  # one copy for the step, not one per row
        out = []
        for i, slot in enumerate(slots):
            s = self.slots[slot]
            assert s.sampling is not None and s.generator is not None
            out.append(sample_token(logits[i], s.sampling, s.generator))
        return tuple(out)

    @torch.inference_mode()
    def first_step(self, lane: int, msgs: list[Message], plans: dict[int, StepPlan],
                   batched: bool = True, pack_tokens: int = PACK_TOKENS
                   ) -> list[Message | Tokens]:
        """The engine's first stage's share of a lane step (on its worker thread):
        msgs, then the plans' prefill chunks (`batched`: packed, in slot order, into
        Prefills of at most pack_tokens tokens, a pack of one a Prefill; else one
        Prefill each), then one Decode of the plans that decode. Returns what goes down
        the pipeline (the sampled Tokens last when this stage is the whole model)."""
        first = self
        out: list[Message | Tokens] = []
        for m in msgs:
            nxt = first.handle(m)
            if nxt is not None:
                out.append(nxt)
        if not plans:
            return out
        for pack in packs({s: p for s, p in plans.items() if p.prefill},
                          pack_tokens if batched else 0):
            ids = torch.tensor([sum((p.prefill for p in pack.values()), [])], dtype=torch.long)
            m: Message = Prefills(lane, tuple(pack), tuple(p.start for p in pack.values()),
                                  tuple(len(p.prefill) for p in pack.values()), ids)
            if len(pack) == 1:
                (slot, plan), = pack.items()
                m = Prefill(slot, ids, plan.start)
            nxt = first.handle(m)
            if nxt is not None:
                out.append(nxt)
        slots = tuple(s for s, p in plans.items() if p.decodes)
        if not slots:
            return out
        positions = [first.slots[s].position for s in slots]
        if positions != [plans[s].position for s in slots]:
            raise SlotError(f"slot positions {positions} differ from the schedule's")
        ids = torch.tensor([[plans[s].token] for s in slots], dtype=torch.long)
        nxt = first.handle(Decode(lane, slots, ids, positions[0]))
        assert nxt is not None
        out.append(nxt)
        return out

    def handle(self, m: Message) -> Message | Tokens | None:
        """What a node does with a message: apply it, return what goes on (None: nothing)."""
        if isinstance(m, Admit):
            self.admit(m)
            return None if self.stage.has_head else m
        if isinstance(m, Retire):
            self.retire(m)
            return None if self.stage.has_head else m
        if isinstance(m, Prefill):
            h = self.prefill(m)
            return None if h is None else Prefill(m.slot, h, m.start)
        if isinstance(m, Prefills):
            h = self.prefills(m)
            return None if h is None else Prefills(m.lane, m.slots, m.starts, m.lengths, h)
        if isinstance(m, Replay):
            self.replay(m)
            return None
        if isinstance(m, Decode):
            out = self.decode(m)
            if self.stage.has_head:
                return Tokens(m.lane, m.slots, self.sample(m.slots, out))
            return Decode(m.lane, m.slots, out, m.position)
        raise SlotError(f"unexpected message {type(m).__name__}")


def packs(chunks: dict[int, StepPlan], limit: int) -> list[dict[int, StepPlan]]:
    """The chunks, in slot order, grouped into packs of at most `limit` tokens (a longer
    chunk alone; limit 0: one pack each)."""
    out: list[dict[int, StepPlan]] = []
    size = 0
    for slot, plan in chunks.items():
        n = len(plan.prefill)
        if not out or not limit or size + n > limit:
            out.append({})
            size = 0
        out[-1][slot] = plan
        size += n
    return out
