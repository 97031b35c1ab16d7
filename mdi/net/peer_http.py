"""The HTTP client the starter talks to its nodes with (control plane).

One thing differs from a plain httpx.AsyncClient: a connection that its peer
closes while it is being opened (a node killed a moment before) fails as
httpx.ConnectError, like any other unreachable node. On uvloop, anyio (4.16)
reads the peer's address of a socket that is already gone and raises
AttributeError ("'NoneType' object has no attribute 'getpeername'"), which a
caller checking whether a node answers would take for a bug and fail the run.
"""
from __future__ import annotations

import httpx


class _PeerTransport(httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except AttributeError as e:
            if "getpeername" not in str(e):
                raise
            raise httpx.ConnectError(f"the connection closed while it opened ({e})",
                                     request=request) from None


def node_client(timeout: float, token: str | None = None) -> httpx.AsyncClient:
    """An AsyncClient for the nodes' control ports (with the cluster token when given;
    the caller closes it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return httpx.AsyncClient(timeout=timeout, headers=headers, transport=_PeerTransport())
