"""The starter's HTTP client for its nodes (mdi/net/peer_http.py): a node that goes
away while a connection to it opens is an unreachable node, not a crash."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from mdi.net.peer_http import node_client
from mdi.ring.cluster.local_cluster import free_ports


def test_a_socket_gone_while_opening_is_a_connect_error(monkeypatch):
    """anyio on uvloop raised AttributeError ('NoneType' ... 'getpeername') for a node
    SIGKILLed a moment before; the starter's health check took it for a bug and failed
    the run instead of recovering (seen in test_recovery_replay under load)."""
    async def gone(self, request):
        raise AttributeError("'NoneType' object has no attribute 'getpeername'")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", gone)

    async def go():
        async with node_client(1.0, "t0ken") as http:
            with pytest.raises(httpx.ConnectError, match="closed while it opened"):
                await http.get("http://127.0.0.1:9/health")
    asyncio.run(go())


def test_other_attribute_errors_are_not_hidden(monkeypatch):
    async def bug(self, request):
        raise AttributeError("'Foo' object has no attribute 'bar'")

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", bug)

    async def go():
        async with node_client(1.0) as http:
            with pytest.raises(AttributeError, match="bar"):
                await http.get("http://127.0.0.1:9/health")
    asyncio.run(go())


def test_the_token_goes_with_every_request_and_a_closed_port_is_a_connect_error():
    port = free_ports(1)[0]

    async def go():
        async with node_client(1.0, "t0ken") as http:
            assert http.headers["Authorization"] == "Bearer t0ken"
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/health")
    asyncio.run(go())
