"""Replays hostile and careless clients against a running `mdi serve` (issue 25) and
prints what happened, one line per case:

    python -m mdi.bench.abuse --url http://127.0.0.1:8000 [--api-key KEY] [--stall]

Loopback only: it opens a hundred and more sockets and sends megabytes, which is an
attack anywhere else. Each case says what a guarded server answers and what this one
did; the exit status is 1 when a case did not hold.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import httpx

ANSWER_S = 2.0     # /health and a completion must answer within this while under attack
# the headers of a body that then comes a byte at a time
SLOW_BODY = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100000\r\n\r\n{")


@dataclass
class Case:
    name: str
    expected: str
    got: str = ""
    seconds: float = 0.0
    held: bool = False


class Target:
    def __init__(self, url: str, api_key: str | None, model: str | None) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname or "", parts.port or 80
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model or httpx.get(self.url + "/v1/models", headers=self.headers,
                                        timeout=10).json()["data"][0]["id"]

    def post(self, body: dict | bytes, path: str = "/v1/completions", timeout: float = 30,
             **kw) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **self.headers, **kw.pop("headers", {})}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout, **kw)

    def sock(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=5)


def timed(fn: Callable[[], httpx.Response]) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        r = fn()
        return f"{r.status_code} {_code(r)}".strip(), time.monotonic() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, time.monotonic() - t0


def _code(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["code"] or ""
    except (ValueError, KeyError, TypeError):
        return ""


def under_attack(t: Target, socks: list[socket.socket], feed: Callable[[socket.socket], None]) -> Case:
    """/health and a completion while `socks` misbehave (fed by a thread every 0.5 s)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.5):
            for s in socks:
                try:
                    feed(s)
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        h, hs = timed(lambda: httpx.get(t.url + "/health", timeout=ANSWER_S + 1))
        c, cs = timed(lambda: t.post({"model": t.model, "prompt": "Hi", "max_tokens": 2},
                                     timeout=ANSWER_S + 1))
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()
    return Case("", "", f"health {h}, completion {c}", max(hs, cs),
                h.startswith("200") and c.startswith("200") and max(hs, cs) < ANSWER_S)


def open_socks(t: Target, n: int, first: bytes) -> list[socket.socket]:
    """Up to n connections that have sent `first` (fewer when the server refuses more)."""
    socks = []
    for _ in range(n):
        try:
            s = t.sock()
            s.sendall(first)
            socks.append(s)
        except OSError:
            break
    return socks


def slow_bodies(t: Target, n: int) -> Case:
    case = under_attack(t, open_socks(t, n, SLOW_BODY), lambda s: s.send(b" "))
    case.name, case.expected = f"{n} slow-body sockets", f"/health and a completion < {ANSWER_S:g} s"
    return case


def slow_headers(t: Target, n: int) -> Case:
    case = under_attack(t, open_socks(t, n, b"GET /health HTTP/1.1\r\n"), lambda s: s.send(b"X-a: b\r\n"))
    case.name, case.expected = f"{n} slow-header sockets", f"/health and a completion < {ANSWER_S:g} s"
    return case


def large_body(t: Target) -> Case:
    """A 7.8 MB prompt of 3.9 M token ids while a stream runs: the stream's longest pause."""
    body = json.dumps({"model": t.model, "prompt": [1] * 3_900_000}, separators=(",", ":")).encode()
    with StreamGaps(t.url, t.model, t.headers) as gaps:
        time.sleep(0.3)
        got, s = timed(lambda: t.post(body))
    pause = max(gaps[1:], default=0.0)
    return Case("7.8 MB token-id prompt", "413/400, streams pause < 0.5 s",
                f"{got}, longest stream pause {pause:.2f} s", s,
                got[:3] in ("400", "413") and pause < 0.5)


