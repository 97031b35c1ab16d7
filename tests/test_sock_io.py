"""Frames over plain blocking sockets (ring/sock_io.py): what a node's data thread
reads and writes. The same frames as the asyncio path, the same checks, in the
same order: a bad header is refused before any payload byte is read."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import torch

from mdi.ring.protocol.auth import answer, challenge
from mdi.ring.protocol.sock_io import (FrameStalled, SockStream, _rest, recv_frame, send_frame,
                                       set_recv_timeout, set_send_timeout)
from mdi.ring.protocol.wire import (DTYPE_CODES, HEADER_SIZE, Frame, Kind, WireError, admit_frame, decode_frame,
                           encode_frame)
from test_wire import LIM, REJECTIONS, RUN, assert_same_frame, header, random_act

torch.set_num_threads(1)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _recv(sock: socket.socket) -> Frame:
    return recv_frame(sock, LIM, bytearray(HEADER_SIZE))


FRAMES = [
    Frame(Kind.DECODE, RUN, 1, 5, random_act((2, 1, 8), torch.float32)),
    Frame(Kind.DECODE, RUN, 0, 3, random_act((3, 1, 8), torch.float32, seed=2)),
    Frame(Kind.PREFILL, RUN, 2, 0, random_act((1, 7, 8), torch.float32, seed=1)),
    Frame(Kind.TOKENS, RUN, 0, 0, torch.tensor([5, 9], dtype=torch.int64)),
    Frame(Kind.STOP, RUN),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.kind.name)
def test_send_then_recv_round_trip(pair, frame):
    a, b = pair
    n = send_frame(a, frame)
    assert n == len(encode_frame(frame))  # the same bytes as the asyncio path
    assert_same_frame(_recv(b), frame)


def test_bfloat16_activations_round_trip(pair):
    """numpy has no bfloat16: the bytes go out through a uint8 view."""
    a, b = pair
    frame = Frame(Kind.DECODE, RUN, 0, 3, random_act((3, 1, 8), torch.bfloat16, seed=2))
    send_frame(a, frame)
    lim = type(LIM)(**{**LIM.__dict__, "act_dtype": DTYPE_CODES[torch.bfloat16]})
    assert_same_frame(recv_frame(b, lim, bytearray(HEADER_SIZE)), frame)


def test_sequence_frames_carry_their_slot_table(pair):
    a, b = pair
    lim = type(LIM)(**{**LIM.__dict__, "sequences": True})
    sent = Frame(Kind.SEQ_DECODE, RUN, 1, 0, random_act((2, 1, 8), torch.float32), slots=(1, 3))
    send_frame(a, sent)
    got = recv_frame(b, lim, bytearray(HEADER_SIZE))
    assert got.slots == (1, 3)
    assert_same_frame(got, sent)
    send_frame(a, admit_frame(RUN, 2, 0.7, 40, 0.9, 11))
    admit = recv_frame(b, lim, bytearray(HEADER_SIZE))
    assert admit.kind == Kind.ADMIT and admit.sample == 2


def test_received_tensor_owns_aligned_writable_memory(pair):
    a, b = pair
    send_frame(a, FRAMES[0])
    got = _recv(b)
    assert got.tensor.data_ptr() % 64 == 0
    got.tensor.add_(1)  # writable


@pytest.mark.parametrize("kw,match", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_bad_header_refused_before_the_payload(pair, kw, match):
    """The sender writes the header only and keeps the link open: a reader that
    waited for the payload would hang (the test would time out)."""
    a, b = pair
    b.settimeout(5)
    a.sendall(header(**kw))
    with pytest.raises(WireError, match=match):
        _recv(b)


def test_bad_admit_parameters_refused_on_receipt(pair):
    a, b = pair
    lim = type(LIM)(**{**LIM.__dict__, "sequences": True})
    send_frame(a, admit_frame(RUN, 1, -1.0, None, None, 3))
    with pytest.raises(WireError, match="ADMIT for slot 1: temperature"):
        recv_frame(b, lim, bytearray(HEADER_SIZE))


def test_eof_between_frames_and_truncation(pair):
    a, b = pair
    data = encode_frame(FRAMES[0])
    a.sendall(data[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(WireError, match="truncated payload"):
        _recv(b)
    c, d = socket.socketpair()
    c.close()
    with pytest.raises(EOFError):
        _recv(d)
    d.close()


def test_same_checks_as_decode_frame(pair):
    """A frame refused by wire.decode_frame is refused here with the same message."""
    a, b = pair
    bad = Frame(Kind.PREFILL, RUN, 0, 0, random_act((1, 20, 8), torch.float32))  # T > block_size
    data = encode_frame(bad)
    with pytest.raises(WireError) as want:
        decode_frame(data, LIM)
    a.sendall(data)
    with pytest.raises(WireError) as got:
        _recv(b)
    assert str(got.value) == str(want.value)


def test_a_large_frame_goes_out_whole_through_a_small_buffer(pair):
    """sendmsg may take part of a frame; the rest follows (the receiver reads as it goes)."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    set_send_timeout(a, 5.0)
    frame = Frame(Kind.PREFILL, RUN, 0, 0, random_act((1, 16, 8), torch.float32))
    big = Frame(Kind.PREFILL, RUN, 0, 0, random_act((1, 16, 4096), torch.float32))
    lim_big = type(LIM)(**{**LIM.__dict__, "n_embd": 4096})
    got: list[Frame] = []
    t = threading.Thread(target=lambda: got.append(recv_frame(b, lim_big, bytearray(HEADER_SIZE))))
    t.start()
    send_frame(a, big)
    t.join(10)
    assert_same_frame(got[0], big)
    send_frame(a, frame)
    assert_same_frame(_recv(b), frame)


