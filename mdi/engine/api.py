"""The engine's contract with its drivers (`mdi sample`, `run`, `starter`, `serve`).

A driver submits sequences (prompt token ids + per-sequence parameters) and
reads each one's events as tokens are produced. The engine owns admission
(a bounded queue, a sequence joins at a step boundary), prefill, batched
decode with the other sequences of its lane, and retirement (stop id, stop
string, token budget, cancel), freeing the sequence's KV slot on every node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..generate.sampling import check_sampling

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineBusy(RuntimeError):
    """The admission queue is full; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineFailure(RuntimeError):
    """The backend failed (e.g. a node of the ring); `node` names it when known."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class SeqParams:
    max_tokens: int
    temperature: float = 1.0          # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None           # None: the engine picks one
    stop: tuple[str, ...] = ()        # stop strings; the text before the first match is kept
    stop_ids: tuple[int, ...] = ()    # e.g. EOS / end-of-turn token ids (not emitted)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        # the nodes apply the same check to the ADMIT frame: what passes here passes there
        check_sampling(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class Event:
    """One step of a sequence: a token and the text it adds, or the end."""
    token: int | None                 # None on the final event
    text: str = ""                    # text released by this event (held back while a stop string may begin)
    finish_reason: str | None = None  # set on the final event only, one of FINISH_REASONS


@dataclass
class SeqStats:
    n_prompt: int
    n_generated: int = 0
    submitted_s: float = 0.0          # perf_counter times
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)


class SeqHandle(Protocol):
    id: int
    stats: SeqStats

    def events(self) -> AsyncIterator[Event]: ...
    def cancel(self) -> None: ...


class Engine(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def submit(self, prompt: list[int], params: SeqParams) -> SeqHandle: ...  # may raise EngineBusy
    @property
    def running(self) -> int: ...
    @property
    def queued(self) -> int: ...
