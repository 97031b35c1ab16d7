"""POST /v1/completions: a text or token-id prompt (or a list of them), n choices each."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import openai_schema as oa
from ..generation import COMPLETION, answer, start_run
from ..service import Service
from . import service

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request, svc: Service = Depends(service)) -> Response:
    svc.authorize(request)
    req: oa.CompletionRequest = oa.parse_request(oa.CompletionRequest, await svc.json_body(request))
    svc.check_model(req.model)
    encoded = [svc.encode(p, "prompt") for p in req.prompts()]
    if len(encoded) * req.n > oa.MAX_N:
        raise oa.ApiError(400, f"prompts x n must be at most {oa.MAX_N}", param="n")
    max_tokens = req.max_tokens or 16
    prompts = [p for p in encoded for _ in range(req.n)]    # choice index = prompt * n + i
    params = [svc.seq_params(req, max_tokens, i % req.n) for i in range(len(prompts))]
    run, engine = start_run(svc, prompts, params, "prompt")
    return await answer(svc, request, req, run, engine, COMPLETION, sum(len(p) for p in encoded))