def test_send_times_out_when_the_peer_takes_nothing(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    set_send_timeout(a, 0.2)
    big = Frame(Kind.PREFILL, RUN, 0, 0, random_act((1, 16, 65536), torch.float32))
    with pytest.raises(TimeoutError):
        send_frame(a, big)


@pytest.mark.parametrize("cut", [HEADER_SIZE // 2, HEADER_SIZE + 5], ids=["header", "payload"])
def test_a_frame_cut_short_fails_once_no_byte_comes_within_the_receive_timeout(pair, cut):
    """A peer that sends part of a frame, then nothing (its link still open): the read
    fails naming what came, instead of waiting for good. A frame sent in two parts
    to a socket with a receive timeout is read whole."""
    a, b = pair
    set_recv_timeout(b, 0.05)
    data = encode_frame(FRAMES[0])
    a.sendall(data[:cut])
    with pytest.raises(FrameStalled, match="stopped inside a frame: .* bytes of its "
                       + ("header" if cut < HEADER_SIZE else "payload")):
        _recv(b)
    c, d = socket.socketpair()
    set_recv_timeout(d, 5.0)
    got: list[Frame] = []
    t = threading.Thread(target=lambda: got.append(_recv(d)))
    c.sendall(data[:cut])
    t.start()
    c.sendall(data[cut:])
    t.join(10)
    assert_same_frame(got[0], FRAMES[0])
    c.close()
    d.close()


def test_rest_skips_what_was_sent():
    parts = [b"abc", memoryview(b"defg"), b"hi"]
    assert b"".join(bytes(p) for p in _rest(parts, 0)) == b"abcdefghi"
    assert b"".join(bytes(p) for p in _rest(parts, 4)) == b"efghi"
    assert b"".join(bytes(p) for p in _rest(parts, 7)) == b"hi"


def test_handshake_over_raw_sockets():
    """auth.challenge / answer run unchanged over SockStream, and read nothing past
    the handshake: the first frame after it is still in the socket."""
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        sa, sb = SockStream(a), SockStream(b)
        await asyncio.wait_for(asyncio.gather(challenge(sa, sa, "t" * 20, RUN, 5),
                                              answer(sb, sb, "t" * 20, RUN, 5)), 10)
        b.setblocking(True)
        b.sendall(encode_frame(FRAMES[0]))
        a.setblocking(True)
        assert_same_frame(_recv(a), FRAMES[0])
        a.close()
        b.close()

    asyncio.run(main())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.uint8])
def test_a_tensors_bytes_are_its_memory_whatever_the_path(dtype):
    """tensor_view's fast path (a numpy view) and the general one (a uint8 view,
    bfloat16, strided or needing grad) give the bytes the tensor holds, flat."""
    from mdi.ring.protocol.wire import byte_view, tensor_view
    t = (torch.arange(24) * 3 % 11).to(dtype).reshape(2, 3, 4)
    want = t.contiguous().view(torch.uint8).numpy().tobytes()
    for view in (tensor_view(t), byte_view(t), tensor_view(t.transpose(0, 1).contiguous()
                                                           .transpose(0, 1))):
        assert view.ndim == 1 and view.itemsize == 1 and bytes(view) == want
    if dtype.is_floating_point:
        assert bytes(tensor_view(t.clone().requires_grad_())) == want
    out = torch.empty_like(t)
    byte_view(out)[:] = want  # a received payload lands in the tensor itself
    assert torch.equal(out, t)
