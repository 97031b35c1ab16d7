"""What every route of the API shares: the settings, the engine holder, the tokenizer,
and the steps that come before the engine: authorize from the headers, require JSON,
read the body (counted), and prepare it (prepare.py) on a bounded parsing thread
when it is large, so a big body never pauses the event loop's streams for long."""
from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..checkpoint.sampling_defaults import SamplingDefaults
from ..engine.api import SeqParams
from ..generate.chat_template import template_for
from ..tokenizer import Tokenizer
from . import openai_schema as oa
from .holder import EngineHolder
from .metrics import ServeMetrics

T = TypeVar("T")  # what a prepare function (prepare.py) makes of a body
log = logging.getLogger("mdi.serve")
INLINE_BODY_BYTES = 64 << 10   # smaller bodies are prepared on the loop (cheaper than a hand-off)
PARSE_THREADS = 2              # bodies prepared at once; more wait their turn
DEFAULT_CONTEXT = 2048         # engines that do not say theirs (model/cache.py's default cap)
BODY_BYTES_PER_TOKEN = 512     # far more than any prompt needs: 16 prompts of long tokens, escaped
QUERY_KEYS = ("api_key", "api-key", "key", "access_token")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256       # chat requests without max_tokens (completions: 16, as OpenAI)
    chat_template: str | None = None    # overrides the tokenizer's
    rebuild_retry_s: float = 2.0        # wait between failed attempts to rebuild the engine
    max_body_bytes: int | None = None   # larger bodies get 413 (read no further); None: by context
    context: int | None = None          # prompt + completion at most; None: the engine's context.
                                        # Larger: the engine's overflow policy windows the rest
    strict_model_name: bool = False     # refuse model names but ours (else: any, answered as ours)
    degraded_after_s: float = 3.0       # /health says "degraded" while the pipeline is this silent
    sampling: SamplingDefaults | None = None  # the model's own, for what a request leaves unset
                                              # (None: OpenAI's temperature 1, no top-k/top-p)


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
    _parser: ThreadPoolExecutor | None = None
    _parsing: asyncio.Semaphore | None = None

    @classmethod
    def build(cls, holder: EngineHolder, tokenizer: Tokenizer, config: ServeConfig) -> "Service":
        if config.context is not None and config.context < 2:
            raise ValueError(f"context must be at least 2 tokens, got {config.context}")
        engine = lambda: holder.engine  # noqa: E731 - the current one (rebuilt after failures)
        metrics = ServeMetrics(running=lambda: engine().running if engine() else 0,
                               queued=lambda: engine().queued if engine() else 0,
                               recoveries=lambda: len(getattr(engine(), "recoveries", ())),
                               stalled=lambda: holder.stalled + getattr(engine(), "stalled", 0))
        return cls(config, tokenizer, holder, metrics, template_for(tokenizer, config.chat_template),
                   tuple(getattr(tokenizer, "eos_ids", ()) or ()))

    @property
    def context(self) -> int:
        """The model's context (GPT.context): a prompt and its completion fit in it."""
        if self.config.context is not None:
            return self.config.context
        return getattr(self.holder.engine, "context", None) or DEFAULT_CONTEXT

    @property
    def max_body_bytes(self) -> int:
        """What a body may weigh: given, or BODY_BYTES_PER_TOKEN per token of the context
        (1 MiB at least, 8 at most). Parsing JSON holds the interpreter's lock even on the
        parsing thread (0.6 s for 7.8 MB here), so a body that cannot fit is never parsed."""
        if self.config.max_body_bytes is not None:
            return self.config.max_body_bytes
        return min(max(self.context * BODY_BYTES_PER_TOKEN, 1 << 20), 8 << 20)

    def close(self) -> None:
        if self._parser is not None:
            self._parser.shutdown(wait=False, cancel_futures=True)

    # ---- from the headers ------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """The API key from `Authorization: Bearer`, decided before any body is read; a key
        in the URL is refused (URLs end up in logs and browser histories)."""
        if any(k in request.query_params for k in QUERY_KEYS):
            raise oa.ApiError(401, "API keys in the URL are refused (they end up in logs): send "
                                   "'Authorization: Bearer KEY'", code="invalid_api_key")
        key = self.config.api_key
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise oa.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str) -> None:
        """Any name when we serve one model (clients written for other servers send theirs;
        the answer names ours), unless the server was told to be strict."""
        if self.config.strict_model_name and name != self.config.model_name:
            raise oa.ApiError(404, f"The model {name!r} does not exist; this server serves "
                                   f"{self.config.model_name!r}", param="model", code="model_not_found")

    # ---- the body ------------------------------------------------------------------
    async def prepared(self, request: Request, prepare: Callable[["Service", bytes], T]) -> T:
        """The request's body, read and prepared (on the parsing thread when it is large)."""
        _require_json(request)
        body = await self._read_body(request)
        if len(body) <= INLINE_BODY_BYTES:
            return prepare(self, body)
        if self._parser is None:
            self._parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="mdi-parse")
            self._parsing = asyncio.Semaphore(PARSE_THREADS)
        assert self._parsing is not None
        async with self._parsing:  # bounded: the rest wait here, not in the pool's queue
            return await asyncio.get_running_loop().run_in_executor(self._parser, prepare, self, body)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused unread
            raise oa.ApiError(413, f"the request body ({declared} bytes) is larger than {limit} bytes",
                              code="request_too_large")
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
        return bytes(body)

    # ---- used by prepare.py ----------------------------------------------------------
    def encode_text(self, text: str, param: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text)
        except ValueError as e:
            raise oa.ApiError(400, f"{param}: {e}", param=param) from None
        if not ids:
            raise oa.ApiError(400, f"{param} encodes to no tokens", param=param)
        return ids

    def seq_params(self, req: Any, max_tokens: int, i: int) -> SeqParams:
        """A request's sequence i; what the request leaves unset comes from the model's
        own sampling defaults (ServeConfig.sampling), as a local chat would use them."""
        model = self.config.sampling
        temperature = req.temperature if req.temperature is not None else (
            model.temperature if model is not None else 1.0)
        top_k = req.top_k if req.top_k is not None else model.top_k if model is not None else None
        top_p = req.top_p if req.top_p is not None else model.top_p if model is not None else None
        seed = None if req.seed is None else req.seed + i  # choices differ, reproducibly
        return SeqParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, stop=req.stop_list(), stop_ids=self.stop_ids)


def _require_json(request: Request) -> None:
    """POST bodies must say they are JSON: a web page can send text/plain to any address
    without asking (a 'simple' cross-site request), but not application/json."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise oa.ApiError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                          code="unsupported_media_type")
