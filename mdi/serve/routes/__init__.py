"""The API's routers, one per concern; each reads the server's `Service` from app.state."""
from fastapi import Request

from ..service import Service


def service(request: Request) -> Service:
    """FastAPI dependency: the Service of the app that got the request."""
    return request.app.state.service
