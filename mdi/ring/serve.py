"""Run a node process: control plane (uvicorn) and data plane in one asyncio loop.

Both listeners bind the node's own address from the nodes file (all interfaces
only with --bind-any) and set SO_REUSEADDR (asyncio's default on POSIX), so a
node restarted on the same ports binds at once. On /shutdown, SIGTERM or
SIGINT, uvicorn stops taking requests, open requests get a few seconds, the
current run is dropped and the data listener closed.
"""
from __future__ import annotations

import logging

import uvicorn

from . import aio
from .control import create_app
from .node import NodeRuntime

log = logging.getLogger(__name__)
GRACEFUL_SHUTDOWN_S = 3      # open control requests get this long on shutdown
MAX_CONNECTIONS = 64         # concurrent control connections (more get 503)


async def serve_node(rt: NodeRuntime) -> None:
    try:
        await rt.start_data_server()
    except OSError as e:
        raise OSError(f"{rt.spec.name} cannot listen for data on {rt.bind_host}:{rt.spec.port_in}: "
                      f"{e.strerror or e}") from None
    config = uvicorn.Config(None, host=rt.bind_host, port=rt.spec.port, log_level="warning",
                            lifespan="off", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            limit_concurrency=MAX_CONNECTIONS)
    server = uvicorn.Server(config)

    def request_exit() -> None:
        server.should_exit = True

    config.app = create_app(rt, on_shutdown=request_exit)
    log.info("%s serving control on %s:%d, data on %s:%d", rt.spec.name, rt.bind_host,
             rt.spec.port, rt.bind_host, rt.spec.port_in)
    try:
        await server.serve()
    finally:
        await rt.close()
        log.info("%s stopped", rt.spec.name)


def run_node(rt: NodeRuntime) -> None:
    aio.run(serve_node(rt))
