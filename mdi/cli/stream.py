"""Printing a fixed batch's text as it is generated.

The bytes written equal the non-streaming output (each sample's prompt, its
text, then a separator line), in sample order: sample 0 streams; the text of
later samples, generated at the same time, is kept until their turn, then
they stream in turn.
"""
from __future__ import annotations

import sys
from typing import TextIO

from ..engine.api import Event

SEPARATOR = "\n---------------\n"


class StreamPrinter:
    def __init__(self, prompts: list[str], out: TextIO | None = None) -> None:
        self.prompts = prompts
        self.out = out or sys.stdout
        self.pending = ["" for _ in prompts]   # text not printed yet, per sample
        self.done = [False] * len(prompts)
        self.current = 0                       # the sample being printed
        self.started = False

    def __call__(self, i: int, ev: Event) -> None:
        self.pending[i] += ev.text
        if ev.finish_reason is not None:
            self.done[i] = True
        self._flush()

    def finish(self) -> None:
        """The run ended early: print every sample's text so far, in order."""
        self.done = [True] * len(self.prompts)
        self._flush()

    def _flush(self) -> None:
        while self.current < len(self.prompts):
            i = self.current
            if not self.started:
                self.out.write(self.prompts[i])
                self.started = True
            if self.pending[i]:
                self.out.write(self.pending[i])
                self.pending[i] = ""
            if not self.done[i]:
                break
            self.out.write(SEPARATOR)
            self.current += 1
            self.started = False
        self.out.flush()
