"""Large allocations straight from the OS while a stage loads (glibc only).

Loading frees as much as it keeps: every float tensor read, quantized and
dropped, every piece of a weights stream. glibc's malloc serves blocks under
its mmap threshold from the heap, and the threshold rises (up to 32 MB) each
time a mapped block is freed; so after the first tensor, a load's float
tensors and its int8 results share the heap, the holes left by freed float
tensors are too small for the next one, and the heap grows. Measured on the
GPT-2-small shape, an int8 load then peaked 0.5 GB above the runtime for
0.125 GB of weights. With blocks of 1 MB and more mapped (and unmapped when
freed), the peak is the int8 stage plus one float tensor.

After loading the threshold is left at glibc's own ceiling (32 MB): what a
long-running process reaches anyway, so compute allocations behave as before,
and the heap's free pages are given back (malloc_trim). Elsewhere (macOS, musl)
this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
WHILE_LOADING = 1 << 20
AFTER = 32 << 20       # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems

_lock = threading.Lock()
_depth = 0


def _libc(name: str):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None


_MALLOPT = _libc("mallopt")
_MALLOC_TRIM = _libc("malloc_trim")


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0)). malloc keeps
    what a phase freed for later use; after a load or a tokenizer's build that is tens
    of MB (their Python and Rust temporaries) that this process would hold for good."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def mapped_allocations() -> Iterator[None]:
    """Blocks of 1 MB or more are mapped (and returned when freed) inside; nests."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1 and _MALLOPT is not None:
            _MALLOPT(M_MMAP_THRESHOLD, WHILE_LOADING)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _MALLOPT is not None:
                _MALLOPT(M_MMAP_THRESHOLD, AFTER)
            if _depth == 0:
                release_free_memory()
