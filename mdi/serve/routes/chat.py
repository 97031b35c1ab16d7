"""POST /v1/chat/completions: messages rendered by the model's chat template."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from .. import openai_schema as oa
from ..generation import CHAT, answer, start_run
from ..service import Service
from . import service

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, svc: Service = Depends(service)) -> Response:
    svc.authorize(request)
    req: oa.ChatCompletionRequest = oa.parse_request(oa.ChatCompletionRequest,
                                                     await svc.json_body(request))
    svc.check_model(req.model)
    prompt = chat_prompt(svc, req)
    max_tokens = req.token_budget() or svc.config.default_max_tokens
    run, engine = start_run(svc, [prompt] * req.n,
                            [svc.seq_params(req, max_tokens, i) for i in range(req.n)], "messages")
    return await answer(svc, request, req, run, engine, CHAT, len(prompt))


def chat_prompt(svc: Service, req: oa.ChatCompletionRequest) -> list[int]:
    """The messages through the template, as token ids."""
    if svc.template is None:
        raise oa.ApiError(400, f"model {svc.config.model_name!r} has no chat template: use "
                               "/v1/completions, or start the server with --chat-template FILE",
                          param="messages", code="no_chat_template")
    messages = [{**m.model_dump(exclude_none=True), "content": m.text(i)}
                for i, m in enumerate(req.messages)]
    prompt = svc.encode(svc.template.render(messages), "messages")
    bos = getattr(svc.tokenizer, "bos_id", None)
    if bos is not None and prompt[:2] == [bos, bos]:
        prompt = prompt[1:]  # the template wrote BOS and the tokenizer added one (HF does not)
    return prompt
