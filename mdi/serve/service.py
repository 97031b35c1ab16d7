"""What every route of the API shares: the settings, the engine holder, the tokenizer,
and the steps that turn an HTTP request into token ids and SeqParams (authorize,
read the body, check the model name, encode the prompt)."""
from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Union

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..engine.api import SeqParams
from ..generate.chat_template import template_for
from ..tokenizer import Tokenizer
from . import openai_schema as oa
from .holder import EngineHolder
from .metrics import ServeMetrics

log = logging.getLogger("mdi.serve")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256       # chat requests without max_tokens (completions: 16, as OpenAI)
    chat_template: str | None = None    # overrides the tokenizer's
    rebuild_retry_s: float = 2.0        # wait between failed attempts to rebuild the engine
    max_body_bytes: int = 8 << 20       # larger request bodies get 413 (read no further)


@dataclass
class Service:
    """One server's state, shared by its routers (app.state.service)."""
    config: ServeConfig
    tokenizer: Tokenizer
    holder: EngineHolder
    metrics: ServeMetrics
    template: Any = None                # the chat template (None: chat is refused)
    stop_ids: tuple[int, ...] = ()
    created: int = field(default_factory=oa.now)

    @classmethod
    def build(cls, holder: EngineHolder, tokenizer: Tokenizer, config: ServeConfig) -> "Service":
        metrics = ServeMetrics(running=lambda: holder.engine.running if holder.engine else 0,
                               queued=lambda: holder.engine.queued if holder.engine else 0,
                               recoveries=lambda: len(getattr(holder.engine, "recoveries", ())))
        return cls(config, tokenizer, holder, metrics, template_for(tokenizer, config.chat_template),
                   tuple(getattr(tokenizer, "eos_ids", ()) or ()))

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise oa.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise oa.ApiError(404, f"The model {name!r} does not exist; this server serves "
                                   f"{self.config.model_name!r}", param="model", code="model_not_found")

    async def json_body(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        body = bytearray()
        try:
            async for chunk in request.stream():  # counted as it comes: chunked bodies too
                body += chunk
                if len(body) > limit:
                    raise oa.ApiError(413, f"the request body is larger than {limit} bytes",
                                      code="request_too_large")
        except ClientDisconnect:  # closed by the client, or by the guard (too slow)
            raise oa.ApiError(400, "the connection closed before the request body was complete") \
                from None
        try:
            return json.loads(body)
        except ValueError:
            raise oa.ApiError(400, "the request body is not valid JSON") from None

    def encode(self, prompt: Union[str, list[int]], param: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            try:
                ids = tok.encode(prompt)
            except ValueError as e:
                raise oa.ApiError(400, f"{param}: {e}", param=param) from None
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < tok.vocab_size]
            if bad:
                raise oa.ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                                       f"(size {tok.vocab_size})", param=param)
        if not ids:
            raise oa.ApiError(400, f"{param} encodes to no tokens", param=param)
        return ids

    def seq_params(self, req: Any, max_tokens: int, i: int) -> SeqParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = None if req.seed is None else req.seed + i  # choices differ, reproducibly
        return SeqParams(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k,
                         top_p=req.top_p, seed=seed, stop=req.stop_list(), stop_ids=self.stop_ids)
