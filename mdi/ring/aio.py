"""asyncio helpers the ring's network code shares (no knowledge of frames or tokens)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout: float) -> T:
    """`await aw`, raising asyncio.TimeoutError after `timeout` seconds.

    asyncio.wait_for before Python 3.12 can swallow a cancellation that arrives
    just as `aw` completes (then Ctrl-C, or a node dropping a run, is lost and
    the loop goes on); asyncio.timeout cannot.
    """
    if hasattr(asyncio, "timeout"):  # Python >= 3.11
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)
