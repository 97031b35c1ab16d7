"""Weights streamed as safetensors: producer == checkpoint, parser rejects mismatches early."""
from __future__ import annotations

import asyncio
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load

from mdi.checkpoint import save_checkpoint
from mdi.checkpoint.format import expected_shapes
from mdi.ring.plan.partition import Shard, even_split
from mdi.checkpoint.chunks import shard_tensors
from mdi.checkpoint.stream import WeightsStreamError, read_stream, shard_stream
from mdi.model import GPT, GPTConfig
from mdi.tokenizer import CharTokenizer

CONFIG = GPTConfig(vocab_size=30, block_size=16, n_layer=4, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer([chr(65 + i) for i in range(30)])
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), GPT(CONFIG), tok)


async def _aiter(chunks, size=7):
    for c in chunks:
        for i in range(0, len(c), size):  # odd chunk sizes: tensors straddle chunks
            yield c[i:i + size]
            yield b""  # as Starlette's request.stream() does at the end


def parse(data: bytes, want):
    return asyncio.run(read_stream(_aiter([data]), want))


@pytest.mark.parametrize("shard", even_split(4, 3) + [Shard(0, 4, 4)])
def test_stream_round_trip_equals_shard(ckpt, shard):
    total, chunks = shard_stream(ckpt, shard)
    data = b"".join(chunks)
    assert len(data) == total
    want = shard_tensors(ckpt, shard)
    assert st_load(data).keys() == want.keys()  # the stream is valid safetensors
    got = parse(data, expected_shapes(CONFIG, shard.start, shard.stop))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].data_ptr() % 64 == 0 for k in want)


def _stream(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_rejections_name_the_problem(ckpt):
    shard = Shard(3, 4, 4)
    want = expected_shapes(CONFIG, 3, 4)
    _, chunks = shard_stream(ckpt, shard)
    good = b"".join(chunks)
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    body = good[8 + n:]
    name = next(iter(header))
    cases = []
    h = dict(header); h.pop(name); cases.append((h, body, "missing tensor"))
    h = dict(header); h["transformer.h.0.attn.c_attn.weight"] = header[name]; cases.append((h, body, "not part"))
    h = json.loads(json.dumps(header)); h[name]["shape"] = [1, 2]; cases.append((h, body, "shape"))
    h = json.loads(json.dumps(header)); h[name]["dtype"] = "I64"; cases.append((h, body, "dtype"))
    h = json.loads(json.dumps(header)); h[name]["data_offsets"] = [1, 2]; cases.append((h, body, "data_offsets"))
    for h, b, msg in cases:
        with pytest.raises(WeightsStreamError, match=msg):
            parse(_stream(h, b), want)
    with pytest.raises(WeightsStreamError, match="ended"):
        parse(good[:-3], want)
    with pytest.raises(WeightsStreamError, match="trailing"):
        parse(good + b"x", want)
    with pytest.raises(WeightsStreamError, match="not a valid safetensors stream: header length"):
        parse(struct.pack("<Q", 1 << 40) + b"{}", want)
    with pytest.raises(WeightsStreamError, match="not JSON"):
        parse(struct.pack("<Q", 4) + b"\x80abc", want)


def test_stream_in_small_pieces_is_the_same(ckpt, monkeypatch):
    import mdi.checkpoint.stream as ws

    shard = Shard(2, 4, 4)
    whole = b"".join(shard_stream(ckpt, shard)[1])
    monkeypatch.setattr(ws, "CHUNK", 5)
    total, chunks = shard_stream(ckpt, shard)
    pieces = list(chunks)
    assert max(len(p) for p in pieces[1:]) == 5 and b"".join(pieces) == whole and len(whole) == total


def test_header_is_parsed_once_for_all_stages_and_again_when_the_file_changes(tmp_path,
                                                                               monkeypatch):
    """A ring's nodes each stream a stage of one file: its header is read once. A
    checkpoint written again in place (another depth, so another header) streams
    its new tensors, not the old layout."""
    from mdi.checkpoint import open_checkpoint, st_io

    reads = []
    real = st_io.read_header
    monkeypatch.setattr(st_io, "read_header", lambda f, *a: reads.append(1) or real(f, *a))
    tok = CharTokenizer([chr(65 + i) for i in range(30)])
    torch.manual_seed(1)
    ck = open_checkpoint(save_checkpoint(tmp_path / "c", GPT(CONFIG), tok))
    for shard in even_split(4, 3):
        assert b"".join(shard_stream(ck, shard)[1]) == b"".join(shard_stream(ck, shard)[1])
    assert len(reads) == 1
    deeper = GPTConfig(vocab_size=30, block_size=16, n_layer=6, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "c", GPT(deeper), tok)
    ck = open_checkpoint(tmp_path / "c")
    shard = Shard(5, 6, 6)
    got = parse(b"".join(shard_stream(ck, shard)[1]), expected_shapes(deeper, 5, 6))
    assert len(reads) == 2
    want = shard_tensors(ck, shard)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
