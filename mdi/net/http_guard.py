"""uvicorn's h11 protocol, guarded against idle, slow and unauthenticated connections.

Used by every HTTP port we open: a node's control plane (ring/node/process.py) and
the API of `mdi serve` (serve/server.py). What a connection must do to stay open:

- send complete request headers within `header_timeout` seconds of connecting (or
  of the first byte of its next request);
- then send its body at `min_body_rate` bytes a second or faster, after a grace of
  `header_timeout` seconds: a body of n bytes must be complete `header_timeout +
  n / min_body_rate` seconds after its headers (a trickle of one byte a second is
  closed after the grace);
- a request answered before its body was read (the app answers 401 from the
  headers alone, or 413) with more than DRAIN_BYTES of it still to come has its
  connection half-closed after the answer (which says `Connection: close`) and
  closed once its peer has been silent for LINGER_S (at most LINGER_MAX_S after the
  answer): what else arrives is dropped unread, and a client still sending its body
  finishes and reads the answer instead of being reset mid-write. A smaller rest is
  drained and the connection kept. On a port with a
  `secret`, a connection whose last request carried it (`Authorization: Bearer
  ...`) is *authenticated* and evicted last.

At most `max_connections` are open at once, and at most `max_per_client` from one
client address. One more evicts another connection of the same scope, never one
with a request in flight whose answer its peer is reading: first unauthenticated
ones, then those that never had a request answered, then connections older than
`FRESH_S` (a client that just connected has had no time to send anything), then
those whose peer does not read its answer, and among equals the one that sent the
fewest bytes a second (among fresh ones, the oldest). Only when every other
connection is busy is the newcomer itself closed. There is no limit on requests
that would answer 503, so /health and real clients are answered however many
idle or trickling connections a stranger opens.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 128        # open connections; one more evicts another
MAX_PER_CLIENT = 64          # open connections from one client address
HEADER_TIMEOUT_S = 10.0      # seconds to send complete request headers (and the body's grace)
MIN_BODY_RATE = 1024         # bytes a second a request body must arrive at, after the grace
DRAIN_BYTES = 65536          # a body answered unread is still drained (connection kept) up to this
LINGER_S = 1.0               # silence after which a connection answered unread is closed
LINGER_MAX_S = 10.0          # ... and the longest it is kept after that answer
FRESH_S = 1.0                # a connection this young is evicted after older idle ones
# The API port's answers wait in at most about this much buffer per connection: the
# socket's send buffer (the kernel keeps twice it) and asyncio's before the transport
# pauses. Linux grows a send buffer left to itself to 4 MB: a client that never reads
# would pin that much kernel memory and, before the server's writes block (and its
# sequence pauses, engine/sequence.py), ~20,000 streamed tokens' worth of compute.
SEND_BUFFER = 32768


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines, connection caps and eviction.

    Subclass it per server with `guarded(...)`: the settings are class attributes
    because uvicorn builds the protocol itself.
    """
    header_timeout: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    max_per_client: int = MAX_PER_CLIENT
    min_body_rate: float = MIN_BODY_RATE
    secret: bytes | None = None  # the port's bearer credential (node token, API key)
    send_buffer: int | None = None  # bytes: see SEND_BUFFER (None: the kernel's and asyncio's)
    what: str = "HTTP"           # names the port in the log: "control", "API"

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._raw = transport
        sock = transport.get_extra_info("socket")
        if self.send_buffer and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
            transport.set_write_buffer_limits(high=self.send_buffer)
        super().connection_made(_LingeringTransport(transport, self))
        now = self.loop.time()
        self.connected_at = self.last_active = now
        self.bytes_in = 0
        self.authenticated = False
        self.served = 0                          # requests answered on this connection
        self._lingering = False
        self._shutting = False
        self._linger_since = 0.0
        self._body_length: int | None = None  # the current request's Content-Length
        self._body_start: float | None = None  # when the current request's body began
        self._body_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        self._enforce_caps()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered and half-closed: dropped unread
            self.last_active = self.loop.time()
            return
        self.last_active = self.loop.time()
        self.bytes_in += len(data)
        between = self.cycle is None or self.cycle.response_complete
        if between and self._header_deadline is None and self._body_start is None:
            self._arm_header_deadline()  # the next request's headers start arriving now
        cycle = self.cycle
        if self._body_start is not None:
            self._body_bytes += len(data)
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete
            self._cancel_header_deadline()
            self._headers_complete()
        if self._body_start is not None and self.conn.their_state is not h11.SEND_BODY:
            self._end_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        self._end_body()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self.served += 1
        super().on_response_complete()

    def shutdown(self) -> None:  # the server stops: no lingering
        self._shutting = True
        if self._lingering:
            self._raw.close()
        else:
            super().shutdown()

    def _closing(self) -> bool:
        """uvicorn closes the connection: linger instead if the peer is still sending a
        body that was answered unread (a 401 from the headers, a 413). Closing a socket
        with unread bytes resets the connection, and the answer with it, before the
        client (still writing) reads it. Returns whether the close is deferred."""
        if self._lingering:
            return True
        if self._shutting:
            return False
        answered = self.cycle is not None and self.cycle.response_complete
        if not answered or self.conn.their_state is not h11.SEND_BODY or self._raw.is_closing():
            return False
        self._end_body()
        self._lingering = True
        self._linger_since = self.last_active = self.loop.time()
        self.flow.resume_reading()
        if self._raw.can_write_eof():
            self._raw.write_eof()
        self.loop.call_later(LINGER_S, self._linger)
        return True

    # ---- states ------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A request in flight (its body complete) whose answer the peer is reading."""
        in_flight = self.cycle is not None and not self.cycle.response_complete
        return in_flight and self._body_start is None and not self.flow.write_paused

    def _headers_complete(self) -> None:
        self.authenticated = self.secret is not None and _bearer_matches(self.headers, self.secret)
        if self.conn.their_state is h11.SEND_BODY:
            self._body_start, self._body_bytes = self.loop.time(), 0
            self._body_length = _content_length(self.headers)
            self._arm_body_deadline(self.header_timeout)
            if self._body_length is None or self._body_length > DRAIN_BYTES:
                # should the app answer before reading it, the connection closes after the
                # answer: say so in it (h11 then writes Connection: close)
                self.conn._cstate.process_keep_alive_disabled()

    def _end_body(self) -> None:
        self._body_start = None
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _linger(self) -> None:
        """Close a connection answered unread once its peer is silent (or after LINGER_MAX_S)."""
        if self._raw.is_closing():
            return
        now = self.loop.time()
        quiet_at = self.last_active + LINGER_S
        if now >= quiet_at or now >= self._linger_since + LINGER_MAX_S:
            self._raw.close()
        else:
            self.loop.call_later(min(quiet_at, self._linger_since + LINGER_MAX_S) - now, self._linger)

    # ---- deadlines -----------------------------------------------------------
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
            self._close(f"no complete request headers within {self.header_timeout:g} s")

    def _arm_body_deadline(self, delay: float) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
        self._body_deadline = self.loop.call_later(max(delay, 0.05), self._check_body)

    def _check_body(self) -> None:
        """The body must be complete header_timeout + bytes / min_body_rate seconds after
        its headers; re-armed until then, since the bytes so far move the deadline."""
        self._body_deadline = None
        if self._body_start is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # we are not reading: the time is not the client's fault
            self._body_start = now - self.header_timeout / 2
            self._arm_body_deadline(self.header_timeout)
            return
        deadline = self._body_start + self.header_timeout + self._body_bytes / self.min_body_rate
        if now < deadline:
            self._arm_body_deadline(deadline - now)
            return
        self._close(f"request body slower than {self.min_body_rate:g} bytes/s "
                    f"({self._body_bytes} bytes in {now - self._body_start:.1f} s)")

    # ---- caps and eviction -----------------------------------------------------
    def _open(self) -> list["GuardedProtocol"]:
        return [c for c in self.connections  # lingering ones count, and go first
                if isinstance(c, GuardedProtocol) and not c._raw.is_closing()]

    def _enforce_caps(self) -> None:
        peers = self._open()
        if len(peers) > self.max_connections:
            self._evict(peers, f"more than {self.max_connections} connections open")
        address = self.client[0] if self.client else None
        mine = [c for c in peers if (c.client[0] if c.client else None) == address
                and not c._raw.is_closing()]  # not the one just evicted
        if len(mine) > self.max_per_client and not self._raw.is_closing():
            self._evict(mine, f"more than {self.max_per_client} connections open from {address}")

    def _evict(self, among: list["GuardedProtocol"], why: str) -> None:
        now = self.loop.time()
        others = [c for c in among if c is not self and not c.busy and not c._raw.is_closing()]
        victim = min(others, key=lambda c: c._keep_score(now)) if others else self
        log.debug("evicting %s (not lingering, authenticated, answered, fresh, stuck, bytes/s, "
                  "last active): %s", _peer(victim.client), victim._keep_score(now))
        victim._close(why)

    def _keep_score(self, now: float) -> tuple:
        """Lower is evicted first: lingering after an answer; unauthenticated; never
        answered (a client that completed a request is worth more than one that never
        did: an attacker that reconnects at once must not outrank it by being fresh);
        then old before fresh; idle or slow before stuck; the fewest bytes a second
        (among fresh ones: the oldest); the longest silent."""
        age = max(now - self.connected_at, 1e-3)
        stuck = self.cycle is not None and not self.cycle.response_complete and self.flow.write_paused
        fresh = age < FRESH_S
        # a fresh connection's rate means nothing yet (one that has just connected has sent
        # no byte): among fresh ones the oldest goes first
        return (not self._lingering, self.authenticated, self.served > 0, fresh, stuck,
                -age if fresh else self.bytes_in / age, self.last_active)

    def _close(self, why: str) -> None:
        log.warning("closed %s connection from %s: %s", self.what, _peer(self.client), why)
        self._end_body()
        self._raw.close()


