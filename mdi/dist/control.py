"""The control plane: a FastAPI app over a NodeRuntime.

Every route but /health needs `Authorization: Bearer TOKEN`; without it the
answer is 401 and nothing changes. Bad requests get 4xx with a message that
names the field; the node's state does not change.
"""
from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .auth import check_bearer
from .messages import InitRequest, RunRef
from .node import InitError, NodeRuntime

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20


def create_app(rt: NodeRuntime, on_shutdown=None) -> FastAPI:
    app = FastAPI(title=f"mdi node ({rt.spec.name})", docs_url=None, redoc_url=None)

    def authorized(request: Request) -> None:
        if not check_bearer(request.headers.get("authorization"), rt.token):
            log.warning("refused %s %s from %s: missing or wrong token", request.method,
                        request.url.path, request.client.host if request.client else "?")
            raise HTTPException(401, "missing or wrong cluster token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(InitError)
    async def _init_error(request: Request, exc: InitError) -> JSONResponse:
        log.warning("refused %s: %s", request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(ConnectionError)
    async def _conn_error(request: Request, exc: ConnectionError) -> JSONResponse:
        log.warning("%s failed: %s", request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=502)

    @app.get("/health")
    async def health() -> dict:
        return rt.health()

    @app.get("/status", dependencies=[Depends(authorized)])
    async def status() -> dict:
        return rt.status()

    @app.post("/init", dependencies=[Depends(authorized)])
    async def init(req: InitRequest) -> dict:
        return await rt.init(req)

    @app.put("/weights/{run_id}", dependencies=[Depends(authorized)])
    async def weights(run_id: int, request: Request) -> dict:
        run = rt._current(run_id)
        limit = weights_limit(run.config, run.req.start, run.req.stop)
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit() or int(declared) > limit:
            raise InitError(f"weights: content-length {declared} exceeds the {limit} bytes "
                            "this layer range can need")
        body = await request.body()
        if len(body) > limit:
            raise InitError(f"weights: body of {len(body)} bytes exceeds {limit}")
        return await rt.load_weights(run_id, body)

    @app.post("/connect", dependencies=[Depends(authorized)])
    async def connect(ref: RunRef) -> dict:
        return await rt.connect(ref.run_id)

    @app.post("/stop", dependencies=[Depends(authorized)])
    async def stop() -> dict:
        return await rt.stop()

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
