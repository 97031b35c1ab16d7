"""Links over Unix-domain sockets between processes of one machine (ring/local_link.py):
which links the starter makes local, the sockets, and a node that takes its
previous node and reaches its next one over them, in this process."""
from __future__ import annotations

import asyncio
import logging

import pydantic
import pytest
import torch

from cluster_helpers import TOKEN, finisher_and_fake_starter
from mdi.ring.protocol import local_link
from mdi.ring.protocol.auth import answer
from mdi.ring.plan.capability import host_id
from mdi.ring.protocol.local_link import (NAME_PATTERN, link_scope, listen_local, local_links, new_name,
                                 open_local, open_streams)
from mdi.ring.node.control_messages import Peer
from mdi.ring.protocol.wire import Frame, Kind, read_frame


# ---- which links are local ------------------------------------------------------
def test_links_between_processes_of_one_scope_are_local():
    here, there = {"link_scope": "boot/1"}, {"link_scope": "boot/2"}
    a, b = ({**here, "local_link": f"mdi-data-{i:016x}"} for i in range(2))
    # starter, two nodes, all in one scope: every link, the finisher's back to the starter too
    assert local_links([here, a, b], "S") == ["S", a["local_link"], b["local_link"]]
    # the second node in another network namespace: its links in and out are TCP
    b2 = {**there, "local_link": "mdi-data-" + "e" * 16}
    assert local_links([here, a, b2], "S") == [None, a["local_link"], None]
    # a node that reports no scope (an older node, or MDI_LOCAL_LINKS=0), or no socket
    assert local_links([here, {"local_link": a["local_link"]}, b], "S") == [
        "S", None, None]
    # a node without a socket is reached over TCP; it still reaches the next one locally
    assert local_links([here, {**here, "local_link": None}, b], "S") == ["S", None,
                                                                         b["local_link"]]
    # a starter without a scope links over TCP both ways
    assert local_links([{"link_scope": None}, a], "S") == [None, None]
    assert local_links([here], "S") == [None]  # a ring of one has no link


def test_scope_is_this_boot_and_network_namespace(monkeypatch):
    scope = link_scope()
    assert scope is not None and scope.startswith(host_id() + "/")
    monkeypatch.setenv(local_link.ENV_VAR, "0")
    assert link_scope() is None


def test_names_are_checked_everywhere():
    name = new_name()
    assert pydantic.TypeAdapter(Peer).validate_python(
        {"addr": "127.0.0.1", "port": 1, "local": name}).local == name
    for bad in ("/tmp/sock", "mdi-data-XYZ", "\0mdi-data-0123456789abcdef", "mdi-data-" + "0" * 17):
        with pytest.raises(pydantic.ValidationError, match="local"):
            Peer(addr="127.0.0.1", port=1, local=bad)
        with pytest.raises(ValueError, match="not a local link name"):
            listen_local(bad)
    assert NAME_PATTERN.startswith("^mdi-data-")


def test_a_local_socket_carries_bytes_and_is_unique():
    async def scenario() -> None:
        name = new_name()
        listener = listen_local(name)
        try:
            with pytest.raises(OSError):
                listen_local(name)  # taken: a second process cannot take it over
            server = await asyncio.start_unix_server(_echo, sock=listener)
            reader, writer = await open_streams(await open_local(name))
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 3) == b"ping"
            writer.close()
            server.close()
        finally:
            listener.close()
        with pytest.raises(OSError):
            await open_local(new_name())  # nobody listens there

    asyncio.run(asyncio.wait_for(scenario(), 10))


async def _echo(reader, writer):
    writer.write(await reader.readexactly(4))
    await writer.drain()
    writer.close()


# ---- a node over local sockets, in this process ------------------------------------
async def _upstream(rt, cfg, run_id: int, local: bool):
    if local:
        reader, writer = await open_streams(await open_local(rt.local_link))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.finisher.port_in)
    await answer(reader, writer, TOKEN, run_id, 3.0)
    return reader, writer


def test_a_node_links_both_ways_over_local_sockets(tiny_ckpt):
    async def scenario() -> None:
        harness = finisher_and_fake_starter(tiny_ckpt, local_next=True, prev_local=True)
        async with harness as (rt, cfg, config, start_run):
            caps = rt.capabilities()
            assert caps["local_link"] == rt.local_link and caps["link_scope"] == link_scope()
            back_r, back_w = await start_run(7)
            assert local_link.link_kind(back_w) == "unix" and rt.run.stats.link == "unix"
            reader, writer = await _upstream(rt, cfg, 7, local=True)
            assert rt.run.upstream
            h = torch.zeros(1, 3, config.n_embd)
            writer.write(Frame(Kind.CONTEXT, 7, 0, 0, h).encode())
            tok = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
            assert tok.kind == Kind.TOKENS and tok.tensor.shape == (1,)
            writer.close()
            back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_local_connection_is_refused_unless_the_previous_node_is_local(tiny_ckpt, caplog):
    async def scenario() -> None:
        async with finisher_and_fake_starter(tiny_ckpt) as (rt, cfg, _, start_run):
            _, back_w = await start_run(8)
            assert local_link.link_kind(back_w) == "tcp" and rt.run.stats.link == "tcp"
            reader, writer = await open_streams(await open_local(rt.local_link))
            with pytest.raises((EOFError, ConnectionError)):
                await answer(reader, writer, TOKEN, 8, 3.0)
            assert not rt.run.upstream
            writer.close()
            await _upstream(rt, cfg, 8, local=False)  # the configured previous node, over TCP
            assert rt.run.upstream
            back_w.close()

    with caplog.at_level(logging.WARNING, logger="mdi.ring.node.runtime"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "refused data connection from a local socket: connection on the local socket, " \
        "the previous node is 127.0.0.1 over TCP" in caplog.text


def test_a_next_node_not_reachable_locally_is_reached_over_tcp(tiny_ckpt, caplog):
    async def scenario() -> None:
        harness = finisher_and_fake_starter(tiny_ckpt, local_next=True, next_name=new_name())
        async with harness as (rt, _, _, start_run):
            _, back_w = await start_run(9)
            assert local_link.link_kind(back_w) == "tcp"
            back_w.close()

    with caplog.at_level(logging.WARNING, logger="mdi.ring.node.runtime"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "linking over TCP" in caplog.text
