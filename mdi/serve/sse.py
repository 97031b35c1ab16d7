"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n`, ending `data: [DONE]\\n\\n`.

`EventStreamResponse` always watches for the client going away while it
streams, and closes the body generator when it does, so the generator's
`finally` (which cancels the engine sequence) runs at once instead of when
the garbage collector finds it. Starlette only does that for ASGI servers
older than spec 2.4, and then only by cancelling the sending task.
"""
from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("mdi.serve")

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200,
                 headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.on_close = on_close  # also runs when the body never started (client left at once)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, status_code=status_code, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the transport closed under us: same as a disconnect
                        log.debug("stream ended: client went away while sending")
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                log.debug("client disconnected mid-stream")
                tg.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                self.on_close()
