"""The control plane: a FastAPI app over a NodeRuntime.

Every route but /health needs `Authorization: Bearer TOKEN`; without it the
answer is 401 and nothing changes. The token and the body size are checked by
an ASGI guard *before* any route reads a body, so a stranger cannot make the
node buffer a large request. The size cap counts the bytes actually received
(a JSON body is read by the guard, at most MAX_JSON_BYTES; /weights at most
its Content-Length), and Transfer-Encoding is refused, so no header can lift
it. Bad requests get 4xx with a message that names the field; the node's
state does not change; a request refused for what the node is doing now (a
/probe while a run's data loop serves a ring) gets 409. Bodies are JSON (parsed
by pydantic into strict types) or a safetensors stream: nothing is unpickled.

Logs: whatever a peer sent (paths, field names, values) is logged escaped
(control characters as \\n, \\x1b, ...) and clipped, so it cannot forge log
lines; warnings are rate-limited (LogLimiter), so refused requests cannot
flood the log.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ...net.log_limit import printable
from ..protocol.auth import check_bearer
from . import layer_move
from ..plan.fused_check import wait_state
from .control_messages import InitRequest, MoveSpec, ProbeRequest, RunRef
from .runtime import NodeRuntime
from .validate import InitError, NodeBusy

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20
PUBLIC_PATHS = ("/health",)
STREAMED = ("/weights/", "/move/kv/", "/move/weights/")  # binary bodies, sized by their route
# After a refusal whose body has no declared length (or more bytes than declared):
# close rather than read on. A declared length h11 reads and discards itself.
CLOSE = (b"connection", b"close")


class BodyTooLarge(Exception):
    """More body bytes arrived than the request may carry."""


class Guard:
    """ASGI middleware: token (401), then body size (413/411), before the app runs.

    /weights/{run_id} (and a move's /move/kv/..., /move/weights/...) is let through
    with its Content-Length: the route checks it against what the run's layer range
    (the move's rows) can need before reading the body.
    """

    def __init__(self, app, token: str, json_limit: int = MAX_JSON_BYTES) -> None:
        self.app = app
        self.token = token
        self.json_limit = json_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not check_bearer(auth, self.token):
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s: missing or wrong token", scope["method"],
                        printable(scope["path"]), client[0])
            await _respond(send, 401, "missing or wrong cluster token",
                           [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if b"transfer-encoding" in headers:  # the size must be known, and be the real one
            if length is None:
                await _respond(send, 411, "body: a Content-Length header is required", [CLOSE])
            else:
                await _respond(send, 400, "body: Content-Length and Transfer-Encoding together",
                               [CLOSE])
            return
        if length is not None and not length.isdigit():
            await _respond(send, 400, "body: Content-Length is not a number", [CLOSE])
            return
        if scope["path"].startswith(STREAMED):
            # the route checks the declared size against the stage; count what arrives
            await self.app(scope, _counted(receive, int(length or 0)), send)
            return
        if length is not None and int(length) > self.json_limit:
            await _respond(send, 413, f"body: {length.decode('latin-1')} bytes, "
                                      f"at most {self.json_limit}")
            return
        body = await _read_body(receive, self.json_limit)
        if body is None:
            await _respond(send, 413, f"body: more than {self.json_limit} bytes", [CLOSE])
            return
        why = _unparsable(body)
        if why:
            await _respond(send, 422, f"body: not valid JSON ({why})")
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as more than `limit` bytes have arrived."""
    parts, n = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the app sees it too
            return b"".join(parts)
        chunk = message.get("body", b"")
        n += len(chunk)
        if n > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _unparsable(body: bytes) -> str | None:
    """Why a body that is JSON by its syntax cannot be read (an integer of 5,000 digits,
    arrays nested 200k deep), or None. Syntax errors are left to the app, which names
    them; these would reach it as a bare "error parsing the body"."""
    if not body.strip():
        return None
    try:
        json.loads(body)
    except json.JSONDecodeError:
        return None
    except UnicodeDecodeError:
        return None
    except (ValueError, RecursionError) as e:
        return str(e)[:120]
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _counted(receive, limit: int):
    n = 0

    async def counted():
        nonlocal n
        message = await receive()
        if message["type"] == "http.request":
            n += len(message.get("body", b""))
            if n > limit:
                raise BodyTooLarge(f"body: more than the {limit} bytes of its Content-Length")
        return message

    return counted


async def _respond(send, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def create_control_app(rt: NodeRuntime, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The node's control plane over `rt`: the guard, the error answers, the routes."""
    app = FastAPI(title=f"mdi node ({rt.spec.name})", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, token=rt.token)
    for exc, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc, handler)
    app.include_router(node_routes(rt, on_shutdown))
    return app


def node_routes(rt: NodeRuntime, on_shutdown: Callable[[], None] | None = None) -> APIRouter:
    """Each route hands its checked body to one NodeRuntime action."""
    def authorized(request: Request) -> None:  # second line of defence behind Guard
        if not check_bearer(request.headers.get("authorization"), rt.token):
            raise HTTPException(401, "missing or wrong cluster token",
                                headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter()
    private = {"dependencies": [Depends(authorized)]}

    @router.get("/health")
    async def health() -> dict:
        return rt.health()

    @router.get("/status", **private)
    async def status() -> dict:
        return rt.status()

    @router.get("/capabilities", **private)
    async def capabilities() -> dict:
        await wait_state()  # the fused kernels' load begun at start (fused_check.py)
        return rt.capabilities()

    @router.post("/probe", **private)
    async def probe(req: ProbeRequest) -> dict:
        """ms per block per decode step for a run's shape (timed once, then cached);
        409 while a run's data loop serves a ring, unless the speed is cached."""
        return await rt.probe(req)

    @router.post("/init", **private)
    async def init(req: InitRequest) -> dict:
        return await rt.init(req)

    @router.put("/weights/{run_id}", **private)
    async def weights(run_id: int, request: Request) -> dict:
        run = rt.current_run(run_id)
        check_weights_size(request.headers.get("content-length"),
                           weights_limit(run.config, run.req.start, run.req.stop))
        # parsed as it arrives: the header is checked before any tensor byte is read
        return await rt.load_weights(run_id, request.stream())

    @router.post("/connect", **private)
    async def connect(ref: RunRef) -> dict:
        return await rt.connect(ref.run_id)

    @router.post("/hold", **private)
    async def hold(ref: RunRef) -> dict:
        """Keep run N (park it, not drop it) when its links end: layers move next."""
        return await rt.hold(ref.run_id)

    move_routes(rt, router, private)

    @router.post("/stop", **private)
    async def stop(ref: RunRef | None = None) -> dict:
        """Drop the current run; with {"run_id": N}, only if run N is the current one."""
        return await rt.stop(ref.run_id if ref is not None else None)

    @router.post("/shutdown", **private)
    async def shutdown() -> dict:
        if on_shutdown is not None:
            on_shutdown()
        return {"state": "shutting down"}

    return router


def move_routes(rt: NodeRuntime, router: APIRouter, private: dict) -> None:
    """A live re-plan's layer moves (layer_move.py)."""
    @router.post("/move/export", **private)
    async def move_export(spec: MoveSpec) -> Response:
        """The KV rows of layers the parked run gives (protocol/kv_move.py)."""
        return Response(await layer_move.export(rt, spec), media_type="application/octet-stream")

    @router.post("/move/expect", **private)
    async def move_expect(spec: MoveSpec) -> dict:
        return await layer_move.expect(rt, spec)

    @router.put("/move/kv/{run_id}/{start}/{stop}", **private)
    async def move_kv(run_id: int, start: int, stop: int, request: Request) -> dict:
        return await layer_move.take_rows(rt, run_id, start, stop,
                                          request.headers.get("content-length"), request.stream())

    @router.put("/move/weights/{run_id}/{start}/{stop}", **private)
    async def move_weights(run_id: int, start: int, stop: int, request: Request) -> dict:
        run, _ = layer_move.incoming(rt, run_id, start, stop)
        check_weights_size(request.headers.get("content-length"),
                           weights_limit(run.config, start, stop))
        return await layer_move.take_weights(rt, run_id, start, stop, request.stream())


def check_weights_size(declared: str | None, limit: int) -> None:
    """A /weights body's Content-Length against what its layer range can need."""
    if declared is None or not declared.isdigit():
        raise InitError("weights: a Content-Length header is required")
    if int(declared) > limit:
        raise InitError(f"weights: {declared} bytes exceed the {limit} bytes "
                        "this layer range can need")


# ---- error answers: a status and {"detail": ...} naming what is wrong ---------------------
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            parts.append(f"body: not valid JSON ({why})" if why else "body: not valid JSON")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    detail = "; ".join(parts)
    log.warning("refused %s: %s", printable(request.url.path), printable(detail))
    return JSONResponse({"detail": detail}, status_code=422)


async def _init_error(request: Request, exc: InitError) -> JSONResponse:
    log.warning("refused %s: %s", printable(request.url.path), printable(str(exc), 500))
    return JSONResponse({"detail": str(exc)}, status_code=400)


async def _busy(request: Request, exc: NodeBusy) -> JSONResponse:
    log.warning("refused %s: %s", printable(request.url.path), printable(str(exc), 500))
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    log.warning("refused %s: %s", printable(request.url.path), exc)
    return JSONResponse({"detail": str(exc)}, status_code=413, headers={"connection": "close"})


async def _conn_error(request: Request, exc: ConnectionError) -> JSONResponse:
    log.warning("%s failed: %s", printable(request.url.path), printable(str(exc), 500))
    return JSONResponse({"detail": str(exc)}, status_code=502)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The starter shows this with the node's name; the traceback stays in this log.
    log.error("%s failed", printable(request.url.path), exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"},
                        status_code=500)


ERROR_HANDLERS = ((RequestValidationError, _invalid), (InitError, _init_error),
                  (NodeBusy, _busy), (BodyTooLarge, _too_large), (ConnectionError, _conn_error),
                  (Exception, _unexpected))


def weights_limit(config, start: int, stop: int) -> int:
    """Largest safetensors stream a stage can need: float32 tensors plus the header."""
    from ...checkpoint.format import expected_shapes

    n = 0
    for shape in expected_shapes(config, start, stop).values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return 4 * n + MAX_JSON_BYTES
