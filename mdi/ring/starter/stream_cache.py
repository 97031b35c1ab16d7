"""Weights streams kept for the spares (`--recovery replay` with spares listed).

When a node is lost and a spare takes its layer range (heal.py), the spare needs
that range's weights before anything else can happen, and making the stream
(checkpoint/stream.py: a GGUF's tensors read, its Q8_0 ones dequantized and
requantized as int8 rows, the Q4 codes packed) took the starter about 0.6 s of
the spare's 0.8-1.0 s for a SmolLM2 stage, every sequence waiting. The starter
made the same bytes when it formed the ring: each secondary's upload now passes
through `StreamCache.tee`, which keeps the chunks it sends (they are fresh
`bytes`, so keeping them is a reference, not a copy), and the spare's upload
sends the kept bytes (`get`) instead of making them again. Nothing more is
computed before a loss.

The cost is memory on the starter: the bytes of every secondary's stage as it
travels (the int4 codes, for a quantized run: about the node's weights). Each
stream is kept only if free memory (plan/limits.py:free_memory, what the nodes'
own memory checks read) still leaves at least as much again after it, and if
the cache stays under its `limit` (MDI_STREAM_CACHE_MB, default 1024 MiB);
otherwise it is made afresh at recovery, as before. The ranges a ring formed
anew no longer has are dropped, and everything once a ring is configured with
no spare left (after the spare's own upload, from the cache) or the starter is
left alone (RingClient.with_nodes: before it checks that the whole model fits
its free memory, ring_engine.py).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

from ..plan.limits import free_memory

log = logging.getLogger(__name__)
ENV_VAR = "MDI_STREAM_CACHE_MB"
DEFAULT_LIMIT = 1024 << 20
Key = tuple  # (start, stop, quantize, dtype): what a stage's stream depends on, beyond its file


def default_limit() -> int:
    """The cache's bound in bytes: MDI_STREAM_CACHE_MB when set (0: keep nothing)."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_LIMIT
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r}: give a size in MiB (0 keeps nothing)") from None
    if mb < 0:
        raise ValueError(f"{ENV_VAR}={raw!r}: give a size in MiB (0 keeps nothing)")
    return int(mb * 2**20)


class StreamCache:
    """Stage streams by key, as the byte chunks that were sent."""

    def __init__(self, limit: int | None = None, device: str = "cpu") -> None:
        self.limit = default_limit() if limit is None else limit
        self.device = device
        self.streams: dict[Key, tuple[int, list[bytes]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(total for total, _ in self.streams.values())

    def get(self, key: Key) -> tuple[int, Iterator[bytes]] | None:
        """(total, chunks) of a kept stream, or None."""
        kept = self.streams.get(key)
        if kept is None:
            return None
        total, chunks = kept
        return total, iter(chunks)

    def room_for(self, total: int) -> str | None:
        """Why a stream of `total` bytes is not kept (None: it is)."""
        if self.nbytes + total > self.limit:
            return (f"the cache would hold {(self.nbytes + total) / 2**20:.0f} MiB, more than "
                    f"its limit of {self.limit / 2**20:.0f} MiB ({ENV_VAR})")
        free = free_memory(self.device)
        if 2 * total > free.free:
            return (f"{total / 2**20:.0f} MiB would leave less than as much again of the "
                    f"{free.free / 2**20:.0f} MiB left ({free.where})")
        return None

    def tee(self, key: Key, total: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """chunks as they are, kept under `key` once they hold `total` bytes (and the
        room is there: room_for); a stream cut short keeps nothing."""
        why = self.room_for(total) if key not in self.streams else "kept already"
        if why is not None:
            if why != "kept already":
                log.info("the weights of layers [%d, %d) are not kept for a spare: %s",
                         key[0], key[1], why)
            yield from chunks
            return
        kept: list[bytes] = []
        n = 0
        for chunk in chunks:
            kept.append(chunk)
            n += len(chunk)
            if n == total:  # kept before the last chunk goes: the consumer (httpx) may stop
                self.streams[key] = (total, kept)  # reading once it has the length
                log.info("kept the weights of layers [%d, %d) for a spare: %.1f MiB (%.1f MiB "
                         "in all)", key[0], key[1], total / 2**20, self.nbytes / 2**20)
            elif n > total:
                self.streams.pop(key, None)  # longer than announced: not the stream
            yield chunk

    def keep_only(self, keys: set[Key]) -> None:
        """Drop the streams of ranges the ring no longer has."""
        for key in [k for k in self.streams if k not in keys]:
            del self.streams[key]

    def clear(self) -> None:
        self.streams.clear()
