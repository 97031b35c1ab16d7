"""Run a node process: control plane (uvicorn) and data plane in one asyncio loop.

Both listeners bind the node's own address from the nodes file (all interfaces
only with --bind-any) and set SO_REUSEADDR, so a node restarted on the same
ports binds at once. A port that cannot be bound ends the process with exit
status 4 (EXIT_LISTEN_FAILURE) and the port named; 3 stays the starter's
status for a failed node. On /shutdown, SIGTERM or SIGINT, uvicorn stops
taking requests, open requests get a few seconds, the current run is dropped
and the data listener closed.

Connections to the control port cannot lock it (net/http_guard.py, as on the API
port of `mdi serve`): a client has --timeout seconds to send complete request
headers and then must send its body at a minimum rate; no byte of a body is read
before its headers carry the token; at most MAX_CONNECTIONS are open at once (and
MAX_PER_CLIENT from one address), one more evicting the slowest unauthenticated. There is no limit on requests that would answer 503, so /health and
the starter are answered however many idle connections a stranger opens.
"""
from __future__ import annotations

import logging
import socket

import uvicorn

from ..protocol import aio
from ...net.log_limit import LogLimiter
from .control_app import create_control_app
from ..plan.fused_check import start_loading
from ...net.http_guard import guarded
from .runtime import NodeRuntime
from ..protocol.sock_io import listen_sockets

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 3      # open control requests get this long on shutdown
EXIT_LISTEN_FAILURE = 4      # `mdi node` exit status: a port could not be bound


class ListenError(OSError):
    """A port this node must listen on cannot be bound (taken, or not an address here)."""
    exit_code = EXIT_LISTEN_FAILURE


def bind_control(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port, as asyncio's create_server makes them, or ListenError.

    Bound here rather than by uvicorn, which logs and calls sys.exit(3) on failure.
    """
    try:
        return listen_sockets(host, port)
    except OSError as e:
        raise ListenError(f"cannot listen for control on {host}:{port}: {e.strerror or e}") from None


async def serve_node(rt: NodeRuntime) -> None:
    socks = bind_control(rt.bind_host, rt.spec.port)
    try:
        await rt.start_data_server()
    except OSError as e:
        for s in socks:
            s.close()
        raise ListenError(f"{rt.spec.name} cannot listen for data on {rt.bind_host}:"
                          f"{rt.spec.port_in}: {e.strerror or e}") from None
    protocol = guarded("control", header_timeout=rt.timeout, secret=rt.token or None)
    config = uvicorn.Config(None, host=rt.bind_host, port=rt.spec.port, log_level="warning",
                            lifespan="off", access_log=False, http=protocol,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    def request_exit() -> None:
        server.should_exit = True

    config.app = create_control_app(rt, on_shutdown=request_exit)
    LogLimiter.install()  # the process's network-facing warnings, from here on
    start_loading(rt.spec.device)  # the fused kernels, for /capabilities (fused_check.py)
    log.info("%s serving control on %s:%d, data on %s:%d", rt.spec.name, rt.bind_host,
             rt.spec.port, rt.bind_host, rt.spec.port_in)
    try:
        await server.serve(sockets=socks)
    finally:
        await rt.close()
        log.info("%s stopped", rt.spec.name)


def run_node(rt: NodeRuntime) -> None:
    aio.run(serve_node(rt))
