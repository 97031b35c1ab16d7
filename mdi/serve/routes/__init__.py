"""The API's routers, one per concern; each reads the server's `Service` from app.state."""
from fastapi import Request

from ..service import Service


async def service(request: Request) -> Service:
    """FastAPI dependency: the Service of the app that got the request (a coroutine: FastAPI
    runs a plain function on its thread pool, a hand-off per request)."""
    return request.app.state.service
