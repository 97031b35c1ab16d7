"""The cluster's shared secret: where it comes from and how peers prove it.

Control plane: every request but /health carries `Authorization: Bearer TOKEN`,
compared in constant time. Data plane: the listening side sends a random nonce
(CHALLENGE); the connecting side answers HMAC-SHA256(token, context || nonce)
(AUTH), where the context binds the run id. A stranger who reaches a data port
without the token cannot get a frame accepted. Traffic is not encrypted.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import torch

from .wire import Frame, Kind, WireError, read_frame, write_frame

ENV_VAR = "MDI_TOKEN"
NONCE_BYTES = 32


class AuthError(ValueError):
    """A missing or wrong secret."""


def resolve_token(token: str | None = None, token_file: str | None = None) -> str:
    """--token, else --token-file, else $MDI_TOKEN; error when none is given."""
    if token:
        return token
    if token_file:
        try:
            value = Path(token_file).read_text().strip()
        except OSError as e:
            raise AuthError(f"cannot read --token-file {token_file}: {e}") from None
        if not value:
            raise AuthError(f"--token-file {token_file} is empty")
        return value
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return value
    raise AuthError(f"no cluster token: pass --token or --token-file, or set {ENV_VAR}")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_bearer(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].encode(), token.encode())


def _mac(token: str, run_id: int, nonce: bytes) -> bytes:
    msg = b"mdi-data-plane|" + str(run_id).encode() + b"|" + nonce
    return hmac.new(token.encode(), msg, hashlib.sha256).digest()


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                    run_id: int, timeout: float) -> None:
    """Listening side: raise AuthError unless the peer proves the token for run_id."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    await write_frame(writer, Frame(Kind.CHALLENGE, run_id, tensor=_bytes_tensor(nonce)))
    reply = await asyncio.wait_for(read_frame(reader, None), timeout)
    if reply.kind != Kind.AUTH or reply.tensor is None:
        raise AuthError(f"expected AUTH, got {reply.kind.name}")
    if reply.run_id != run_id:
        raise AuthError(f"handshake for run {reply.run_id}, the current run is {run_id}")
    if not hmac.compare_digest(bytes(reply.tensor.numpy()), _mac(token, run_id, nonce)):
        raise AuthError("data-plane handshake failed: wrong token")


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                 run_id: int, timeout: float) -> None:
    """Connecting side: answer the listener's challenge."""
    ch = await asyncio.wait_for(read_frame(reader, None), timeout)
    if ch.kind != Kind.CHALLENGE or ch.tensor is None:
        raise WireError(f"expected CHALLENGE, got {ch.kind.name}")
    mac = _mac(token, run_id, bytes(ch.tensor.numpy()))
    await write_frame(writer, Frame(Kind.AUTH, run_id, tensor=_bytes_tensor(mac)))
