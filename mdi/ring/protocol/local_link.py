"""Data links between processes of one machine, over Unix-domain sockets.

Two processes of a ring (nodes, or the starter and a node) that report the same
link scope, this boot of this machine and the same network namespace, link
through a Unix-domain socket instead of TCP: a frame then skips the TCP/IP
stack. On the project's 2-core VM a round trip of a 4.6 KB frame between two
processes took 63 µs over loopback TCP and 28 µs over a Unix socket, with
25 and 10 µs of CPU.

The sockets live in Linux's abstract namespace, which belongs to the network
namespace: there is no file to clean up, and a process of another namespace
(a `--hosts netns` host of `mdi bench`) cannot reach them. Every node listens on
one, named at random when it starts and reported in GET /capabilities; the
starter tells each node in /init whether its next hop is local (`next.local`)
and whether its previous one is (`prev_local`). The link handshake (auth.py)
is the same as over TCP: reaching the socket proves nothing.

`MDI_LOCAL_LINKS=0` in a process's environment turns them off (it then
reports no scope), for comparisons with TCP.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket

from ..plan.capability import host_id
from .sock_io import open_socket

log = logging.getLogger(__name__)

PREFIX = "mdi-data-"
NAME_PATTERN = r"^mdi-data-[0-9a-f]{16}$"
_NAME_RE = re.compile(NAME_PATTERN)
ENV_VAR = "MDI_LOCAL_LINKS"


def link_scope() -> str | None:
    """Where this process's abstract Unix sockets can be reached: the machine's boot
    id and this network namespace; None where there are none (not Linux, or turned
    off with MDI_LOCAL_LINKS=0)."""
    if os.environ.get(ENV_VAR, "1") == "0" or not hasattr(socket, "AF_UNIX"):
        return None
    host = host_id()
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{host}/{netns}" if host else None


def new_name() -> str:
    return PREFIX + secrets.token_hex(8)


def _address(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a local link name: {name!r}")
    return "\0" + name  # the abstract namespace


def listen_local(name: str) -> socket.socket:
    """A non-blocking listening Unix socket at the abstract `name`; OSError if it
    cannot be bound."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_address(name))
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_local(name: str) -> socket.socket:
    """A non-blocking connection to the abstract Unix socket `name` (OSError if none)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, _address(name))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_link(local: str | None, host: str, port: int) -> socket.socket:
    """A non-blocking connection to the next process of the ring: its Unix socket
    `local` when the starter says it shares this machine and network namespace, else
    TCP to host:port; TCP too when the local one cannot be reached."""
    if local is not None:
        try:
            return await open_local(local)
        except OSError as e:
            log.warning("local socket %s of %s:%d: %s; linking over TCP", local, host, port,
                        e.strerror or e)
    return await open_socket(host, port)


async def open_streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a connected socket (open_link's), Unix or TCP."""
    if is_local(sock):
        return await asyncio.open_unix_connection(sock=sock)
    return await asyncio.open_connection(sock=sock)


def is_local(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX


def link_kind(writer: asyncio.StreamWriter) -> str:
    """"unix" or "tcp": what a stream's link runs over, as hops report it."""
    sock = writer.get_extra_info("socket")
    return "" if sock is None else "unix" if is_local(sock) else "tcp"


def local_links(caps: list[dict], starter_name: str | None) -> list[str | None]:
    """For each process of the ring (starter first, with caps[0] its own), the local
    socket its previous process connects to, or None for TCP: both must report the
    same link scope, and the target a socket (the starter's is `starter_name`)."""
    n = len(caps)
    names = [starter_name] + [c.get("local_link") for c in caps[1:]]
    out: list[str | None] = []
    for j in range(n):
        prev, here = caps[j - 1], caps[j]  # the finisher is the starter's previous
        scope = here.get("link_scope")
        same = n > 1 and scope is not None and prev.get("link_scope") == scope
        out.append(names[j] if same and names[j] else None)
    return out
