"""Run a node process: control plane (uvicorn) and data plane in one asyncio loop.

Both listeners bind the node's own address from the nodes file (all interfaces
only with --bind-any) and set SO_REUSEADDR, so a node restarted on the same
ports binds at once. A port that cannot be bound ends the process with exit
status 4 (EXIT_LISTEN_FAILURE) and the port named; 3 stays the starter's
status for a failed node. On /shutdown, SIGTERM or SIGINT, uvicorn stops
taking requests, open requests get a few seconds, the current run is dropped
and the data listener closed.

Connections to the control port cannot lock it: a client has --timeout seconds
from connecting (or from the first byte of its next request) to send complete
request headers, else the connection is closed; and at most MAX_CONNECTIONS are
open at once: one more evicts the longest-silent connection that has no
request in flight (or whose peer does not read its answers). There is no
limit on requests that would answer 503, so /health and the starter are
answered however many idle connections a stranger opens.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .control import LogLimiter, create_app
from .node import NodeRuntime

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 3      # open control requests get this long on shutdown
MAX_CONNECTIONS = 128        # open control connections; one more evicts an idle one
EXIT_LISTEN_FAILURE = 4      # `mdi node` exit status: a port could not be bound


class ListenError(OSError):
    """A port this node must listen on cannot be bound (taken, or not an address here)."""
    exit_code = EXIT_LISTEN_FAILURE


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a cap with idle eviction.

    `busy`: a request in flight whose answer the peer is reading. Idle (no
    request, or headers still arriving) and stuck (answer not read, write side
    paused) connections are the ones evicted, longest silent first.
    """
    header_timeout: float = 10.0  # set per server by serve_node

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.last_active = self.loop.time()
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()
        if sum(not c.transport.is_closing() for c in self.connections) > MAX_CONNECTIONS:
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
            log.warning("closed control connection from %s: no complete request headers "
                        "within %g s", _peer(self.client), self.header_timeout)
            self.transport.close()

    def _evict(self) -> None:
        idle = [c for c in self.connections
                if isinstance(c, GuardedProtocol) and not c.busy and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c.last_active) if idle else self
        log.warning("closed control connection from %s: more than %d connections open",
                    _peer(victim.client), MAX_CONNECTIONS)
        victim.transport.close()


def _peer(client) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def bind_control(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port, as asyncio's create_server makes them, or ListenError.

    Bound here rather than by uvicorn, which logs and calls sys.exit(3) on failure.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ListenError(f"cannot listen for control on {host}:{port}: {e.strerror or e}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.setblocking(False)
    except OSError as e:
        for s in socks:
            s.close()
        raise ListenError(f"cannot listen for control on {host}:{port}: {e.strerror or e}") from None
    return socks


async def serve_node(rt: NodeRuntime) -> None:
    socks = bind_control(rt.bind_host, rt.spec.port)
    try:
        await rt.start_data_server()
    except OSError as e:
        for s in socks:
            s.close()
        raise ListenError(f"{rt.spec.name} cannot listen for data on {rt.bind_host}:"
                          f"{rt.spec.port_in}: {e.strerror or e}") from None
    # The first model built on the meta device costs seconds (torch loads its meta
    # kernels on the first normal_); /init sizes a run that way, so pay it before the
    # node answers: a starter's first /init then takes milliseconds, not seconds.
    await asyncio.get_running_loop().run_in_executor(rt.executor, _warm_up)
    protocol = type("NodeProtocol", (GuardedProtocol,), {"header_timeout": rt.timeout})
    config = uvicorn.Config(None, host=rt.bind_host, port=rt.spec.port, log_level="warning",
                            lifespan="off", access_log=False, http=protocol,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    def request_exit() -> None:
        server.should_exit = True

    config.app = create_app(rt, on_shutdown=request_exit)
    LogLimiter.install()  # the process's network-facing warnings, from here on
    log.info("%s serving control on %s:%d, data on %s:%d", rt.spec.name, rt.bind_host,
             rt.spec.port, rt.bind_host, rt.spec.port_in)
    try:
        await server.serve(sockets=socks)
    finally:
        await rt.close()
        log.info("%s stopped", rt.spec.name)


def _warm_up() -> None:
    import torch

    from ..model import GPTConfig
    from .limits import stage_weight_bytes

    stage_weight_bytes(GPTConfig(vocab_size=8, block_size=8, n_layer=2, n_head=1, n_embd=8),
                       1, 2, torch.float32)


def run_node(rt: NodeRuntime) -> None:
    asyncio.run(serve_node(rt))
