"""The starter's replay to the spare, slot by slot as the engine needs it
(`--recovery replay` when the lost node was the first secondary: heal.py).

A REPLAY frame of a slot must reach the spare before any other frame of that
slot (docs/wire.md), and no sooner is needed. Sent all at once, before the
healed ring's first step, the replay of every sequence had to be computed
before any sequence got its next token: the spare prefills its layers slot
after slot while the rest of the ring waits. Held back instead (`HeldReplay`),
each slot's replay goes out just before the first frame that names the slot:
the engine steps lane after lane, so the first lane's sequences decode while
the spare still prefills the next lane's, and the longest wait for a token is
that of one lane's replay, not all of them. Frames cross the link in the order
they are sent and the spare computes them in that order, so each slot's cache
is filled before its step, as before; the caches are the same. The link
(tcp_link.py) puts a slot's held frames in its buffer without waiting for the
spare to take them, so that the engine goes on reading the other lanes' tokens.
"""
from __future__ import annotations

from ...engine.messages import Message, Replay


def slots_of(msg: Message) -> tuple[int, ...]:
    """The slots a message names (a lane's step: its slots; the others: theirs)."""
    slots = getattr(msg, "slots", None)
    return tuple(slots) if slots is not None else (msg.slot,)


class HeldReplay:
    """Replay frames per slot, in order, until the slot's first other frame."""

    def __init__(self, msgs: list[Replay]) -> None:
        self.held: dict[int, list[Replay]] = {}
        for m in msgs:
            self.held.setdefault(m.slot, []).append(m)

    def __bool__(self) -> bool:
        return bool(self.held)

    def before(self, msg: Message) -> list[Replay]:
        """What must go out before msg: the held replay of each slot it names, in
        slot order (then nothing more for those slots)."""
        out: list[Replay] = []
        for slot in sorted(set(slots_of(msg))):
            out += self.held.pop(slot, [])
        return out

    def rest(self) -> list[Replay]:
        """Everything still held, in slot order (and nothing held after)."""
        out = [m for slot in sorted(self.held) for m in self.held[slot]]
        self.held.clear()
        return out
