"""POST /v1/chat/completions: messages rendered by the model's chat template."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import prepare
from ..generation import CHAT, respond
from ..service import Service
from . import service

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, svc: Service = Depends(service)) -> Response:
    return await respond(svc, request, prepare.chat, CHAT)
