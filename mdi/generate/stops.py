"""When a sequence ends before its token budget: stop ids (EOS, end of turn) and stop strings."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stops:
    ids: tuple[int, ...] = ()         # token ids that end a sequence (not emitted)
    strings: tuple[str, ...] = ()     # text that ends a sequence (the text before it is kept)

    def __post_init__(self) -> None:
        if any(not s for s in self.strings):
            raise ValueError("a stop string must not be empty")
