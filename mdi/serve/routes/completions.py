"""POST /v1/completions: a text or token-id prompt (or a list of them), n choices each."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import prepare
from ..generation import COMPLETION, respond
from ..service import Service
from . import service

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request, svc: Service = Depends(service)) -> Response:
    return await respond(svc, request, prepare.completion, COMPLETION)