class _LingeringTransport:
    """A connection's transport as uvicorn's protocol sees it: a close that would reset a
    peer still sending a body answered unread becomes a linger (GuardedProtocol._closing);
    everything else goes to the real transport."""

    def __init__(self, raw: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._raw, self._protocol = raw, protocol
        self.write = raw.write  # every streamed token: no __getattr__ on the way

    def close(self) -> None:
        if not self._protocol._closing():
            self._raw.close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._raw.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _bearer_matches(headers: list[tuple[bytes, bytes]], secret: bytes) -> bool:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), secret)
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is a number
    return None


def guarded(what: str, header_timeout: float = HEADER_TIMEOUT_S,
            max_connections: int = MAX_CONNECTIONS, max_per_client: int = MAX_PER_CLIENT,
            min_body_rate: float = MIN_BODY_RATE, secret: str | None = None,
            send_buffer: int | None = None) -> type[GuardedProtocol]:
    """A GuardedProtocol with these settings, for uvicorn.Config(http=...)."""
    if not header_timeout > 0 or max_connections < 1 or max_per_client < 1 or not min_body_rate > 0:
        raise ValueError(f"header_timeout and min_body_rate must be > 0, max_connections and "
                         f"max_per_client >= 1, got {header_timeout}, {min_body_rate}, "
                         f"{max_connections} and {max_per_client}")
    return type(f"Guarded{what.title()}Protocol", (GuardedProtocol,),
                {"what": what, "header_timeout": header_timeout, "max_connections": max_connections,
                 "max_per_client": max_per_client, "min_body_rate": min_body_rate,
                 "secret": secret.encode() if secret else None, "send_buffer": send_buffer})


def _peer(client) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