class StreamGaps(list):
    """`with StreamGaps(url, model) as gaps:` a streamed completion runs meanwhile, in a
    thread; `gaps` holds the seconds between its lines (its pauses)."""

    def __init__(self, url: str, model: str, headers: dict | None = None, max_tokens: int = 60) -> None:
        super().__init__()
        self.args = (url, model, headers or {}, max_tokens)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        url, model, headers, max_tokens = self.args
        with httpx.stream("POST", url + "/v1/completions", headers=headers, timeout=60,
                          json={"model": model, "prompt": "Hi", "max_tokens": max_tokens,
                                "stream": True}) as r:
            last = time.monotonic()
            for _ in r.iter_lines():
                now = time.monotonic()
                self.append(now - last)
                last = now

    def __enter__(self) -> "StreamGaps":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


def refusals(t: Target) -> list[Case]:
    """Requests a careful server refuses with a JSON 4xx: (name, request, expected status, code)."""
    long = "A" * 3000 + " To be or not to be"
    cases = [
        ("prompt past the context", {"model": t.model, "prompt": long * 20}, "400", "context_length_exceeded"),
        ("max_tokens 2**70", {"model": t.model, "prompt": "Hi", "max_tokens": 2 ** 70}, "400",
         "context_length_exceeded"),
        ('max_tokens "5"', {"model": t.model, "prompt": "Hi", "max_tokens": "5"}, "400", "invalid_value"),
        ("max_tokens true", {"model": t.model, "prompt": "Hi", "max_tokens": True}, "400", "invalid_value"),
        ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "400", ""),
        ("token id outside vocab", {"model": t.model, "prompt": [10 ** 9]}, "400", ""),
    ]
    out = []
    for name, body, status, code in cases:
        got, s = timed(lambda: t.post(body))
        out.append(Case(name, f"{status} {code}".strip(), got, s, got == f"{status} {code}".strip()))
    got, s = timed(lambda: t.post({"model": t.model, "prompt": "Hi"},
                                  headers={"content-type": "text/plain"}))
    out.append(Case("text/plain POST (cross-site)", "415", got, s, got.startswith("415")))
    got, s = timed(lambda: t.post({"model": t.model, "prompt": "Hi"}, params={"api_key": "x"}))
    out.append(Case("?api_key= in the URL", "401", got, s, got.startswith("401")))
    got, s = timed(lambda: t.post({"model": "gpt-4o-mini", "prompt": "Hi", "max_tokens": 2}))
    out.append(Case("another model's name", "200 (404 with --strict-model-name)", got, s,
                    got[:3] in ("200", "404")))
    return out


def stalled_streams(t: Target, n: int, stall_s: float) -> Case:
    """n streams that never read, each asking for all the context allows: a completion
    must still answer, at the latest once the stall timeout has cancelled them (counted
    in mdi_stalled_sequences_cancelled) or they ended (into the socket buffers)."""
    before = _stalled(t)
    socks = never_reading(t, n)
    time.sleep(0.5)
    got, secs = timed(lambda: t.post({"model": t.model, "prompt": "Hi", "max_tokens": 2},
                                     timeout=stall_s + 8))
    cancelled = _stalled(t) - before
    for sock in socks:
        sock.close()
    return Case(f"{n} streams never read", f"a completion within {stall_s:g} + 8 s",
                f"{got} ({cancelled} cancelled as stalled)", secs,
                got.startswith("200") and secs < stall_s + 8)


def never_reading(t: Target, n: int) -> list[socket.socket]:
    """n streaming completions, each asking for all the context allows, whose answers are
    never read (a small receive buffer: they stall at once)."""
    probe = t.post({"model": t.model, "prompt": "Hi", "max_tokens": 10 ** 9}).json()
    m = re.search(r"maximum context length is (\d+)", probe.get("error", {}).get("message", ""))
    max_tokens = int(m.group(1)) - 8 if m else 100_000
    body = json.dumps({"model": t.model, "prompt": "Hi", "max_tokens": max_tokens, "stream": True})
    auth = "".join(f"{k}: {v}\r\n" for k, v in t.headers.items())
    socks = []
    for _ in range(n):
        s = t.sock()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"{auth}Content-Length: {len(body)}\r\n\r\n{body}").encode())
        socks.append(s)
    return socks


