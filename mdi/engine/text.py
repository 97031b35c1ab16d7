"""Incremental detokenization with stop strings.

A sequence's text is the decoding of its generated ids. Each token decodes only
a short window: the ids since the last point where the text was complete,
minus the text those same ids gave before (decoding from a common start keeps
tokenizers that drop a leading space from changing the text), so the cost per
token does not grow with the sequence. A token that ends inside a multi-byte
character (U+FFFD) adds nothing until the next one completes it. Text is
released as it becomes final: any tail that may be the beginning of a stop
string is held back until the next token decides. When a stop string appears,
the text before it is the sequence's final text.
"""
from __future__ import annotations

from typing import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""          # decoded text of ids[:read]
        self.released = 0       # characters of text already released
        self.prefix = 0         # ids[prefix:read] decoded give the window's known text
        self.read = 0           # ids decoded into text so far

    def _window(self) -> tuple[str, str]:
        """(text of ids[prefix:read], text of ids[prefix:]), decoded from the same start."""
        return self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns (text released now, whether a stop string matched)."""
        self.ids.append(token)
        known, new = self._window()
        if len(new) > len(known) and not new.endswith("\ufffd"):
            self.text += new[len(known):]
            self.prefix, self.read = self.read, len(self.ids)
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
        """The text held back, released at the end of a sequence (no stop string matched).
        A last character still incomplete (the budget ended inside its bytes) is left out:
        text never ends in half a character (U+FFFD)."""
        if self.read < len(self.ids):
            known, new = self._window()
            if not new.endswith("\ufffd"):
                self.text += new[len(known):]
                self.read = len(self.ids)
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
        return hold
