"""An int8 KV cache (`--kv-dtype int8`): a quarter of a float32 cache's bytes.

Each key and value vector (one position of one head, head_size numbers) is
stored as int8 with its own float32 scale, symmetric and rounded to nearest
(`q = round(x / s)`, `s = max|x| / 127`), as it is written; attention reads it
back in the compute dtype (`q * s`) for the positions it attends to. Per
(position, head) scales cost 4 bytes per head_size bytes (1/16 more at 64) and
keep a token's numbers independent of every other token's: a position's stored
values depend on that position's vector alone, so a ring computes the same
cache as one device, and a cache that grows holds what a whole one holds.

The buffers mirror KVCache's: `kv[layer]` int8 (2, B, nkv, T, hs) and
`sc[layer]` float32 (2, B, nkv, T, 1), grown together. `k[layer]` and
`v[layer]` are `QuantizedKV` views of both, which slice like tensors and are
dequantized by `cache.in_dtype` (what attention calls on what it reads).
"""
from __future__ import annotations

import torch

from .cache import GROW_BY, CacheRows, KVCache, grown_buffer, mapped_zeros
from .pages import drop_pages


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hs) float -> q int8 (..., hs), scale float32 (..., 1): per vector."""
    x = x.float()
    s = x.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.round(x / s.clamp(min=1e-30)).to(torch.int8)  # |x / s| <= 127; a zero vector: 0
    return q, s


class QuantizedKV:
    """int8 q (..., T, hs) and its scales (..., T, 1) as one tensor-like view: slicing
    and index_select apply to both; `dequantize` gives the numbers."""

    dtype = torch.int8

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:  # noqa: D107
        self.q, self.scale = q, scale

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def __getitem__(self, index) -> "QuantizedKV":
        return QuantizedKV(self.q[index], self.scale[index])

    def index_select(self, dim: int, index: torch.Tensor) -> "QuantizedKV":
        return QuantizedKV(self.q.index_select(dim, index), self.scale.index_select(dim, index))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        y = torch.mul(self.q, self.scale)  # int8 x float32 -> float32, one pass
        return y if y.dtype == dtype else y.to(dtype)


class Int8KVCache(KVCache):
    """A KVCache whose entries are int8 with a float32 scale per (position, head)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype = torch.int8, device: torch.device | str = "cpu",
                 grow_by: int | None = GROW_BY, paged: bool = True) -> None:
        assert dtype == torch.int8, dtype
        self.sc: list[torch.Tensor] = []
        super().__init__(n_layer, batch, n_head, max_len, head_size, dtype, device, grow_by,
                         paged)
        sc = [mapped_zeros((*b.shape[:4], 1), torch.float32) if self.paged else None
              for b in self.kv]  # paged as the values are: memory follows the positions
        self.sc = [s if s is not None else
                   torch.zeros((*b.shape[:4], 1), dtype=torch.float32, device=b.device)
                   for s, b in zip(sc, self.kv)]
        self._bind()

    def release(self, row: int) -> int:
        if not self.paged:
            return 0
        return super().release(row) + sum(drop_pages(s[i, row]) for s in self.sc
                                          for i in range(s.shape[0]))

    def _bind(self) -> None:
        if len(self.sc) != len(self.kv):  # during __init__, before the scales exist
            self.k, self.v = [], []
            return
        self.k = [QuantizedKV(b[0], s[0]) for b, s in zip(self.kv, self.sc)]
        self.v = [QuantizedKV(b[1], s[1]) for b, s in zip(self.kv, self.sc)]

    def reserve(self, length: int) -> None:
        if length <= self.allocated:
            return
        grown = self._grown_length(length)
        for i in range(len(self.kv)):
            # the layer's views go with its old buffers, as in KVCache.reserve: views kept
            # to the end held the whole old cache beside the new one
            self.kv[i] = grown_buffer(self.kv[i], grown)
            self.sc[i] = grown_buffer(self.sc[i], grown)
            self.k[i] = QuantizedKV(self.kv[i][0], self.sc[i][0])
            self.v[i] = QuantizedKV(self.kv[i][1], self.sc[i][1])

    def rows(self, start: int, stop: int) -> "Int8CacheRows":
        return Int8CacheRows(self, start, stop)

    def store(self, layer: int, index: tuple, kv: torch.Tensor) -> None:
        q, s = quantize_vectors(kv)
        self.kv[layer][index] = q
        self.sc[layer][index] = s

    def update(self, layer: int, input_pos: torch.Tensor, kv: torch.Tensor,
               start: int | None = None) -> tuple[QuantizedKV, QuantizedKV]:
        """KVCache.update, quantizing kv (2, B, nh, T, hs) per vector as it is stored."""
        q, s = quantize_vectors(kv)
        buf, sc = self.kv[layer], self.sc[layer]
        if start is not None:
            buf[:, :, :, start:start + kv.shape[3]] = q
            sc[:, :, :, start:start + kv.shape[3]] = s
        else:
            idx = input_pos[None, :, None, :, None].expand(2, -1, kv.shape[2], -1, 1)
            buf.scatter_(3, idx.expand(-1, -1, -1, -1, kv.shape[4]), q)
            sc.scatter_(3, idx, s)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        per_position = sum(b[:, :, :, :1].numel() + 4 * s[:, :, :, :1].numel()
                           for b, s in zip(self.kv, self.sc))
        return per_position * self.max_len

    def allocated_nbytes(self) -> int:
        return super().allocated_nbytes() + sum(s.numel() * 4 for s in self.sc)

    def buffers(self) -> list[torch.Tensor]:
        return [*self.kv, *self.sc]


class Int8CacheRows(CacheRows, Int8KVCache):
    """Rows [start, stop) of an Int8KVCache (CacheRows: views that follow growth)."""

    def _follow(self) -> None:
        start, stop = self.span
        self.kv = [b[:, start:stop] for b in self.whole.kv]
        self.sc = [s[:, start:stop] for s in self.whole.sc]
        self._bind()

    def reserve(self, length: int) -> None:
        if length > self.allocated:
            self.sc = []  # not keeping the old scales through the growth either
        CacheRows.reserve(self, length)


def make_cache(n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               grow_by: int | None = GROW_BY) -> KVCache:
    """A KVCache storing `dtype`: an Int8KVCache for torch.int8, else a plain one."""
    cls = Int8KVCache if dtype == torch.int8 else KVCache
    return cls(n_layer, batch, n_head, max_len, head_size, dtype, device, grow_by)
