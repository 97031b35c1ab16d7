"""uvicorn's h11 protocol, guarded against idle and slow-header connections.

Used by every HTTP port we open: a node's control plane (ring/serve.py) and the
API of `mdi serve` (serve/server.py). A client has `header_timeout` seconds from
connecting (or from the first byte of its next request) to send complete
request headers, else the connection is closed; and at most `max_connections`
are open at once: one more evicts the longest-silent connection that has no
request in flight (or whose peer does not read its answers). There is no limit
on requests that would answer 503, so /health and real clients are answered
however many idle connections a stranger opens.
"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 128        # open connections; one more evicts an idle one
HEADER_TIMEOUT_S = 10.0      # seconds to send complete request headers


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a cap with idle eviction.

    `busy`: a request in flight whose answer the peer is reading. Idle (no
    request, or headers still arriving) and stuck (answer not read, write side
    paused) connections are the ones evicted, longest silent first. Subclass it
    per server with `guarded(...)`: the settings are class attributes because
    uvicorn builds the protocol itself.
    """
    header_timeout: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    what: str = "HTTP"           # names the port in the log: "control", "API"

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.last_active = self.loop.time()
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        if sum(not c.transport.is_closing() for c in self.connections) > self.max_connections:
            self._evict()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        between = self.cycle is None or self.cycle.response_complete
        if between and self._header_deadline is None:
            self._arm_header_deadline()  # the next request's headers start arriving now
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    @property
    def busy(self) -> bool:
        in_flight = self.cycle is not None and not self.cycle.response_complete
        return in_flight and not self.flow.write_paused

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            log.warning("closed %s connection from %s: no complete request headers "
                        "within %g s", self.what, _peer(self.client), self.header_timeout)
            self.transport.close()

    def _evict(self) -> None:
        idle = [c for c in self.connections
                if isinstance(c, GuardedProtocol) and not c.busy and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c.last_active) if idle else self
        log.warning("closed %s connection from %s: more than %d connections open",
                    self.what, _peer(victim.client), self.max_connections)
        victim.transport.close()


def guarded(what: str, header_timeout: float = HEADER_TIMEOUT_S,
            max_connections: int = MAX_CONNECTIONS) -> type[GuardedProtocol]:
    """A GuardedProtocol with these settings, for uvicorn.Config(http=...)."""
    if not header_timeout > 0 or max_connections < 1:
        raise ValueError(f"header_timeout must be > 0 and max_connections >= 1, got "
                         f"{header_timeout} and {max_connections}")
    return type(f"Guarded{what.title()}Protocol", (GuardedProtocol,),
                {"what": what, "header_timeout": header_timeout, "max_connections": max_connections})


def _peer(client) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