class Attack:
    """While in its `with` block: `slow` sockets sending a 100,000-byte body one byte each
    0.5 s, and `non_reading` streams that are never read (serve-bench --attack). The
    attacker is a process of its own (`python -m mdi.bench.abuse --hold`), as a real one
    is: it does not take the measuring clients' interpreter lock, only the machine's cores."""

    def __init__(self, url: str, api_key: str | None, model: str, slow: int = 140,
                 non_reading: int = 16) -> None:
        check_loopback(urlsplit(url).hostname or "")
        self.argv = [sys.executable, "-m", "mdi.bench.abuse", "--url", url, "--model", model,
                     "--hold", "--sockets", str(slow), "--unread", str(non_reading)]
        self.env = {**os.environ, "MDI_API_KEY": api_key or ""}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Attack":
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # once its sockets are open and its streams stall
        if line.strip() != "holding":
            self.__exit__()
            raise RuntimeError(f"the attacker did not start (exit status {self.proc.returncode})")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its signal to let go
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hold(t: Target, slow: int, non_reading: int, until: Callable[[], None]) -> None:
    """The attack of `Attack`, in this process, until `until` returns."""
    trickle = open_socks(t, slow, SLOW_BODY)
    stop = threading.Event()

    def feed() -> None:  # a socket the guard closed is opened again: the attack holds
        while not stop.wait(0.5):
            for i, s in enumerate(trickle):
                try:
                    s.send(b" ")
                except OSError:
                    s.close()
                    trickle[i:i + 1] = open_socks(t, 1, SLOW_BODY) or [s]

    unread: list[socket.socket] = []
    thread = threading.Thread(target=feed, daemon=True, name="attack")
    try:
        unread = never_reading(t, non_reading)
        thread.start()
        time.sleep(1.0)  # the never-read streams are admitted and stall
        until()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        for s in trickle + unread:
            s.close()


def _stalled(t: Target) -> int:
    text = httpx.get(t.url + "/metrics", timeout=10).text
    m = re.search(r"^mdi_stalled_sequences_cancelled ([0-9.e+]+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def check_loopback(host: str) -> None:
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        raise SystemExit(f"cannot resolve {host}: {e}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise SystemExit(f"{host} is not a loopback address: this script attacks what it is "
                         "pointed at, so it only runs against this machine")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi.bench.abuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a running mdi serve on this machine")
    p.add_argument("--api-key", default=os.environ.get("MDI_API_KEY"))
    p.add_argument("--model", default=None, help="model id (default: the server's)")
    p.add_argument("--sockets", type=int, default=140, help="slow sockets per attack (default 140)")
    p.add_argument("--hold", action="store_true",
                   help="only attack (--sockets slow bodies, --unread never-read streams), from "
                        "printing 'holding' until standard input closes (serve-bench --attack)")
    p.add_argument("--unread", type=int, default=16, help="with --hold: never-read streams")
    p.add_argument("--stall", type=float, default=None, metavar="S",
                   help="also run 16 never-reading streams, waiting up to S + 30 s for the "
                        "server's --stall-timeout S")
    args = p.parse_args(argv)
    t = Target(args.url, args.api_key, args.model)
    check_loopback(t.host)
    if args.hold:
        hold(t, args.sockets, args.unread, lambda: (print("holding", flush=True), sys.stdin.read()))
        return 0
    cases = [slow_bodies(t, args.sockets), slow_headers(t, args.sockets), large_body(t), *refusals(t)]
    if args.stall is not None:
        cases.append(stalled_streams(t, 16, args.stall))
    print(f"{'case':<30} {'expected':<36} {'got':<44} {'s':>6}  held")
    for c in cases:
        print(f"{c.name:<30} {c.expected:<36} {c.got:<44} {c.seconds:>6.2f}  {'yes' if c.held else 'NO'}")
    return 0 if all(c.held for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
