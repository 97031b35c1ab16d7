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
    silent = getattr(e, "silent_s", 0.0) if e else 0.0
    status = holder.state
    if status == "ready":  # a node that stopped answering, not yet given up on
        status = "degraded" if silent > svc.config.degraded_after_s else "ok"
    body = {"status": status, "silent_s": round(silent, 1),
            "model": svc.config.model_name, "running": e.running if e else 0,
            "queued": e.queued if e else 0, "engine_builds": holder.builds,
            "last_failure": holder.last_failure, "rebuild_error": holder.rebuild_error,
            "recoveries": list(getattr(e, "recoveries", [])),
            "absent": sorted(getattr(e, "absent", {}))}  # lost nodes, asked whether they are back
    return JSONResponse(body, status_code=200 if holder.state == "ready" else 503)


@router.get("/metrics")
async def prometheus(svc: Service = Depends(service)) -> Response:
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
