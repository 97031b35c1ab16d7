"""Giving a paged KV cache's memory back to the OS when a row's sequence ends.

A paged cache (cache.py, `mapped_zeros`) takes memory page by page as rows write
positions; without this, a row's pages stayed held after its sequence ended until
the lane's cache was dropped, so a server's caches only grew towards
`--max-seqs` x context. `drop_pages(t)` tells the OS that the whole pages inside
a contiguous tensor's bytes are not needed (madvise MADV_DONTNEED): it frees them
and they read as zeros again (finite, as attention needs of the positions it
masks). The partial pages at either end keep what they held: stale values a row
never reads (it reads only the positions written since its admission).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    except (OSError, AttributeError):  # no madvise to call: pages stay held until the cache goes
        _libc = None


def drop_pages(t: torch.Tensor) -> int:
    """Free the whole pages of a contiguous CPU tensor that lies in a private anonymous
    mapping (a paged cache's rows); returns the bytes given back (0 where nothing
    could be: no madvise, a tensor smaller than a page)."""
    if _libc is None or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    if _libc.madvise(first, last - first, _MADV_DONTNEED) != 0:
        log.debug("madvise(DONTNEED) refused: errno %d", ctypes.get_errno())
        return 0
    return last - first


def resident_bytes(t: torch.Tensor) -> int | None:
    """Bytes of the pages under a contiguous CPU tensor's bytes that the OS holds in
    memory (mincore): of a paged cache, the pages its rows have written and not
    given back. None where that cannot be asked (no mincore, another device)."""
    if _libc is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    n = -(-(end - start) // page)
    vec = ctypes.create_string_buffer(n)
    if _libc.mincore(start, n * page, vec) != 0:
        log.debug("mincore refused: errno %d", ctypes.get_errno())
        return None
    return (n - vec.raw.count(0)) * page  # a byte a page, bit 0 set when resident
