"""Several sequences' prefills as one cached forward: their tokens packed in one row.

The prompts that join a lane at one step (engine/slots.py) are written by one
forward of the stage instead of one forward each: their N tokens, one sequence
after another, make a single (1, N) row of ids or (1, N, C) activations. Every
row-wise operation (embeddings, norms, RoPE, the linears, the MLP) runs on the
packed row as it is, so no GEMM row is spent on padding; only attention needs
the sequences apart. There the queries are scattered into a right-padded
(B, T_max) layout, each sequence attends to its own cache row under a causal
mask at its own positions, and the outputs are gathered back into the packed
row. Pad queries sit at their sequence's last position (a finite softmax: they
see at least that key) and their outputs are dropped; pad keys do not exist:
each layer writes exactly the N real tokens' keys and values into the cache
(one index_put), nothing at any other position.

Pure PyTorch: no I/O. The numbers equal one prefill per sequence up to float
rounding (other GEMM shapes, a masked SDPA for the causal one): tests/test_join_prefill.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import KVCache


@dataclass(frozen=True)
class PackedRows:
    """Where each token of a packed row goes (built once per forward, `pack_rows`).

    Sequence i holds tokens offsets[i]..offsets[i]+lengths[i]-1 of the row and writes
    them into cache row rows[i] at positions starts[i]..starts[i]+lengths[i]-1.
    """
    rows: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    input_pos: torch.Tensor           # (1, N) each token's position
    token_rows: torch.Tensor          # (N,) each token's cache row
    dest: torch.Tensor                # (N,) each token's index in the padded (B * T_max) layout
    mask: torch.Tensor                # (B, 1, T_max, length): key j visible to query t of i
    length: int                       # keys read: the largest position written + 1
    attend_rows: torch.Tensor | None  # (B,) cache rows to read, None: rows 0..B-1 in order

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def n_tokens(self) -> int:
        return int(self.input_pos.shape[1])


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
    t_max = max(lengths)
    t = torch.arange(t_max, device=device)
    start = torch.tensor(starts, device=device)[:, None]
    n = torch.tensor(lengths, device=device)[:, None]
    real = t[None] < n                                           # (B, T_max)
    padded_pos = start + torch.minimum(t[None], n - 1)           # pads: the last position
    length = max(s + k for s, k in zip(starts, lengths))
    key_pos = torch.arange(length, device=device)
    mask = key_pos[None, None, None, :] <= padded_pos[:, None, :, None]  # (B, 1, T_max, L)
    flat = torch.arange(len(rows) * t_max, device=device).view(len(rows), t_max)
    attend = None if rows == tuple(range(len(rows))) else torch.tensor(rows, device=device)
    return PackedRows(rows, starts, lengths, padded_pos[real][None], torch.tensor(
        rows, device=device).repeat_interleave(torch.tensor(lengths, device=device)),
        flat[real], mask, length, attend)


def packed_attention(qkv: torch.Tensor, cache: KVCache, layer: int, p: PackedRows, n_head: int,
                     gqa: bool) -> torch.Tensor:
    """Write the packed row's keys and values into the cache, then attend.

    qkv (1, N, n_head + 2 * nkv, hs), q and k rotated; returns (1, N, n_head, hs).
    """
    _, N, heads, hs = qkv.shape
    nkv = (heads - n_head) // 2
    kv = qkv[0, :, n_head:].reshape(N, 2, nkv, hs).to(cache.kv[layer].dtype)  # (--kv-dtype)
    cache.kv[layer][:, p.token_rows, :, p.input_pos[0]] = kv  # (N, 2, nkv, hs): real tokens only
    k, v = cache.k[layer][:, :, :p.length], cache.v[layer][:, :, :p.length]
    if k.dtype != qkv.dtype:  # a narrower cache (--kv-dtype): read back in the compute dtype
        k, v = k.to(qkv.dtype), v.to(qkv.dtype)
    if p.attend_rows is not None:
        k, v = k.index_select(0, p.attend_rows), v.index_select(0, p.attend_rows)
    B, t_max = p.mask.shape[0], p.mask.shape[2]
    q = qkv.new_zeros(B * t_max, n_head, hs)
    q[p.dest] = qkv[0, :, :n_head]
    y = F.scaled_dot_product_attention(q.view(B, t_max, n_head, hs).transpose(1, 2), k, v,
                                       attn_mask=p.mask, enable_gqa=gqa)  # (B, nh, T_max, hs)
    return y.transpose(1, 2).reshape(B * t_max, n_head, hs)[p.dest][None]
