"""Prometheus metrics of one server, in its own registry (never the process-global one,
so several apps in one process, e.g. tests, do not collide)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds. TTFT includes queueing and prefill; ITL is one decode step of the pipeline.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class ServeMetrics:
    def __init__(self, running: Callable[[], float], queued: Callable[[], float],
                 recoveries: Callable[[], float] = lambda: 0,
                 stalled: Callable[[], float] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("mdi_running_sequences", "sequences being generated", registry=r).set_function(running)
        Gauge("mdi_queued_sequences", "sequences waiting for admission", registry=r).set_function(queued)
        Gauge("mdi_ring_recoveries", "node failures the current ring engine recovered from",
              registry=r).set_function(recoveries)
        Gauge("mdi_stalled_sequences_cancelled", "sequences cancelled because their client left "
              "their events unread for the stall timeout (since the server started)",
              registry=r).set_function(stalled)
        self.generated = Counter("mdi_generated_tokens", "tokens generated", registry=r)
        self.prompt = Counter("mdi_prompt_tokens", "prompt tokens submitted", registry=r)
        self.ttft = Histogram("mdi_time_to_first_token_seconds", "time from submit to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mdi_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.requests = Counter("mdi_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.failures = Counter("mdi_engine_failures", "engine failures (each rebuilds the engine)",
                                registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware counting requests by endpoint and response status (streams too:
        the status is the one sent when the stream starts)."""
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"

            async def send_counting(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.requests.labels(endpoint, str(message["status"])).inc()
                await send(message)

            await app(scope, receive, send_counting)
        return wrapped
