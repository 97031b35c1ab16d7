"""GET /health (the engine's state; 503 while it is rebuilt) and GET /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..metrics import CONTENT_TYPE_LATEST
from ..service import Service
from . import service

router = APIRouter()


@router.get("/health")
async def health(svc: Service = Depends(service)) -> JSONResponse:
    holder, e = svc.holder, svc.holder.engine
    body = {"status": "ok" if holder.state == "ready" else holder.state,
            "model": svc.config.model_name, "running": e.running if e else 0,
            "queued": e.queued if e else 0, "engine_builds": holder.builds,
            "last_failure": holder.last_failure, "rebuild_error": holder.rebuild_error,
            "recoveries": list(getattr(e, "recoveries", []))}
    return JSONResponse(body, status_code=200 if holder.state == "ready" else 503)


@router.get("/metrics")
async def prometheus(svc: Service = Depends(service)) -> Response:
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
