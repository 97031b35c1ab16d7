"""The weights streams the starter keeps for a spare (`--recovery replay`,
ring/starter/stream_cache.py): a kept stream is byte for byte the one made afresh
(our checkpoint here; a GGUF's int4 codes in test_int4_stream.py), the spare's upload sends it without
making it again, and it is not kept when it would not fit (the cache's limit,
free memory), when the stream was cut short, or when no spare is listed."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mdi.checkpoint.sources import open_checkpoint
from mdi.checkpoint.stream import shard_bytes, shard_stream
from mdi.ring.cluster.nodes_config import NodeSpec, NodesConfig
from mdi.ring.plan.limits import DeviceMemory
from mdi.ring.plan.partition import Shard
from mdi.ring.starter import client as client_mod
from mdi.ring.starter import stream_cache
from mdi.ring.starter.client import RingClient
from mdi.ring.starter.options import RunOptions
from mdi.ring.starter.stream_cache import ENV_VAR, StreamCache, default_limit

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"


def kept_bytes(cache: StreamCache, key) -> bytes:
    got = cache.get(key)
    assert got is not None
    total, chunks = got
    data = b"".join(chunks)
    assert len(data) == total
    return data


def test_a_kept_stream_equals_a_fresh_one_and_is_read_again_whole():
    ck = open_checkpoint(str(BUNDLED))
    shard = Shard(2, 6, ck.config.n_layer)
    cache = StreamCache(limit=1 << 30)
    total, chunks = shard_stream(ck, shard)
    sent = b"".join(cache.tee((2, 6, None, "float32"), total, chunks))
    fresh = shard_bytes(ck, shard)
    assert sent == fresh
    assert kept_bytes(cache, (2, 6, None, "float32")) == fresh
    assert kept_bytes(cache, (2, 6, None, "float32")) == fresh  # every get is the whole stream
    assert cache.nbytes == len(fresh)
    assert cache.get((0, 6, None, "float32")) is None


def test_not_kept_past_the_limit_or_without_room(monkeypatch):
    data = [b"x" * 100, b"y" * 50]
    cache = StreamCache(limit=120)
    assert b"".join(cache.tee((0, 1), 150, iter(data))) == b"".join(data)  # still sent whole
    assert cache.get((0, 1)) is None and cache.nbytes == 0
    assert "limit" in cache.room_for(150)

    monkeypatch.setattr(stream_cache, "free_memory", lambda device: DeviceMemory(250, 1000, "test"))
    cache = StreamCache(limit=1 << 30)
    assert "as much again" in cache.room_for(150)  # 150 kept would leave 100 < 150
    assert b"".join(cache.tee((0, 2), 150, iter(data))) == b"".join(data)
    assert cache.get((0, 2)) is None
    assert cache.room_for(100) is None
    b"".join(cache.tee((0, 3), 100, iter([b"z" * 100])))
    assert cache.nbytes == 100


def test_a_stream_cut_short_keeps_nothing_and_old_ranges_go():
    cache = StreamCache(limit=1 << 30)
    gen = cache.tee((0, 1), 200, iter([b"x" * 100, b"y" * 100]))
    next(gen)
    gen.close()  # the upload failed part way
    assert cache.get((0, 1)) is None
    b"".join(cache.tee((0, 2), 3, iter([b"abc"])))
    b"".join(cache.tee((0, 3), 2, iter([b"de"])))
    cache.keep_only({(0, 3)})
    assert cache.get((0, 2)) is None and kept_bytes(cache, (0, 3)) == b"de"


def test_the_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "2")
    assert default_limit() == 2 << 20
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=ENV_VAR):
        default_limit()


class FakeHttp:
    """An httpx client's put: the body read whole, as a node would."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def put(self, url, content, timeout, headers):
        self.bodies.append(b"".join([c async for c in content]))
        assert int(headers["content-length"]) == len(self.bodies[-1])

        class R:
            status_code = 200

            @staticmethod
            def json():
                return {}
        return R()


def nodes(spares: int) -> NodesConfig:
    def spec(role, i):
        return NodeSpec(role, i, "127.0.0.1", 10 + 3 * i, 11 + 3 * i, 12 + 3 * i)
    return NodesConfig(spec("starter", 0), (), spec("finisher", 1),
                       tuple(spec("spare", i) for i in range(spares)))


def test_the_spares_upload_sends_the_kept_stream_not_a_new_one(monkeypatch):
    ck = open_checkpoint(str(BUNDLED))
    shard = Shard(3, 6, ck.config.n_layer)
    made = []

    def counted(*a, **k):
        made.append(a[1])
        return shard_stream(*a, **k)

    monkeypatch.setattr(client_mod, "shard_stream", counted)
    client = RingClient(nodes(1), "t", ck, RunOptions(recovery="replay"))
    http = FakeHttp()
    spec = client.nodes.ring[1]
    asyncio.run(client.upload(http, spec, 1, shard))
    healed = client.with_nodes(nodes(0))  # heal.py's client (the last spare taken): the cache
    asyncio.run(healed.upload(http, spec, 2, shard))
    assert len(made) == 1 and http.bodies[0] == http.bodies[1] == shard_bytes(ck, shard)
    assert not client.uploaded[spec.name][1] and healed.uploaded[spec.name][1]

    # reprefill keeps nothing; a ring without spares keeps nothing and drops what was kept
    # once it is configured (configure: keep_only)
    assert RingClient(nodes(1), "t", ck, RunOptions()).streams is None
    fresh = RingClient(nodes(0), "t", ck, RunOptions(recovery="replay"))
    asyncio.run(fresh.upload(http, spec, 3, shard))
    assert fresh.streams.nbytes == 0
    alone = NodesConfig(client.nodes.starter, (), None, ())
    assert client.streams.nbytes > 0 and client.with_nodes(alone).streams.nbytes == 0
