"""OpenAI request models (validated with pydantic) and response builders.

Shapes follow OpenAI's API as the official `openai` client (3.x) parses them:
`text_completion` / `chat.completion` / `chat.completion.chunk` objects, ids
`cmpl-...` / `chatcmpl-...`, `usage` with prompt/completion/total tokens and
errors as {"error": {"message", "type", "param", "code"}}.

Anything a client may send that would change the output and that we do not
implement is refused with a 400 naming the field (never silently ignored);
an argument we do not know at all is refused the way OpenAI refuses it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..generate.sampling import MAX_TOP_K, SEED_LIMIT

MAX_STOP = 4      # OpenAI's limit on stop sequences
MAX_N = 16        # choices per request


class ApiError(Exception):
    """An error the server answers in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def Strict(default: Any = None, **constraints: Any) -> Any:  # noqa: N802 - reads as a type
    """A field that takes its JSON type only, as OpenAI does: no "5" or true for an integer,
    no 1 or "true" for a boolean (an integer is a number, so 1 passes for a float)."""
    return Field(default, strict=True, **constraints)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Strict(False)
    include_obfuscation: bool | None = None  # sent by some clients; we never obfuscate


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""
    model_config = ConfigDict(extra="forbid")

    model: str = Strict(...)
    max_tokens: int | None = Strict(None, ge=1)  # at most the context: checked with the prompt
    temperature: float | None = Strict(None, ge=0, le=2)
    top_p: float | None = Strict(None, gt=0, le=1)
    top_k: int | None = Strict(None, ge=1, le=MAX_TOP_K)  # extension (llama.cpp, vLLM)
    seed: int | None = Strict(None, ge=0, lt=SEED_LIMIT)  # as the nodes check it (ADMIT)
    stop: Union[str, list[str], None] = None
    n: int = Strict(1, ge=1, le=MAX_N)
    stream: bool = Strict(False)
    stream_options: StreamOptions | None = None
    # Accepted when they do not change the output; refused otherwise (see check_supported).
    presence_penalty: float | None = Strict(None)
    frequency_penalty: float | None = Strict(None)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> Union[str, list[str], None]:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _refuse_common(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise unsupported(name, f"{name} other than 0 is not supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")


class CompletionRequest(_Common):
    # str, [str], [int] or [[int]]: checked by serve/prompts.py in one pass over the ids
    # (a union validated here cost 2.9 s for 3.9 M ids, on the event loop)
    prompt: Any = Field(...)
    echo: bool = Strict(False)
    logprobs: int | None = Strict(None)
    best_of: int | None = Strict(None)
    suffix: str | None = None

    def check_supported(self) -> None:
        self._refuse_common()
        if self.logprobs is not None:
            raise unsupported("logprobs", "logprobs are not supported")
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.best_of not in (None, self.n):
            raise unsupported("best_of", "best_of other than n is not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion) is not supported")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self, i: int) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"messages[{i}].content[{j}]",
                                  f"content part of type {part.get('type')!r} is not supported "
                                  "(text only)")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Strict(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None

    def check_supported(self) -> None:
        self._refuse_common()
        if self.logprobs:
            raise unsupported("logprobs", "logprobs are not supported")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "top_logprobs are not supported")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise unsupported(name, f"{name} (function calling) are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise unsupported(name, f"{name} is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format",
                              f"response_format {self.response_format.get('type')!r} is not "
                              "supported (only 'text')")
        if self.modalities and set(self.modalities) != {"text"}:
            raise unsupported("modalities", "only the 'text' modality is supported")
        for name in ("audio", "prediction", "reasoning_effort"):
            if getattr(self, name):
                raise unsupported(name, f"{name} is not supported")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_parameter")


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [x for x in err["loc"] if not _is_union_branch(x)]
        param = _dotted(loc) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unrecognized_argument") from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required parameter: {param}", param=param,
                           code="missing_required_parameter") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"invalid value for {param}: {msg}", param=param,
                       code="invalid_value") from None
    req.check_supported()
    return req


def _is_union_branch(x: Any) -> bool:
    # pydantic names the union member it tried ('str', 'list[int]', ...) in the location
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "none"))


def _dotted(loc: list) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


# -- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, texts: list[str], finish: list[str],
               n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": usage(n_prompt, n_completion)}


def completion_chunk(id: str, created: int, model: str, index: int, text: str,
                     finish: str | None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_completion(id: str, created: int, model: str, texts: list[str], finish: list[str],
                    n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": usage(n_prompt, n_completion)}


def chat_chunk(id: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish: str | None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(id: str, created: int, model: str, obj: str, n_prompt: int,
                n_completion: int) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_completion)}
