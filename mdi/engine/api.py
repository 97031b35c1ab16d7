"""The engine's contract with its drivers (`mdi sample`, `run`, `starter`, `serve`).

A driver submits sequences (prompt token ids + per-sequence parameters) and
reads each one's events as tokens are produced. The engine owns admission
(a bounded queue, a sequence joins at a step boundary), prefill, batched
decode with the other sequences of its lane, and retirement (stop id, stop
string, token budget, cancel), freeing the sequence's KV slot on every node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from ..generate.sampling import SamplingConfig

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


@dataclass(frozen=True, init=False)
class SeqParams:
    """One sequence's request: its token budget, stop conditions and sampling.

    The sampling parameters are one SamplingConfig, checked (and defaulted) by it
    alone: give them as keywords (temperature=, top_k=, top_p=, seed=; seed None:
    the engine picks one), or as `sampling=` when they were checked already (a
    batch's per-sample streams). The same check runs on every node that receives
    the sequence's ADMIT frame: what passes here passes there."""
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]             # stop strings; the text before the first match is kept
    stop_ids: tuple[int, ...]         # e.g. EOS / end-of-turn token ids (not emitted)

    def __init__(self, max_tokens: int, *, stop: tuple[str, ...] = (),
                 stop_ids: tuple[int, ...] = (), sampling: SamplingConfig | None = None,
                 **sampling_fields: Any) -> None:
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if sampling is None:
            sampling = SamplingConfig(**sampling_fields)
        elif sampling_fields:
            raise TypeError(f"SeqParams: sampling= or {', '.join(sampling_fields)}, not both")
        for name, value in (("max_tokens", max_tokens), ("sampling", sampling),
                            ("stop", tuple(stop)), ("stop_ids", tuple(stop_ids))):
            object.__setattr__(self, name, value)  # frozen: as the dataclass __init__ does

    # the sampling fields, as the scheduler and drivers read them
    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @property
    def top_k(self) -> int | None:
        return self.sampling.top_k

    @property
    def top_p(self) -> float | None:
        return self.sampling.top_p

    @property
    def seed(self) -> int | None:
        return self.sampling.seed


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
