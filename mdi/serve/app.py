"""The OpenAI-compatible HTTP API and the chat page, over one engine.

The routes only translate: a request becomes token ids and SeqParams, the
engine's events become OpenAI objects or server-sent chunks. The app is a few
routers (routes/: models, completions, chat, health and metrics, the page) over
one `Service` (service.py: settings, tokenizer, request checks) and the
generation steps they share (generation.py). The engine is built by a factory
(local single-device engine or the ring) and owned by an `EngineHolder`
(holder.py), which replaces it after a failure while the server keeps serving.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from . import openai_schema as oa
from .holder import EngineFactory, EngineHolder
from .metrics import ServeMetrics
from .routes import chat, completions, health, models, page
from .service import ServeConfig, Service

__all__ = ["EngineFactory", "ServeConfig", "create_app"]
log = logging.getLogger("mdi.serve")


def create_app(factory: EngineFactory, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    holder = EngineHolder(factory, config.rebuild_retry_s)
    svc = Service.build(holder, tokenizer, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await holder.start()
        log.info("serving model %r", config.model_name)
        try:
            yield
        finally:
            await holder.close()
            svc.close()

    app = FastAPI(title="mdi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.holder, app.state.metrics = svc, holder, svc.metrics
    app.add_middleware(_MetricsMiddleware, metrics=svc.metrics)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    app.add_exception_handler(oa.ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for module in (models, completions, chat, health, page):
        app.include_router(module.router)
    return app


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, oa.ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    err = oa.ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


class _MetricsMiddleware:
    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.wrapped = metrics.middleware(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.wrapped(scope, receive, send)
