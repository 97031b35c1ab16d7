"""What every HTTP port of ours shares for its logs: peer-controlled strings
escaped before they are logged, and a rate limit on the network-facing loggers'
warnings (node control planes and `mdi serve`)."""
from __future__ import annotations

import logging
import threading
import time


def printable(text: str, limit: int = 200) -> str:
    """A peer-controlled string as one safe log token: control and non-ASCII characters
    escaped (a newline becomes \\n), at most `limit` characters."""
    out = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


class LogLimiter(logging.Filter):
    """At most `per_second` warnings a second from each of the node's network-facing loggers.

    Each logger has its own budget, so a flood of refused HTTP requests cannot hide
    the data plane's warnings. Dropped lines are counted; the next line let through
    says how many. Errors and info lines always pass.
    """
    LOGGERS = ("mdi.ring.node.control_app", "mdi.ring.node.process", "mdi.net.http_guard", "mdi.ring.node.runtime",
               "mdi.ring.node.data_plane", "uvicorn.error")
    _installed: "LogLimiter | None" = None

    def __init__(self, per_second: int = 20) -> None:
        super().__init__()
        self.per_second = per_second
        self.window: dict[str, float] = {}    # logger name -> start of its current second
        self.count: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        name = record.name
        with self.lock:
            now = time.monotonic()
            if now - self.window.get(name, 0.0) >= 1.0:
                self.window[name], self.count[name] = now, 0
            if self.count[name] >= self.per_second:
                self.dropped[name] = self.dropped.get(name, 0) + 1
                return False
            self.count[name] += 1
            dropped = self.dropped.pop(name, 0)
            if dropped:
                record.msg = f"{record.msg} [{dropped} warnings not logged: more than " \
                             f"{self.per_second} a second]"
        return True

    @classmethod
    def install(cls, per_second: int = 20) -> "LogLimiter":
        """Attach one limiter to LOGGERS (once per process)."""
        if cls._installed is None:
            cls._installed = cls(per_second)
            for name in cls.LOGGERS:
                logging.getLogger(name).addFilter(cls._installed)
        return cls._installed


class QueryRedactor(logging.Filter):
    """Drops the query string from uvicorn's access-log lines: a credential sent as
    `?api_key=...` (which the API refuses) must not land in the log."""

    _installed: "QueryRedactor | None" = None

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query not logged]", *args[3:])
        return True

    @classmethod
    def install(cls) -> "QueryRedactor":
        if cls._installed is None:
            cls._installed = cls()
            logging.getLogger("uvicorn.access").addFilter(cls._installed)
        return cls._installed
