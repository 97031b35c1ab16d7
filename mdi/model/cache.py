"""Per-sample KV cache with preallocated buffers.

One cache serves a group of samples (a micro-batch): row b holds sample b's keys
and values for every layer of a stage. Rows are independent; a sample can be
reset and re-filled without touching its neighbours.
"""
from __future__ import annotations

import torch

# Positions a run keeps when --max-context is not given: a model's whole
# block_size up to this (GPT-2's 1024 and TinyLlama's 2048 are kept whole),
# never SmolLM2's 8192 (377 MB of fp32 cache per sequence) by default.
DEFAULT_MAX_CONTEXT = 2048


def context_length(block_size: int, max_context: int | None = None) -> int:
    """Positions a run keeps (its KV cache's length, its window's size):
    min(block_size, max_context), max_context defaulting to DEFAULT_MAX_CONTEXT."""
    cap = DEFAULT_MAX_CONTEXT if max_context is None else max_context
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
    return min(block_size, cap)


class KVCache:
    """Keys and values of a stage, one buffer per layer: (2, B, nh, T_max, hs),
    keys at [0] and values at [1], so a step writes both with one copy.
    `k[layer]` and `v[layer]` are views of it, (B, nh, T_max, hs)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 _buffers: list[torch.Tensor] | None = None) -> None:
        if _buffers is not None:
            self.kv = _buffers
        else:
            shape = (2, batch, n_head, max_len, head_size)  # (k|v, B, nh, T_max, hs)
            self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.k = [b[0] for b in self.kv]
        self.v = [b[1] for b in self.kv]
        self.max_len = self.kv[0].shape[3] if self.kv else max_len

    @property
    def batch(self) -> int:
        return self.kv[0].shape[1] if self.kv else 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that shares storage with this one."""
        return KVCache(0, 0, 0, self.max_len, 0, _buffers=[b[:, start:stop] for b in self.kv])

    def update(self, layer: int, input_pos: torch.Tensor, kv: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv (2, B, nh, T, hs) (keys, then values) at input_pos (B, T) in one
        copy; return the layer's full key and value buffers (B, nh, T_max, hs).

        start: every row's positions are start..start+T-1 (the caller knows it
        once per forward), so a slice copy does instead of a scatter.
        """
        buf = self.kv[layer]
        if start is not None:
            buf[:, :, :, start:start + kv.shape[3]] = kv
        else:
            idx = input_pos[None, :, None, :, None].expand(2, -1, kv.shape[2], -1, kv.shape[4])
            buf.scatter_(3, idx, kv)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)
