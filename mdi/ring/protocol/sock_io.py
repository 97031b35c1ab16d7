"""Frames over plain sockets: what a node's data thread reads and writes.

A node computes and forwards frames on one thread per run with blocking
sockets (node_link.py): a frame costs two `recv_into` calls straight into the
tensor's own memory and one `sendmsg` of header, slot table and tensor bytes
(no copies, no event-loop round trips, no hand-off to a worker thread). The
handshakes stay on the event loop, over the same raw sockets: `SockStream`
gives `auth.challenge` / `auth.answer` the reader/writer calls they use, and
reads exactly what is asked, so nothing is buffered when the thread takes over.

The checks are those of wire.py, in the same order: every header field
against the run's limits before any payload byte is read or any buffer made.

A node's data loop reads a frame only once poll says its first bytes are there,
and the socket has a receive timeout (`set_recv_timeout`): a peer that stops
inside a frame (half a header or payload, then nothing) makes the read fail with
FrameStalled once a read gets no byte for that long, instead of holding the
node's compute thread, and every job queued on it, for good. (A read with
MSG_WAITALL that got part of what it asked returns when its wait ends; the next
read waits again: at most two waits after the last byte.)
"""
from __future__ import annotations

import asyncio
import socket
import struct

import torch

from .wire import (SLOT_TABLE_KINDS, TORCH_DTYPES, DType, Frame, Kind, Limits, WireError,
                   byte_view, check_header, finish_frame, frame_parts, parse_header, read_row_table,
                   read_slot_table, table_bytes)


class SockStream:
    """StreamReader/StreamWriter calls over a non-blocking socket on the running loop,
    for the handshakes (auth.py): readexactly, write + drain, close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._out: list[bytes] = []

    async def readexactly(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = await loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise asyncio.IncompleteReadError(bytes(buf[:got]), n)
            got += k
        return bytes(buf)

    def write(self, data: bytes) -> None:
        self._out.append(data)

    async def drain(self) -> None:
        data, self._out = b"".join(self._out), []
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


async def open_socket(host: str, port: int) -> socket.socket:
    """A TCP connection to host:port (each address in turn), non-blocking, no Nagle."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        no_delay(sock)
        return sock
    raise error


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of host:port, as asyncio's create_server
    makes them (SO_REUSEADDR, IPv6 sockets IPv6 only), non-blocking; OSError if one
    cannot be bound."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(100)
            sock.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def no_delay(sock: socket.socket) -> None:
    """Frames go out as they are written (asyncio's transports do the same); TCP only."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose sends give up (EAGAIN) after `seconds` without progress."""
    sock.setblocking(True)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1e6)))


class FrameStalled(WireError):
    """The peer sent part of a frame, then nothing for the socket's receive timeout."""


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads give up (EAGAIN) after `seconds` without a byte."""
    sock.setblocking(True)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _recv_into(sock: socket.socket, view: memoryview, what: str, eof_ok: bool = False) -> bool:
    """Fill view from a blocking socket; False on EOF before the first byte (eof_ok);
    FrameStalled when the socket's receive timeout passes without a byte."""
    n, got = len(view), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        except BlockingIOError:  # SO_RCVTIMEO passed without a byte (a partial read returns)
            raise FrameStalled(f"the peer stopped inside a frame: {got} of the {n} bytes of "
                               f"its {what} came, then nothing within the receive "
                               "timeout") from None
        if k == 0:
            if got == 0 and eof_ok:
                return False
            raise WireError(f"truncated {what}: {got} of {n} bytes")
        got += k
    return True


def recv_frame(sock: socket.socket, lim: Limits, header: bytearray) -> Frame:
    """Read one frame from a blocking socket (header buffer reused by the caller);
    EOFError when the peer closed the link between frames, WireError on a bad frame."""
    if not _recv_into(sock, memoryview(header), "header", eof_ok=True):
        raise EOFError("connection closed")
    h = parse_header(header)
    check_header(h, lim)
    slots: tuple[int, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    if table_bytes(h):
        table = bytearray(table_bytes(h))
        _recv_into(sock, memoryview(table), "payload")
        if h.kind in SLOT_TABLE_KINDS:
            slots = read_slot_table(h, table, lim.n_samples)
        elif h.kind == Kind.PREFILLS:
            slots, spans = read_row_table(h, table, lim)
    tensor = None
    if h.dtype != DType.NONE:
        tensor = torch.empty(h.shape, dtype=TORCH_DTYPES[h.dtype])  # aligned, as torch allocates
        _recv_into(sock, byte_view(tensor), "payload")
    return finish_frame(h, slots, tensor, spans)


def send_frame(sock: socket.socket, f: Frame) -> int:
    """Write one frame with one sendmsg where the socket takes it all; raises
    TimeoutError when the peer takes nothing for the socket's send timeout."""
    parts = frame_parts(f)
    total = left = sum(len(p) for p in parts)
    while True:
        try:
            n = sock.sendmsg(parts)
        except BlockingIOError:  # SO_SNDTIMEO passed without progress
            raise TimeoutError("the peer took no data within the send timeout") from None
        left -= n
        if not left:
            return total
        parts = _rest(parts, n)


def _rest(parts: list, sent: int) -> list:
    """The bytes of parts not yet sent after `sent` bytes."""
    out, skip = [], sent
    for p in parts:
        mv = memoryview(p).cast("B")
        if skip >= len(mv):
            skip -= len(mv)
            continue
        out.append(mv[skip:])
        skip = 0
    return out
