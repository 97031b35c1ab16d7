"""Upstream replay (`--recovery replay`): what a stage keeps so that a lost
downstream neighbour can be rebuilt without recomputing the rest of the ring.

ActivationLog: every stage but the last keeps, for each live slot, the
activations it sent downstream (positions x n_embd, in the wire's dtype): the
lost stage's inputs. A slot's log grows with its positions (doubling, at most
the stage's context: `max_bytes` is its bound, counted in a node's memory
check) and is freed when the slot is retired or admitted again. When the next
stage is lost, the replacement prefills its layers from `read(slot, n)`.

Confirmed: what every stage of the ring holds for certain. Frames cross the
ring in one order (a FIFO chain), so when the tokens of a Decode come back,
every message sent before it went through every stage. The engine records the
positions of each live sequence at each Decode it sends (`sent`) and takes the
record as confirmed when that Decode's tokens arrive (`arrived`); after a loss
the survivors are cut back to those positions and the engine prefills what
lies past them as an ordinary chunk.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

from ..generate.sampling import sample_seed


RECOVERY_CHOICES = ("replay", "reprefill")  # --recovery (ring/starter/heal.py)
DEFAULT_RECOVERY = "reprefill"


class ActivationLog:
    """The activations a stage sent downstream, per slot (rows = positions)."""

    def __init__(self, n_slots: int, context: int, n_embd: int) -> None:
        self.context = context
        self.n_embd = n_embd
        self.rows: list[torch.Tensor | None] = [None] * n_slots
        self.length = [0] * n_slots   # positions written (the next one to append)

    @staticmethod
    def max_bytes(n_slots: int, context: int, n_embd: int, itemsize: int) -> int:
        """The most a log holds: every slot's whole context."""
        return n_slots * context * n_embd * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows if t is not None)

    def free(self, slot: int) -> None:
        self.rows[slot], self.length[slot] = None, 0

    def record(self, slot: int, start: int, h: torch.Tensor) -> None:
        """h (T, C): what went downstream for positions start..start+T-1 (a write at
        start drops whatever the slot held past it: a re-prefill, a cut-back)."""
        t = h.shape[0]
        end = start + t
        if start > self.length[slot] or end > self.context:
            raise ValueError(f"log of slot {slot}: positions {start}..{end - 1} after "
                             f"{self.length[slot]} written, context {self.context}")
        buf = self.rows[slot]
        if buf is None or buf.shape[0] < end or buf.dtype != h.dtype:
            size = min(self.context, max(end, 16, 2 * (buf.shape[0] if buf is not None else 0)))
            grown = torch.empty(size, self.n_embd, dtype=h.dtype, device=h.device)
            if buf is not None and start:
                grown[:start] = buf[:start]
            self.rows[slot] = buf = grown
        buf[start:end] = h
        self.length[slot] = end

    def read(self, slot: int, n: int) -> torch.Tensor:
        """The first n positions of the slot, (1, n, C)."""
        if not 0 < n <= self.length[slot]:
            raise ValueError(f"log of slot {slot} holds {self.length[slot]} positions, "
                             f"{n} asked for")
        buf = self.rows[slot]
        assert buf is not None
        return buf[:n].unsqueeze(0)

    def cut(self, slot: int, n: int) -> None:
        """Keep only the first n positions (n 0: free the slot)."""
        if n <= 0:
            self.free(slot)
        else:
            self.length[slot] = min(self.length[slot], n)

    def clear(self) -> None:
        for i in range(len(self.rows)):
            self.free(i)


Mark = tuple[int, int, int]  # (sequence id, window, positions cached)


class Confirmed:
    """The positions of each live slot that every stage holds (see the module doc)."""

    def __init__(self) -> None:
        self.pending: deque[dict[int, Mark]] = deque()  # one per Decode in flight
        self.known: dict[int, Mark] = {}                # slot -> the last confirmed mark

    def sent(self, marks: dict[int, Mark]) -> None:
        """A Decode went out; marks: every occupied slot's state after it."""
        self.pending.append(marks)

    def arrived(self) -> None:
        """The oldest Decode in flight came back."""
        if self.pending:
            self.known = self.pending.popleft()

    def positions(self, marks: dict[int, Mark]) -> dict[int, int]:
        """slot -> positions every stage holds for the slot's sequence, given each
        live slot's current (id, window, cached); 0 when nothing is certain (another
        sequence, another window)."""
        out = {}
        for slot, (sid, window, cached) in marks.items():
            k = self.known.get(slot)
            out[slot] = min(k[2], cached) if k and k[:2] == (sid, window) else 0
        return out

    def reset(self, known: dict[int, Mark] | None = None) -> None:
        """A new pipeline: nothing in flight; `known` what it holds for certain."""
        self.pending.clear()
        self.known = dict(known or {})


def rewind(lanes: list, keep: dict[int, int], live: Callable[[Any], bool]) -> list:
    """After a recovery: the lanes' live sequences in slots of `keep` (slot -> n)
    stay, their caches cut to n positions (the next step prefills what lies past
    them); every other one is taken out of its lane and returned, in slot order, to
    be admitted again and prefilled from its tokens so far. A sampled one draws from
    a new stream, derived from its seed and length."""
    resumed = []
    for lane in lanes:
        kept = {}
        for slot in sorted(lane.seqs):
            seq = lane.seqs[slot]
            if not live(seq):
                continue
            if keep.get(slot, 0) > 0:
                seq.state.cached = keep[slot]
                kept[slot] = seq
                continue
            seq.slot, seq.state.cached = None, 0
            if seq.params.temperature > 0:
                seq.seed = sample_seed(seq.seed, len(seq.generated))
            resumed.append(seq)
        lane.seqs = kept
        lane.in_flight = None
    return resumed
