"""The data-plane handshake in both directions: the listener checks the connecting
side, and the connecting side checks the listener before sending it anything."""
from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest
import torch

from cluster_helpers import (HTTP_TIMEOUT, TOKEN, auth, build_tiny_ckpt, init_body, run_cli,
                             start_ring, status, weights_for)
from mdi.ring.protocol.auth import AuthError, answer, challenge
from mdi.ring.protocol.wire import Frame, Kind, read_frame, write_frame

RUN = 4242


async def _pair(listener, connector):
    """Run `listener(reader, writer)` on a loopback server and `connector(reader, writer)`
    against it; return both outcomes (a value or the exception)."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        try:
            done.set_result(await listener(reader, writer))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            done.set_result(e)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        mine = await connector(reader, writer)
    except Exception as e:  # noqa: BLE001
        mine = e
    finally:
        writer.close()
    theirs = await asyncio.wait_for(done, 5)
    server.close()
    return theirs, mine


def _run(listener, connector):
    return asyncio.run(_pair(listener, connector))


def test_same_token_both_sides_pass():
    assert _run(lambda r, w: challenge(r, w, TOKEN, RUN, 3), lambda r, w: answer(r, w, TOKEN, RUN, 3)) \
        == (None, None)


def test_listener_without_the_token_is_refused_by_the_connector():
    # it cannot check our answer, so it closes: we refuse with a clear error
    theirs, mine = _run(lambda r, w: challenge(r, w, "not-the-token-0123456789", RUN, 3),
                        lambda r, w: answer(r, w, TOKEN, RUN, 3))
    assert isinstance(theirs, AuthError) and "wrong token" in str(theirs)
    assert isinstance(mine, AuthError) and "listener closed the link during the handshake" in str(mine)


async def _bluffing_listener(reader, writer, proof=None):
    """Accepts anything and answers with a proof it cannot compute (or a replay)."""
    nonce = secrets.token_bytes(32)
    await write_frame(writer, Frame(Kind.CHALLENGE, RUN, tensor=torch.tensor(list(nonce), dtype=torch.uint8)))
    got = await read_frame(reader, None)
    body = bytes(got.tensor.numpy())
    fake = proof(body) if proof else secrets.token_bytes(32)
    await write_frame(writer, Frame(Kind.AUTH, RUN, tensor=torch.tensor(list(fake), dtype=torch.uint8)))
    # anything sent after the handshake would arrive here
    try:
        return await asyncio.wait_for(reader.read(1), 2)
    except (asyncio.TimeoutError, ConnectionError):
        return b""


@pytest.mark.parametrize("proof", [None, lambda body: body[:32]], ids=["random", "replayed"])
def test_listener_that_bluffs_is_refused_before_any_data(proof):
    async def connector(reader, writer):
        await answer(reader, writer, TOKEN, RUN, 3)
        await write_frame(writer, Frame(Kind.STOP, RUN))  # never reached
    theirs, mine = _run(lambda r, w: _bluffing_listener(r, w, proof), connector)
    assert isinstance(mine, AuthError)
    assert "the listener did not prove the cluster token" in str(mine)
    assert theirs == b""  # the connector closed without sending a frame


def test_connector_without_the_token_is_refused_by_the_listener():
    theirs, mine = _run(lambda r, w: challenge(r, w, TOKEN, RUN, 3),
                        lambda r, w: answer(r, w, "not-the-token-0123456789", RUN, 3))
    assert isinstance(theirs, AuthError) and "wrong token" in str(theirs)
    assert isinstance(mine, AuthError)


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    root = tmp_path_factory.mktemp("mutual_auth")
    r = start_ring(root, build_tiny_ckpt(root / "ckpt"))
    yield r
    r.stop()


@pytest.mark.slow
def test_node_refuses_a_next_node_that_does_not_know_the_token(ring):
    """The finisher's next node is the starter's address, taken over by an impostor:
    /connect fails with a clear error and the run stays configured."""
    fin = ring.fin.spec
    starter = ring.config.starter
    received: list[bytes] = []

    async def impostor(reader, writer):
        received.append(await _bluffing_listener(reader, writer))
        writer.close()

    async def scenario() -> httpx.Response:
        server = await asyncio.start_server(impostor, starter.addr, starter.port_in)
        try:
            async with httpx.AsyncClient(headers=auth(), timeout=60) as http:
                r = await http.post(fin.url + "/init", json=init_body(ring, 91))
                assert r.status_code == 200, r.text
                r = await http.put(f"{fin.url}/weights/91", content=weights_for(ring))
                assert r.status_code == 200, r.text
                r = await http.post(fin.url + "/connect", json={"run_id": 91},
                                    timeout=HTTP_TIMEOUT + 5)
                await asyncio.sleep(0.5)
                return r
        finally:
            server.close()

    r = asyncio.run(scenario())
    assert r.status_code == 502
    detail = r.json()["detail"]
    assert detail.startswith(f"cannot reach the next node at {starter.addr}:{starter.port_in}")
    assert "the listener did not prove the cluster token" in detail
    assert received == [b""]
    assert status(fin)["state"] == "ready"
    # a real starter then runs on the same nodes: both directions check out
    rc, out, err = run_cli("starter", "--ckpt", ring.ckpt, "--nodes-config", ring.nodes_path,
                           "--token", TOKEN, "--n-tokens", "3", "--temperature", "0")
    assert rc == 0, err[-3000:]
