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
    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 _buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        if _buffers is not None:
            self.k, self.v = _buffers
        else:
            shape = (batch, n_head, max_len, head_size)  # (B, nh, T_max, hs)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = self.k[0].shape[2] if self.k else max_len

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that shares storage with this one."""
        return KVCache(0, 0, 0, self.max_len, 0,
                       _buffers=([k[start:stop] for k in self.k], [v[start:stop] for v in self.v]))

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at input_pos (B, T); return the full buffers.

        start: every row's positions are start..start+T-1 (the caller knows it
        once per forward), so a slice copy does instead of a scatter.
        """
        if start is not None:
            T = k.shape[2]
            self.k[layer][:, :, start:start + T] = k
            self.v[layer][:, :, start:start + T] = v
        else:
            idx = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k[layer].scatter_(2, idx, k)
            self.v[layer].scatter_(2, idx, v)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
