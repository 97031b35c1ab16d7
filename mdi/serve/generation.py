"""From a request's prompts and parameters to its answer: submit the sequences, then
either stream server-sent chunks or wait for the whole completion (cancelled when the
client goes away first). Completions and chat differ only in the shapes of their
objects (`Kind`)."""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engine.api import Engine, EngineBusy, EngineFailure, SeqParams
from . import openai_schema as oa
from .holder import failure_error
from .prepare import Prepared
from .runs import Run
from .service import Service
from .sse import DONE, EventStreamResponse, event

log = logging.getLogger("mdi.serve")


@dataclass(frozen=True)
class Kind:
    """The object shapes of one endpoint."""
    prefix: str                                   # of the response id: "cmpl", "chatcmpl"
    chunk_object: str                             # "object" of its stream chunks
    first: Callable[[str, int, str, int], list[dict]]            # opening chunks of choice i
    chunk: Callable[[str, int, str, int, str, str | None], dict]  # one chunk of released text
    whole: Callable[..., dict]                    # the non-streamed response


COMPLETION = Kind("cmpl", "text_completion", lambda rid, at, name, i: [], oa.completion_chunk,
                  oa.completion)
CHAT = Kind("chatcmpl", "chat.completion.chunk",
            lambda rid, at, name, i: [oa.chat_chunk(rid, at, name, i,
                                                    {"role": "assistant", "content": ""}, None)],
            lambda rid, at, name, i, text, fin: oa.chat_chunk(rid, at, name, i,
                                                              {"content": text} if text else {}, fin),
            oa.chat_completion)


async def respond(svc: Service, request: Request, prepare: Callable[[Service, bytes], Prepared],
                  kind: Kind) -> Response:
    """A generation request from its headers to its answer."""
    svc.authorize(request)
    p = await svc.prepared(request, prepare)
    run, engine = start_run(svc, p.prompts, p.params, p.param)
    return await answer(svc, request, p.req, run, engine, kind, p.n_prompt)


def start_run(svc: Service, prompts: list[list[int]], params: list[SeqParams],
              param: str) -> tuple[Run, Engine]:
    """Submit every sequence of a request (all or none), errors as OpenAI answers them."""
    engine = svc.holder.get()
    try:
        return Run(engine, prompts, params, svc.metrics), engine
    except EngineBusy as e:
        raise oa.ApiError(429, f"the server is busy: {e}", type="rate_limit_error",
                          code="rate_limit_exceeded",
                          headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
    except EngineFailure as e:
        engine_failed(svc, engine, e)
        raise failure_error(e) from None
    except ValueError as e:  # SeqParams / the engine refusing a prompt (e.g. too long)
        raise oa.ApiError(400, str(e), param=param) from None


def engine_failed(svc: Service, engine: Engine, exc: EngineFailure) -> None:
    svc.metrics.failures.inc()
    svc.holder.failed(engine, exc)


async def answer(svc: Service, request: Request, req: Any, run: Run, engine: Engine,
                 kind: Kind, n_prompt: int) -> Response:
    """The response to a submitted request: a stream, or the whole completion."""
    rid, at, name = oa.new_id(kind.prefix), oa.now(), svc.config.model_name
    if req.stream:
        usage = None
        if req.stream_options and req.stream_options.include_usage:
            usage = lambda k: oa.usage_chunk(rid, at, name, kind.chunk_object, n_prompt, k)  # noqa: E731
        return EventStreamResponse(stream(
            svc, run, engine, lambda i: kind.first(rid, at, name, i),
            lambda i, text, fin: kind.chunk(rid, at, name, i, text, fin), usage), on_close=run.cancel)
    if not await finish(svc, run, engine, request):
        return Response(status_code=499)   # nobody reads it; nginx's "client closed request"
    return JSONResponse(kind.whole(rid, at, name, [c.text for c in run.choices],
                                   [c.finish_reason or "stop" for c in run.choices],
                                   n_prompt, run.completion_tokens))


async def finish(svc: Service, run: Run, engine: Engine, request: Request) -> bool:
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
        engine_failed(svc, engine, e)
        raise failure_error(e) from None
    return True


async def stream(svc: Service, run: Run, engine: Engine, first: Callable[[int], list[dict]],
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
                fin = ev.finish_reason if ev.finish_reason in ("stop", "length") else None
                if ev.text or fin is not None:
                    yield event(chunk(i, ev.text, fin))
        if usage is not None:
            yield event(usage(run.completion_tokens))
    except EngineFailure as e:
        engine_failed(svc, engine, e)
        yield event(failure_error(e).body())
    except Exception:  # noqa: BLE001 - the status is sent already: report in the stream
        log.exception("streaming a response failed")
        yield event(oa.ApiError(500, "internal error while streaming", type="server_error").body())
    yield DONE


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already, so the next ASGI
    message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
