"""Per-sample KV cache, its memory taken as the positions in use grow.

One cache serves a group of samples (a micro-batch): row b holds sample b's keys
and values for every layer of a stage. Rows are independent; a sample can be
reset and re-filled without touching its neighbours.
"""
from __future__ import annotations

import mmap
import sys

import torch

from .pages import drop_pages, resident_bytes

# Positions a run keeps when --max-context is not given: a model's whole
# block_size up to this (GPT-2's 1024 and TinyLlama's 2048 are kept whole),
# never SmolLM2's 8192 (377 MB of fp32 cache per sequence) by default.
DEFAULT_MAX_CONTEXT = 2048
# A cache grows by this many positions at a time (at least; it doubles): 256 positions
# of SmolLM2 are 12 MB of float32 cache per sequence, its 2048 are 94 MB.
GROW_BY = 256


def context_length(block_size: int, max_context: int | None = None) -> int:
    """Positions a run keeps (its KV cache's length, its window's size):
    min(block_size, max_context), max_context defaulting to DEFAULT_MAX_CONTEXT."""
    cap = DEFAULT_MAX_CONTEXT if max_context is None else max_context
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
    return min(block_size, cap)


# Linux's MAP_NORESERVE (Python < 3.13 does not name it): the mapping's size is
# not charged against the commit limit up front, only the pages written are.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU tensor of zeros over a fresh anonymous mapping, or None where none can be
    made (no mmap flags, as on Windows; an empty shape; a refused mapping).

    The OS gives such a mapping's pages, zero-filled, only when they are first
    written (reading an unwritten page reads the shared zero page), so a buffer of
    a whole context holds only the memory of the positions its rows have written,
    page by page, and never needs to grow. Huge pages are turned off for it: one
    2 MB page would commit the positions of many rows at the first write.
    """
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    try:
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    except (AttributeError, OSError, ValueError, OverflowError):
        return None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            m.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: nothing to turn off
            pass
    # the tensor holds the mapping (the buffer's export) until its storage goes
    return torch.frombuffer(m, dtype=dtype).view(shape)


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries as attention reads them: a narrower cache (--kv-dtype) is read
    back in the compute dtype (an int8 one, cache_int8.QuantizedKV, dequantized); a
    cache in the compute dtype is read as it is."""
    if t.dtype == dtype:
        return t
    return t.dequantize(dtype) if t.dtype == torch.int8 else t.to(dtype)


def grown_buffer(old: torch.Tensor, grown: int) -> torch.Tensor:
    """old (2, B, nh, T, x) with T grown to `grown` positions: what the rows hold, then
    zeros (finite: a masked position's value still enters attention's sums, times 0).
    Empty + two writes, not zeros + copy: 3-7x faster (a stage of SmolLM2, 8 rows,
    1024 -> 2048: ~150 ms, not 0.4-1 s)."""
    n = old.shape[3]
    new = old.new_empty((*old.shape[:3], grown, old.shape[4]))
    new[:, :, :, :n] = old
    new[:, :, :, n:].zero_()
    return new


