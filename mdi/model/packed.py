"""Several sequences' prefills as one cached forward: their tokens packed in one row.

The prompts that join a lane at one step (engine/slots.py) are written by one
forward of the stage instead of one forward each: their N tokens, one sequence
after another, make a single (1, N) row of ids or (1, N, C) activations. Every
row-wise operation (embeddings, norms, RoPE, the linears, the MLP) runs on the
packed row as it is, so no GEMM row is spent on padding and the weights are read
once for all the sequences. Only attention needs the sequences apart: each layer
writes exactly the N real tokens' keys and values into their cache rows (one
index_put, nothing at any other position), then each sequence's queries (a slice
of the row) attend to its own cache row, causally, at its own positions: one SDPA
per sequence, causal from position 0 as a lone prefill's, or one batched SDPA when
every sequence has the same start and length. Nothing is padded, so nothing needs
masking or dropping.

Pure PyTorch: no I/O. The numbers equal one prefill per sequence up to float
rounding (the linears' GEMMs have other shapes): tests/test_join_prefill.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import KVCache, in_dtype


@dataclass(frozen=True)
class PackedRows:
    """Where each token of a packed row goes (built once per forward, `pack_rows`).

    Sequence i holds tokens offsets[i]..offsets[i]+lengths[i]-1 of the row and writes
    them into cache row rows[i] at positions starts[i]..starts[i]+lengths[i]-1.
    """
    rows: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    input_pos: torch.Tensor           # (1, N) each token's position
    token_rows: torch.Tensor          # (N,) each token's cache row
    masks: tuple[torch.Tensor | None, ...]  # per sequence (1, 1, T_i, start_i + T_i); None: causal
    length: int                       # keys read: the largest position written + 1
    uniform: torch.Tensor | None      # (B,) the rows, when every start and length is the same

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def n_tokens(self) -> int:
        return int(self.input_pos.shape[1])


def _chunk_mask(start: int, n: int, device: torch.device | str) -> torch.Tensor | None:
    """Query t (position start + t) sees keys 0..start + t; None from position 0 (causal)."""
    if start == 0:
        return None
    keys = torch.arange(start + n, device=device)
    return (keys[None, :] <= start + torch.arange(n, device=device)[:, None])[None, None]


def pack_rows(rows: list[int] | tuple[int, ...], starts: list[int] | tuple[int, ...],
              lengths: list[int] | tuple[int, ...], device: torch.device | str = "cpu"
              ) -> PackedRows:
    """The PackedRows of sequences written into cache rows `rows` (distinct) at
    positions starts[i]..starts[i]+lengths[i]-1 (each length at least 1)."""
    rows, starts, lengths = tuple(rows), tuple(starts), tuple(lengths)
    if not rows or not len(rows) == len(starts) == len(lengths):
        raise ValueError(f"packed rows need one start and one length per row, got "
                         f"{len(rows)} rows, {len(starts)} starts, {len(lengths)} lengths")
    if len(set(rows)) != len(rows) or min(rows) < 0:
        raise ValueError(f"packed rows must be distinct cache rows, got {list(rows)}")
    if min(lengths) < 1 or min(starts) < 0:
        raise ValueError(f"packed rows need lengths >= 1 and starts >= 0, got lengths "
                         f"{list(lengths)}, starts {list(starts)}")
    offsets = tuple(sum(lengths[:i]) for i in range(len(rows)))
    pos = torch.cat([torch.arange(a, a + n, device=device) for a, n in zip(starts, lengths)])
    token_rows = torch.tensor(rows, device=device).repeat_interleave(
        torch.tensor(lengths, device=device))
    uniform = len(set(starts)) == 1 and len(set(lengths)) == 1
    masks = (_chunk_mask(starts[0], lengths[0], device),) if uniform else tuple(
        _chunk_mask(a, n, device) for a, n in zip(starts, lengths))
    return PackedRows(rows, starts, lengths, offsets, pos[None], token_rows, masks,
                      max(a + n for a, n in zip(starts, lengths)),
                      torch.tensor(rows, device=device) if uniform else None)


def packed_attention(qkv: torch.Tensor, cache: KVCache, layer: int, p: PackedRows, n_head: int,
                     gqa: bool) -> torch.Tensor:
    """Write the packed row's keys and values into the cache, then attend.

    qkv (1, N, n_head + 2 * nkv, hs), q and k rotated; returns (1, N, n_head, hs).
    """
    _, N, heads, hs = qkv.shape
    nkv = (heads - n_head) // 2
    kv = qkv[0, :, n_head:].reshape(N, 2, nkv, hs)  # in the cache's dtype as it is stored
    # the real tokens only: (N, 2, nkv, hs) at their rows and positions
    cache.store(layer, (slice(None), p.token_rows, slice(None), p.input_pos[0]), kv)
    keys, values = cache.k[layer], cache.v[layer]              # (B_cache, nkv, T_cache, hs)
    def read(t: torch.Tensor) -> torch.Tensor:
        return in_dtype(t, qkv.dtype)

    if p.uniform is not None:  # one SDPA for all: (B, nh, T, hs) against their rows
        B, T = p.batch, p.lengths[0]
        q = qkv[0, :, :n_head].reshape(B, T, n_head, hs).transpose(1, 2)
        k, v = keys[:B, :, :p.length], values[:B, :, :p.length]
        if p.rows != tuple(range(B)):  # other rows, or another order: gathered
            k = keys[:, :, :p.length].index_select(0, p.uniform)
            v = values[:, :, :p.length].index_select(0, p.uniform)
        y = F.scaled_dot_product_attention(q, read(k), read(v), attn_mask=p.masks[0],
                                           is_causal=p.masks[0] is None, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(1, N, n_head, hs)
    out = []
    for row, start, n, a, mask in zip(p.rows, p.starts, p.lengths, p.offsets, p.masks):
        q = qkv[:, a:a + n, :n_head].transpose(1, 2)            # (1, nh, T_i, hs)
        k, v = keys[row:row + 1, :, :start + n], values[row:row + 1, :, :start + n]
        y = F.scaled_dot_product_attention(q, read(k), read(v), attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=gqa)
        out.append(y.transpose(1, 2))                            # (1, T_i, nh, hs)
    return torch.cat(out, dim=1)

