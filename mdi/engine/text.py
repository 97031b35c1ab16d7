"""Incremental detokenization with stop strings.

A sequence's text is the decoding of all its generated ids (decoded whole each
time, so multi-byte characters split over tokens come out right). Text is
released as it becomes final: an incomplete character at the end (U+FFFD) and
any tail that may be the beginning of a stop string are held back until the
next token decides. When a stop string appears, the text before it is the
sequence's final text.
"""
from __future__ import annotations

from typing import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""          # decoded text of ids
        self.released = 0       # characters of text already released

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns (text released now, whether a stop string matched)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.released - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = max(min(hits), self.released)
                out = self.text[self.released:end]
                self.released = end
                return out, True
        end = len(self.text) - self._hold()
        if end <= self.released:
            return "", False
        out = self.text[self.released:end]
        self.released = end
        return out, False

    def flush(self) -> str:
        """The text held back, released at the end of a sequence (no stop string matched)."""
        out = self.text[self.released:]
        self.released = len(self.text)
        return out

    def _hold(self) -> int:
        """Characters at the end of text that cannot be released yet."""
        t = self.text
        hold = 0
        for s in self.stop:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(t)), hold, -1):
                if t.endswith(s[:k]):
                    hold = k
                    break
        n = len(t) - len(t.rstrip("\ufffd"))  # an incomplete character still being decoded
        return max(hold, n)
