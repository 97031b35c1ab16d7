"""Run a node process: control plane (uvicorn) and data plane in one asyncio loop."""
from __future__ import annotations

import asyncio
import logging

import uvicorn

from .control import create_app
from .node import NodeRuntime

log = logging.getLogger(__name__)


async def serve_node(rt: NodeRuntime) -> None:
    await rt.start_data_server()
    config = uvicorn.Config(None, host=rt.bind_host, port=rt.spec.port, log_level="warning",
                            lifespan="off", access_log=False)
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
    asyncio.run(serve_node(rt))
