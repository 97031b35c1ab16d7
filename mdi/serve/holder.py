"""The engine a server drives: built by a factory, replaced after a failure.

When the engine fails (EngineFailure, e.g. a node of the ring died) the
routes answer 500 naming the node and call `failed`; the holder closes that
engine and builds a fresh one (the ring re-forms), retrying with backoff,
while requests meanwhile get 503 + Retry-After (`get`).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable, Union

from ..engine.api import Engine, EngineFailure
from . import openai_schema as oa

log = logging.getLogger("mdi.serve")
EngineFactory = Callable[[], Union[Engine, Awaitable[Engine]]]


class EngineHolder:
    """Owns the engine: starts it, and replaces it after a failure (one rebuild at a time)."""

    def __init__(self, factory: EngineFactory, retry_s: float = 2.0) -> None:
        self.factory, self.retry_s = factory, retry_s
        self.engine: Engine | None = None
        self.state = "starting"               # starting | ready | rebuilding | closed
        self.builds = 0
        self.stalled = 0                       # stalled sequences of the engines replaced so far
        self.last_failure: str | None = None   # the failure that caused the latest rebuild
        self.rebuild_error: str | None = None  # why the rebuild under way failed so far
        self._task: asyncio.Task | None = None

    async def _build(self) -> Engine:
        engine = self.factory()
        if inspect.isawaitable(engine):
            engine = await engine
        await engine.start()
        self.builds += 1
        return engine

    async def start(self) -> None:
        self.engine = await self._build()
        self.state = "ready"

    def get(self) -> Engine:
        if self.state != "ready" or self.engine is None:
            raise oa.ApiError(503, f"the engine is {self.state}; retry shortly", type="server_error",
                              code="engine_unavailable",
                              headers={"Retry-After": str(max(1, round(self.retry_s)))})
        return self.engine

    def failed(self, engine: Engine, exc: EngineFailure) -> None:
        """Called by whoever saw `engine` fail; the first call schedules the rebuild."""
        if engine is not self.engine or self.state != "ready":
            return
        self.state = "rebuilding"
        self.last_failure = f"{exc} (node {exc.node})" if exc.node else str(exc)
        log.error("engine failed: %s; rebuilding it", self.last_failure)
        self._task = asyncio.create_task(self._rebuild(engine))

    async def _rebuild(self, old: Engine) -> None:
        self.stalled += getattr(old, "stalled", 0)
        try:
            await old.close()
        except Exception:  # noqa: BLE001 - a failed engine may fail to close; we replace it anyway
            log.exception("closing the failed engine")
        delay = self.retry_s
        while self.state == "rebuilding":
            try:
                self.engine = await self._build()
                self.state, self.rebuild_error = "ready", None
                log.info("engine rebuilt (build %d)", self.builds)
            except Exception as e:  # noqa: BLE001 - keep trying: the server stays up, health says why
                self.rebuild_error = str(e)
                log.error("rebuilding the engine failed (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    async def close(self) -> None:
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.engine is not None:
            await self.engine.close()


def failure_error(exc: EngineFailure) -> oa.ApiError:
    where = f" at node {exc.node}" if exc.node else ""
    return oa.ApiError(500, f"engine failure{where}: {exc}", type="server_error", code="engine_failure")
