"""The control plane: a FastAPI app over a NodeRuntime.

Every route but /health needs `Authorization: Bearer TOKEN`; without it the
answer is 401 and nothing changes. The token and the body size are checked by
an ASGI guard *before* any route reads a body, so a stranger cannot make the
node buffer a large request. Bad requests get 4xx with a message that names
the field; the node's state does not change. Bodies are JSON (parsed by
pydantic into strict types) or a safetensors stream: nothing is unpickled.
"""
from __future__ import annotations

import json
import logging

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .auth import check_bearer
from .messages import InitRequest, ProbeRequest, RunRef
from .node import InitError, NodeRuntime

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20
PUBLIC_PATHS = ("/health",)


class Guard:
    """ASGI middleware: token (401), then body size (413/411), before the app runs.

    /weights/{run_id} is let through with its Content-Length: the route checks it
    against what the run's layer range can need before reading the body.
    """

    def __init__(self, app, token: str, json_limit: int = MAX_JSON_BYTES) -> None:
        self.app = app
        self.token = token
        self.json_limit = json_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not check_bearer(auth, self.token):
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s: missing or wrong token", scope["method"],
                        scope["path"], client[0])
            await _respond(send, 401, "missing or wrong cluster token",
                           [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" in headers:
            await _respond(send, 411, "body: a Content-Length header is required")
            return
        if length is not None and not scope["path"].startswith("/weights/"):
            if not length.isdigit() or int(length) > self.json_limit:
                await _respond(send, 413, f"body: {length.decode('latin-1')} bytes, "
                                          f"at most {self.json_limit}")
                return
        await self.app(scope, receive, send)


async def _respond(send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def create_app(rt: NodeRuntime, on_shutdown=None) -> FastAPI:
    app = FastAPI(title=f"mdi node ({rt.spec.name})", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, token=rt.token)

    def authorized(request: Request) -> None:  # second line of defence behind Guard
        if not check_bearer(request.headers.get("authorization"), rt.token):
            raise HTTPException(401, "missing or wrong cluster token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                why = (err.get("ctx") or {}).get("error", "")
                parts.append(f"body: not valid JSON ({why})" if why else "body: not valid JSON")
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        detail = "; ".join(parts)
        log.warning("refused %s: %s", request.url.path, detail)
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(InitError)
    async def _init_error(request: Request, exc: InitError) -> JSONResponse:
        log.warning("refused %s: %s", request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(ConnectionError)
    async def _conn_error(request: Request, exc: ConnectionError) -> JSONResponse:
        log.warning("%s failed: %s", request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=502)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The starter shows this with the node's name; the traceback stays in this log.
        log.error("%s failed", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"},
                            status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return rt.health()

    @app.get("/status", dependencies=[Depends(authorized)])
    async def status() -> dict:
        return rt.status()

    @app.get("/capabilities", dependencies=[Depends(authorized)])
    async def capabilities() -> dict:
        return rt.capabilities()

    @app.post("/probe", dependencies=[Depends(authorized)])
    async def probe(req: ProbeRequest) -> dict:
        """ms per block per decode step for a run's shape (timed once, then cached)."""
        return await rt.probe(req)

    @app.post("/init", dependencies=[Depends(authorized)])
    async def init(req: InitRequest) -> dict:
        return await rt.init(req)

    @app.put("/weights/{run_id}", dependencies=[Depends(authorized)])
    async def weights(run_id: int, request: Request) -> dict:
        run = rt._current(run_id)
        limit = weights_limit(run.config, run.req.start, run.req.stop)
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise InitError("weights: a Content-Length header is required")
        if int(declared) > limit:
            raise InitError(f"weights: {declared} bytes exceed the {limit} bytes "
                            "this layer range can need")
        # parsed as it arrives: the header is checked before any tensor byte is read
        return await rt.load_weights(run_id, request.stream())

    @app.post("/connect", dependencies=[Depends(authorized)])
    async def connect(ref: RunRef) -> dict:
        return await rt.connect(ref.run_id)

    @app.post("/stop", dependencies=[Depends(authorized)])
    async def stop(ref: RunRef | None = None) -> dict:
        """Drop the current run; with {"run_id": N}, only if run N is the current one."""
        return await rt.stop(ref.run_id if ref is not None else None)

    @app.post("/shutdown", dependencies=[Depends(authorized)])
    async def shutdown() -> dict:
        if on_shutdown is not None:
            on_shutdown()
        return {"state": "shutting down"}

    return app


def weights_limit(config, start: int, stop: int) -> int:
    """Largest safetensors stream a stage can need: float32 tensors plus the header."""
    from ..checkpoint.format import expected_shapes

    n = 0
    for shape in expected_shapes(config, start, stop).values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return 4 * n + MAX_JSON_BYTES
