"""The OpenAI-compatible HTTP API and the chat page, over one engine.

The routes only translate: a request becomes token ids and SeqParams, the
engine's events become OpenAI objects or server-sent chunks. The engine is
built by a factory (local single-device engine or the ring) so that when it
fails (EngineFailure, e.g. a node of the ring died) the server answers 500
naming the node, closes it and builds a fresh one (the ring re-forms) while
it keeps serving; requests that come in meanwhile get 503 + Retry-After.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.api import Engine, EngineBusy, EngineFailure, SeqParams
from ..tokenizer import Tokenizer
from . import openai_schema as oa
from ..generate.chat_template import template_for
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .runs import Run
from .sse import DONE, EventStreamResponse, event

log = logging.getLogger("mdi.serve")
STATIC = Path(__file__).parent / "static"
EngineFactory = Callable[[], Union[Engine, Awaitable[Engine]]]


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 256       # chat requests without max_tokens (completions: 16, as OpenAI)
    chat_template: str | None = None    # overrides the tokenizer's
    rebuild_retry_s: float = 2.0        # wait between failed attempts to rebuild the engine
    max_body_bytes: int = 8 << 20       # larger request bodies get 413 (read no further)


class EngineHolder:
    """Owns the engine: starts it, and replaces it after a failure (one rebuild at a time)."""

    def __init__(self, factory: EngineFactory, retry_s: float = 2.0) -> None:
        self.factory, self.retry_s = factory, retry_s
        self.engine: Engine | None = None
        self.state = "starting"               # starting | ready | rebuilding | closed
        self.builds = 0
        self.last_failure: str | None = None   # the failure that caused the latest rebuild
        self.rebuild_error: str | None = None  # why the rebuild under way failed so far
        self._task: asyncio.Task | None = None

    async def _build(self) -> Engine:
        engine = self.factory()
        if inspect.isawaitable(engine):
            engine = await engine
        await engine.start()
        self.builds += 1
        return engine

    async def start(self) -> None:
        self.engine = await self._build()
        self.state = "ready"

    def get(self) -> Engine:
        if self.state != "ready" or self.engine is None:
            raise oa.ApiError(503, f"the engine is {self.state}; retry shortly", type="server_error",
                              code="engine_unavailable",
                              headers={"Retry-After": str(max(1, round(self.retry_s)))})
        return self.engine

    def failed(self, engine: Engine, exc: EngineFailure) -> None:
        """Called by whoever saw `engine` fail; the first call schedules the rebuild."""
        if engine is not self.engine or self.state != "ready":
            return
        self.state = "rebuilding"
        self.last_failure = f"{exc} (node {exc.node})" if exc.node else str(exc)
        log.error("engine failed: %s; rebuilding it", self.last_failure)
        self._task = asyncio.create_task(self._rebuild(engine))

    async def _rebuild(self, old: Engine) -> None:
        try:
            await old.close()
        except Exception:  # noqa: BLE001 - a failed engine may fail to close; we replace it anyway
            log.exception("closing the failed engine")
        delay = self.retry_s
        while self.state == "rebuilding":
            try:
                self.engine = await self._build()
                self.state, self.rebuild_error = "ready", None
                log.info("engine rebuilt (build %d)", self.builds)
            except Exception as e:  # noqa: BLE001 - keep trying: the server stays up, health says why
                self.rebuild_error = str(e)
                log.error("rebuilding the engine failed (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)

    async def close(self) -> None:
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.engine is not None:
            await self.engine.close()


def failure_error(exc: EngineFailure) -> oa.ApiError:
    where = f" at node {exc.node}" if exc.node else ""
    return oa.ApiError(500, f"engine failure{where}: {exc}", type="server_error", code="engine_failure")


def create_app(factory: EngineFactory, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    holder = EngineHolder(factory, config.rebuild_retry_s)
    metrics = ServeMetrics(running=lambda: holder.engine.running if holder.engine else 0,
                           queued=lambda: holder.engine.queued if holder.engine else 0,
                           recoveries=lambda: len(getattr(holder.engine, "recoveries", ())))
    template = template_for(tokenizer, config.chat_template)
    stop_ids = tuple(getattr(tokenizer, "eos_ids", ()) or ())
    created = oa.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await holder.start()
        log.info("serving model %r", config.model_name)
        try:
            yield
        finally:
            await holder.close()

    app = FastAPI(title="mdi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder, app.state.metrics = holder, metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(oa.ApiError)
    async def _api_error(request: Request, exc: oa.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = oa.ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 config.api_key.encode()):
            raise oa.ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise oa.ApiError(404, f"The model {name!r} does not exist; this server serves "
                                   f"{config.model_name!r}", param="model", code="model_not_found")

    async def json_body(request: Request) -> Any:
        body = bytearray()
        async for chunk in request.stream():  # counted as it comes: chunked bodies too
            body += chunk
            if len(body) > config.max_body_bytes:
                raise oa.ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes",
                                  code="request_too_large")
        try:
            return json.loads(body)
        except ValueError:
            raise oa.ApiError(400, "the request body is not valid JSON") from None

    def encode(prompt: Union[str, list[int]], param: str) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = tokenizer.encode(prompt)
            except ValueError as e:
                raise oa.ApiError(400, f"{param}: {e}", param=param) from None
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise oa.ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                                       f"(size {tokenizer.vocab_size})", param=param)
        if not ids:
            raise oa.ApiError(400, f"{param} encodes to no tokens", param=param)
        return ids

    def seq_params(req: Any, max_tokens: int, i: int) -> SeqParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = None if req.seed is None else req.seed + i  # choices differ, reproducibly
        return SeqParams(max_tokens=max_tokens, temperature=temperature, top_k=req.top_k,
                         top_p=req.top_p, seed=seed, stop=req.stop_list(), stop_ids=stop_ids)

    def start_run(prompts: list[list[int]], params: list[SeqParams], param: str) -> tuple[Run, Engine]:
        engine = holder.get()
        try:
            return Run(engine, prompts, params, metrics), engine
        except EngineBusy as e:
            raise oa.ApiError(429, f"the server is busy: {e}", type="rate_limit_error",
                              code="rate_limit_exceeded",
                              headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        except EngineFailure as e:
            metrics.failures.inc()
            holder.failed(engine, e)
            raise failure_error(e) from None
        except ValueError as e:  # SeqParams / the engine refusing a prompt (e.g. too long)
            raise oa.ApiError(400, str(e), param=param) from None

    async def finish(run: Run, engine: Engine, request: Request) -> bool:
        """Generate to the end; False when the client went away first (the sequences are
        then cancelled: a non-streaming request holds its slots only while someone waits)."""
        collect = asyncio.ensure_future(run.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        try:
            await collect
        except asyncio.CancelledError:
            log.info("client went away before its completion was done; cancelled it")
            return False
        except EngineFailure as e:
            metrics.failures.inc()
            holder.failed(engine, e)
            raise failure_error(e) from None
        return True

    async def stream(run: Run, engine: Engine, first: Callable[[int], list[dict]],
                     chunk: Callable[[int, str, str | None], dict],
                     usage: Callable[[int], dict] | None) -> AsyncIterator[bytes]:
        """The SSE body: opening chunks, one chunk per released text, the finish per
        choice, the usage chunk if asked for, [DONE]; a failure becomes an error event."""
        try:
            for i in range(len(run.handles)):
                for c in first(i):
                    yield event(c)
            async with aclosing(run.events()) as events:  # closed (sequences cancelled) on any exit
                async for i, ev in events:
                    finish = ev.finish_reason if ev.finish_reason in ("stop", "length") else None
                    if ev.text or finish is not None:
                        yield event(chunk(i, ev.text, finish))
            if usage is not None:
                yield event(usage(run.completion_tokens))
        except EngineFailure as e:
            metrics.failures.inc()
            holder.failed(engine, e)
            yield event(failure_error(e).body())
        except Exception:  # noqa: BLE001 - the status is sent already: report in the stream
            log.exception("streaming a response failed")
            yield event(oa.ApiError(500, "internal error while streaming", type="server_error").body())
        yield DONE

    @app.get("/health")
    async def health() -> JSONResponse:
        e = holder.engine
        body = {"status": "ok" if holder.state == "ready" else holder.state,
                "model": config.model_name, "running": e.running if e else 0,
                "queued": e.queued if e else 0, "engine_builds": holder.builds,
                "last_failure": holder.last_failure, "rebuild_error": holder.rebuild_error,
                "recoveries": list(getattr(e, "recoveries", []))}
        return JSONResponse(body, status_code=200 if holder.state == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "mdi"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req: oa.CompletionRequest = oa.parse_request(oa.CompletionRequest, await json_body(request))
        check_model(req.model)
        encoded = [encode(p, "prompt") for p in req.prompts()]
        if len(encoded) * req.n > oa.MAX_N:
            raise oa.ApiError(400, f"prompts x n must be at most {oa.MAX_N}", param="n")
        max_tokens = req.max_tokens or 16
        prompts = [p for p in encoded for _ in range(req.n)]    # choice index = prompt * n + i
        params = [seq_params(req, max_tokens, i % req.n) for i in range(len(prompts))]
        run, engine = start_run(prompts, params, "prompt")
        rid, at, name = oa.new_id("cmpl"), oa.now(), config.model_name
        n_prompt = sum(len(p) for p in encoded)
        if req.stream:
            usage = None
            if req.stream_options and req.stream_options.include_usage:
                usage = lambda k: oa.usage_chunk(rid, at, name, "text_completion", n_prompt, k)  # noqa: E731
            return EventStreamResponse(stream(
                run, engine, lambda i: [],
                lambda i, text, fin: oa.completion_chunk(rid, at, name, i, text, fin), usage),
                on_close=run.cancel)
        if not await finish(run, engine, request):
            return Response(status_code=499)   # nobody reads it; nginx's "client closed request"
        return JSONResponse(oa.completion(rid, at, name,
                                          [c.text for c in run.choices],
                                          [c.finish_reason or "stop" for c in run.choices],
                                          n_prompt, run.completion_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req: oa.ChatCompletionRequest = oa.parse_request(oa.ChatCompletionRequest,
                                                         await json_body(request))
        check_model(req.model)
        if template is None:
            raise oa.ApiError(400, f"model {config.model_name!r} has no chat template: use "
                                   "/v1/completions, or start the server with --chat-template FILE",
                              param="messages", code="no_chat_template")
        messages = [{**m.model_dump(exclude_none=True), "content": m.text(i)}
                    for i, m in enumerate(req.messages)]
        prompt = encode(template.render(messages), "messages")
        bos = getattr(tokenizer, "bos_id", None)
        if bos is not None and prompt[:2] == [bos, bos]:
            prompt = prompt[1:]  # the template wrote BOS and the tokenizer added one (HF does not)
        max_tokens = req.token_budget() or config.default_max_tokens
        run, engine = start_run([prompt] * req.n, [seq_params(req, max_tokens, i) for i in range(req.n)],
                                "messages")
        rid, at, name = oa.new_id("chatcmpl"), oa.now(), config.model_name
        if req.stream:
            usage = None
            if req.stream_options and req.stream_options.include_usage:
                usage = lambda k: oa.usage_chunk(rid, at, name, "chat.completion.chunk",  # noqa: E731
                                                 len(prompt), k)
            return EventStreamResponse(stream(
                run, engine,
                lambda i: [oa.chat_chunk(rid, at, name, i, {"role": "assistant", "content": ""}, None)],
                lambda i, text, fin: oa.chat_chunk(rid, at, name, i,
                                                   {"content": text} if text else {}, fin), usage),
                on_close=run.cancel)
        if not await finish(run, engine, request):
            return Response(status_code=499)
        return JSONResponse(oa.chat_completion(rid, at, name,
                                               [c.text for c in run.choices],
                                               [c.finish_reason or "stop" for c in run.choices],
                                               len(prompt), run.completion_tokens))

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already, so the next ASGI
    message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _MetricsMiddleware:
    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.wrapped = metrics.middleware(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.wrapped(scope, receive, send)

