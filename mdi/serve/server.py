"""Running the app with uvicorn: in the foreground (`mdi serve`) or in a background thread
on a free loopback port (tests, `mdi serve-bench`).

Both speak the nodes' guarded HTTP protocol (net/http_guard.py): deadlines for a
request's headers and body, caps on open connections (in all and per client
address) with eviction of the slowest unauthenticated ones, and no byte of a body
read before its headers carry the API key (when there is one), so idle, slow or
keyless connections cannot lock out /health or a completion."""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from ..net.http_guard import SEND_BUFFER, guarded

log = logging.getLogger("mdi.serve")


EXIT_LISTEN_FAILURE = 4  # as `mdi node`: the port could not be bound


class ListenError(OSError):
    """The address to serve on cannot be bound (taken, or not an address here)."""
    exit_code = EXIT_LISTEN_FAILURE


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def api_config(app: Any, guard: dict[str, Any] | None = None, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the API port, with the guarded protocol (`guard`: the
    arguments of net/http_guard.guarded; the secret is the app's API key)."""
    service = getattr(getattr(app, "state", None), "service", None)
    secret = service.config.api_key if service is not None else None
    guard = {"send_buffer": SEND_BUFFER, **(guard or {})}
    return uvicorn.Config(app, http=guarded("API", secret=secret, **guard), **options)


def serve(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn handles SIGINT/SIGTERM and the app's lifespan).
    The socket is bound first, so a taken port is a ListenError (exit status 4)."""
    from ..net.log_limit import LogLimiter, QueryRedactor

    sock = bind(host, port)
    LogLimiter.install()  # a stranger's connections cannot flood the log either
    QueryRedactor.install()  # a key sent as ?api_key= (refused) never reaches the access log
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler that was there before: make SIGTERM unwind like Ctrl-C, so the caller's
    # cleanup (e.g. the node processes of `--nodes N`) runs and the exit status is 0.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        uvicorn.Server(api_config(app, None, log_level=log_level, timeout_graceful_shutdown=5)).run(
            sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class BackgroundServer:
    """`with BackgroundServer(app) as srv: srv.url ...`: uvicorn in a thread of its own,
    bound before it starts (no port race), stopped and joined on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 30.0,
                 **guard: Any) -> None:
        self.sock = bind(host, 0)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(api_config(app, guard,
                                                log_level="warning", lifespan="on",
                                                timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn:{self.port}", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
