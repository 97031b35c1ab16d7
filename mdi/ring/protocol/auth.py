"""The cluster's shared secret: where it comes from and how peers prove it.

Control plane: every request but /health carries `Authorization: Bearer TOKEN`,
compared in constant time. Data plane, in both directions:

    listener  -> CHALLENGE  nonce_L (32 random bytes)
    connector -> AUTH       HMAC(token, "connector"|run|nonce_L|nonce_C) || nonce_C
    listener  -> AUTH       HMAC(token, "listener"|run|nonce_C|nonce_L)

Each side checks the other's MAC over a nonce it chose itself, so a stranger
who reaches a data port cannot get a frame accepted, and a stranger who takes
over a listening address cannot take a node's activations: the connecting
side drops the link before sending any. The role labels keep one side's
answer from being replayed as the other's. Traffic is not encrypted (see
docs/security.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import torch

from .aio import bounded
from .wire import Frame, Kind, WireError, read_frame, write_frame

log = logging.getLogger(__name__)
ENV_VAR = "MDI_TOKEN"
NONCE_BYTES = 32
MIN_TOKEN_CHARS = 16  # shorter tokens work, with a warning


class AuthError(ValueError):
    """A missing or wrong secret."""


def resolve_token(token: str | None = None, token_file: str | None = None) -> str:
    """--token, else --token-file, else $MDI_TOKEN; error when none is given."""
    if token:
        return _checked(token.strip(), "--token")
    if token_file:
        try:
            _warn_if_shared(Path(token_file))
            value = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AuthError(f"cannot read --token-file {token_file}: {e}") from None
        if not value:
            raise AuthError(f"--token-file {token_file} is empty")
        return _checked(value, f"--token-file {token_file}")
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return _checked(value, ENV_VAR)
    raise AuthError(f"no cluster token: pass --token or --token-file, or set {ENV_VAR}")


def _warn_if_shared(path: Path) -> None:
    """Warn when other users may read (or write) the token file, as ssh does for keys."""
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("--token-file %s has mode %s: other users can read or change the cluster token; "
                    "chmod 600 %s", path, oct(mode & 0o777), path)


def _checked(token: str, where: str) -> str:
    """A token must fit in an HTTP header: printable ASCII, no spaces."""
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise AuthError(f"{where}: the token must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        log.warning("%s: a token of %d characters is easy to guess; use %d or more "
                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                    where, len(token), MIN_TOKEN_CHARS)
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_bearer(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer TOKEN` header value."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode("utf-8", "surrogateescape"),
                               token.encode())


def _mac(token: str, role: bytes, run_id: int, first: bytes, second: bytes) -> bytes:
    msg = b"mdi-data-plane|" + role + b"|" + str(run_id).encode() + b"|" + first + b"|" + second
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                    run_id: int, timeout: float) -> None:
    """Listening side: raise AuthError unless the peer proves the token for run_id;
    then prove it back on the peer's nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    await write_frame(writer, Frame(Kind.CHALLENGE, run_id, tensor=_bytes_tensor(nonce)))
    reply = await bounded(read_frame(reader, None), timeout)
    if reply.kind != Kind.AUTH or reply.tensor is None:
        raise AuthError(f"expected AUTH, got {reply.kind.name}")
    if reply.run_id != run_id:
        raise AuthError(f"handshake for run {reply.run_id}, the current run is {run_id}")
    body = bytes(reply.tensor.numpy())
    mac, peer_nonce = body[:32], body[32:]
    if len(peer_nonce) != NONCE_BYTES or not hmac.compare_digest(
            mac, _mac(token, b"connector", run_id, nonce, peer_nonce)):
        raise AuthError("data-plane handshake failed: wrong token")
    proof = _mac(token, b"listener", run_id, peer_nonce, nonce)
    await write_frame(writer, Frame(Kind.AUTH, run_id, tensor=_bytes_tensor(proof)))


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                 run_id: int, timeout: float) -> None:
    """Connecting side: answer the listener's challenge with a nonce of our own, and
    raise AuthError unless the listener proves the token on it (before any data
    goes out on the link)."""
    ch = await bounded(read_frame(reader, None), timeout)
    if ch.kind != Kind.CHALLENGE or ch.tensor is None:
        raise WireError(f"expected CHALLENGE, got {ch.kind.name}")
    theirs, ours = bytes(ch.tensor.numpy()), secrets.token_bytes(NONCE_BYTES)
    mac = _mac(token, b"connector", run_id, theirs, ours)
    await write_frame(writer, Frame(Kind.AUTH, run_id, tensor=_bytes_tensor(mac + ours)))
    try:
        proof = await bounded(read_frame(reader, None), timeout)
    except EOFError:
        raise AuthError("the listener closed the link during the handshake (it refused our "
                        "token, or it is not a node of this cluster)") from None
    if proof.kind != Kind.AUTH or proof.tensor is None or proof.run_id != run_id:
        raise AuthError(f"the listener did not prove the cluster token (sent {proof.kind.name} "
                        f"for run {proof.run_id})")
    if not hmac.compare_digest(bytes(proof.tensor.numpy()),
                               _mac(token, b"listener", run_id, ours, theirs)):
        raise AuthError("the listener did not prove the cluster token: it is not a node of "
                        "this cluster (wrong token), refusing to send it data")
