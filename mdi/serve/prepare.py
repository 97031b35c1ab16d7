"""A request body to what the engine runs: parse, validate, encode, fit the context.

Pure functions over the Service (no I/O), so that a large body is handled on the
server's parsing thread (Service.prepared) instead of the event loop, where it
would pause every stream. What they raise is an oa.ApiError: a 400 that names
the field, never a 500.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.api import SeqParams
from ..generate.chat_template import TemplateError
from . import openai_schema as oa
from .prompts import budget, completion_prompts

if TYPE_CHECKING:
    from .service import Service

COMPLETION_DEFAULT_MAX_TOKENS = 16   # as OpenAI


@dataclass
class Prepared:
    req: Any                         # the validated request
    prompts: list[list[int]]         # one per choice
    params: list[SeqParams]          # one per choice
    n_prompt: int                    # usage.prompt_tokens: every prompt token computed
    param: str                       # the field an engine refusal names


def parse_json(body: bytes) -> Any:
    """JSON as OpenAI reads it: no NaN or Infinity; nesting too deep is a 400, not a crash."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise oa.ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 5,000 digits
        raise oa.ApiError(400, f"the request body is not valid JSON ({e})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def validate(model: type, body: bytes) -> Any:
    try:
        return oa.parse_request(model, parse_json(body))
    except RecursionError:
        raise oa.ApiError(400, "the request body is nested too deeply") from None


def completion(svc: "Service", body: bytes) -> Prepared:
    req: oa.CompletionRequest = validate(oa.CompletionRequest, body)
    svc.check_model(req.model)
    context = svc.context
    encoded = completion_prompts(req.prompt, svc.encode_text, svc.tokenizer.vocab_size, context)
    if len(encoded) * req.n > oa.MAX_N:
        raise oa.ApiError(400, f"prompts x n must be at most {oa.MAX_N}", param="n")
    longest = max(len(p) for p in encoded)
    max_tokens = budget(longest, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, context, "prompt")
    prompts = [p for p in encoded for _ in range(req.n)]    # choice index = prompt * n + i
    params = [svc.seq_params(req, max_tokens, i % req.n) for i in range(len(prompts))]
    return Prepared(req, prompts, params, sum(len(p) for p in encoded), "prompt")


def chat(svc: "Service", body: bytes) -> Prepared:
    req: oa.ChatCompletionRequest = validate(oa.ChatCompletionRequest, body)
    svc.check_model(req.model)
    prompt = chat_prompt(svc, req)
    max_tokens = budget(len(prompt), req.token_budget(), svc.config.default_max_tokens,
                        svc.context, "messages")
    return Prepared(req, [prompt] * req.n, [svc.seq_params(req, max_tokens, i) for i in range(req.n)],
                    len(prompt), "messages")


def chat_prompt(svc: "Service", req: oa.ChatCompletionRequest) -> list[int]:
    """The messages through the template, as token ids."""
    if svc.template is None:
        raise oa.ApiError(400, f"model {svc.config.model_name!r} has no chat template: use "
                               "/v1/completions, or start the server with --chat-template FILE",
                          param="messages", code="no_chat_template")
    messages = [{**m.model_dump(exclude_none=True), "content": m.text(i)}
                for i, m in enumerate(req.messages)]
    try:
        text = svc.template.render(messages)
    except TemplateError as e:
        raise oa.ApiError(400, str(e), param="messages") from None
    prompt = svc.encode_text(text, "messages")
    bos = getattr(svc.tokenizer, "bos_id", None)
    if bos is not None and prompt[:2] == [bos, bos]:
        prompt = prompt[1:]  # the template wrote BOS and the tokenizer added one (HF does not)
    return prompt
