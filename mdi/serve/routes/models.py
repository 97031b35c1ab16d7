"""GET /v1/models and /v1/models/{id}."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import openai_schema as oa
from ..service import Service
from . import service

router = APIRouter()


def model_card(svc: Service) -> dict:
    return {"id": svc.config.model_name, "object": "model", "created": svc.created, "owned_by": "mdi"}


@router.get("/v1/models")
async def models(request: Request, svc: Service = Depends(service)) -> dict:
    svc.authorize(request)
    return {"object": "list", "data": [model_card(svc)]}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request, svc: Service = Depends(service)) -> dict:
    svc.authorize(request)
    if name != svc.config.model_name:  # the list is exact, whatever generation accepts
        raise oa.ApiError(404, f"The model {name!r} does not exist; this server serves "
                               f"{svc.config.model_name!r}", param="model", code="model_not_found")
    return model_card(svc)