class KVCache:
    """Keys and values of a stage, one buffer per layer: (2, B, nh, T, hs), keys at
    [0] and values at [1], so a step writes both with one copy. `k[layer]` and
    `v[layer]` are views of it, (B, nh, T, hs).

    A short conversation must not hold a whole context of cache per sequence. On
    the CPU (paged=True, the default) each buffer is max_len positions of a
    mapping whose pages the OS commits as the rows first write them
    (`mapped_zeros`): memory follows each row's own positions (a page holds 16
    positions of a float32 head of 64), and nothing is ever grown or copied. A
    growth was a stall of the lane's step: every layer of the stage copied at once,
    all of the lane's rows for one long sequence (0.4-0.5 s for 8 SmolLM2 rows on 18
    layers from 1024 to 2048 positions, the ~1 s gaps of the streams beside a
    long prompt). Elsewhere (another device, paged=False, a mapping refused), the
    buffers grow with use: T starts at min(max_len, grow_by) positions and doubles
    (in whole grow_by blocks, at most max_len) when a step reaches past it
    (`reserve`); grow_by=None allocates max_len at once. `max_len` is what a row
    can reach; `nbytes()` counts that, the memory a run must plan for;
    `allocated_nbytes()` the buffers' size now (of a paged cache, its address
    space: the memory held is the pages written). A paged cache gives a row's pages
    back when its sequence ends (`release`); growing buffers hold everything until
    the cache is dropped.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 grow_by: int | None = GROW_BY, paged: bool = True) -> None:
        if grow_by is not None and grow_by < 1:
            raise ValueError(f"grow_by must be a positive number of positions, got {grow_by}")
        self.max_len = max_len
        self.grow_by = grow_by
        self.kv = []
        if paged and torch.device(device).type == "cpu":
            whole = (2, batch, n_head, max_len, head_size)
            for _ in range(n_layer):
                buf = mapped_zeros(whole, dtype)
                if buf is None:  # no such mapping here: the growing buffers below
                    self.kv = []
                    break
                self.kv.append(buf)
        self.paged = bool(self.kv)
        if not self.paged:
            length = max_len if grow_by is None else min(max_len, grow_by)
            shape = (2, batch, n_head, length, head_size)  # (k|v, B, nh, T, hs)
            self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self._bind()

    def _bind(self) -> None:
        self.k = [b[0] for b in self.kv]
        self.v = [b[1] for b in self.kv]

    @property
    def batch(self) -> int:
        return self.kv[0].shape[1] if self.kv else 0

    @property
    def allocated(self) -> int:
        """Positions the buffers hold now (<= max_len)."""
        return self.kv[0].shape[3] if self.kv else self.max_len

    def reserve(self, length: int) -> None:
        """Make positions [0, length) writable: grow every layer's buffer if needed."""
        if length <= self.allocated:
            return
        grown = self._grown_length(length)
        for i, old in enumerate(self.kv):
            new = grown_buffer(old, grown)
            # the layer's views move too, so the old buffer goes now: views kept to the
            # end of the loop held the whole old cache beside the new one (16 SmolLM2
            # rows in bfloat16 from 256 to 512 positions: 94 MB more at that step)
            self.kv[i], self.k[i], self.v[i] = new, new[0], new[1]
            del old, new

    def _grown_length(self, length: int) -> int:
        """The allocation that holds positions [0, length): doubled, in whole grow_by blocks."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the cache's {self.max_len} positions")
        step = self.grow_by or self.max_len
        return min(self.max_len, -(-max(length, 2 * self.allocated) // step) * step)

    def rows(self, start: int, stop: int) -> "CacheRows":
        """A cache over rows [start, stop) that shares storage with this one."""
        return CacheRows(self, start, stop)

    def store(self, layer: int, index: tuple, kv: torch.Tensor) -> None:
        """Write kv at `index` of the layer's buffer (2, B, nh, T, hs) (e.g. packed
        tokens' rows and positions), in the cache's dtype."""
        buf = self.kv[layer]
        buf[index] = kv.to(buf.dtype)

    def update(self, layer: int, input_pos: torch.Tensor, kv: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv (2, B, nh, T, hs) (keys, then values) at input_pos (B, T) in one
        copy; return the layer's key and value buffers (B, nh, allocated, hs). The
        positions must have been reserved (the model's forward does it once).

        start: every row's positions are start..start+T-1 (the caller knows it
        once per forward), so a slice copy does instead of a scatter.
        """
        buf = self.kv[layer]
        if kv.dtype != buf.dtype:  # a narrower cache (--kv-dtype): rounded as it is stored
            kv = kv.to(buf.dtype)
        if start is not None:
            buf[:, :, :, start:start + kv.shape[3]] = kv
        else:
            idx = input_pos[None, :, None, :, None].expand(2, -1, kv.shape[2], -1, kv.shape[4])
            buf.scatter_(3, idx, kv)
        return self.k[layer], self.v[layer]

    def release(self, row: int) -> int:
        """Row `row`'s sequence ended: give its pages back to the OS (a paged cache;
        the row reads as zeros again). Returns the bytes of the whole pages given back
        (advised: pages the row never wrote count too); 0 for growing buffers, which
        are held whole until the cache goes."""
        if not self.paged:
            return 0
        return sum(drop_pages(buf[i, row]) for buf in self.kv for i in range(buf.shape[0]))

    def nbytes(self) -> int:
        """Bytes of the buffers grown to max_len: what a run's rows can reach."""
        return sum(t[:, :, :, :1].numel() * t.element_size() for t in self.kv) * self.max_len

    def allocated_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the cache allocated (what nbytes() counts)."""
        return list(self.kv)

    def unwritten_nbytes(self) -> int:
        """Of nbytes(), what the OS does not hold: a paged cache's pages no row has
        written (or given back), 0 for growing buffers or where it cannot be told. A
        node's memory budget counts a run's planned bytes as its own, less these:
        free memory already includes them. A page only read (attention reads a short
        row's positions up to its lane's longest) maps the OS's shared zero page,
        which mincore reports as held: the figure errs towards held, by those."""
        if not self.paged:
            return 0
        unwritten = 0
        for t in self.buffers():
            held = resident_bytes(t)
            if held is None:
                return 0
            unwritten += max(0, t.numel() * t.element_size() - held)
        return unwritten


class CacheRows(KVCache):
    """Rows [start, stop) of a KVCache, sharing its storage; growth goes to the
    whole cache (every row of a lane grows together) and the views follow it."""

    def __init__(self, whole: KVCache, start: int, stop: int) -> None:  # noqa: D107
        self.whole, self.span = whole, (start, stop)
        self.max_len, self.grow_by, self.paged = whole.max_len, whole.grow_by, whole.paged
        self._follow()

    def _follow(self) -> None:
        start, stop = self.span
        self.kv = [b[:, start:stop] for b in self.whole.kv]
        self._bind()

    def reserve(self, length: int) -> None:
        if length > self.allocated:
            self.kv, self.k, self.v = [], [], []  # not keeping the old buffers through it
            try:
                self.whole.reserve(length)
            finally:
                self._follow()

    def rows(self, start: int, stop: int) -> "CacheRows":
        base = self.span[0]
        return type(self)(self.whole, base + start, base + stop)
