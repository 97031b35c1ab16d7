"""The decode step as a compiled graph holds it (model/compiled.py's torch.compile
graphs and model/aoti.py's packages both trace this): positions, the keys read and
the rows written are tensors, and the cache's buffers are the graph's inputs."""
from __future__ import annotations

import torch

from .cache import KVCache
from .layers import CachedStep


class _Buffers(KVCache):
    """The per-layer cache buffers a compiled step reads and writes (views of rows
    of a KVCache, their whole allocated length): a KVCache for the blocks."""

    def __init__(self, kv: list[torch.Tensor], live: torch.Tensor) -> None:  # noqa: D107
        self.kv, self.live = kv, live
        self.max_len, self.grow_by, self.paged = kv[0].shape[3] if kv else 0, None, False
        self._bind()

    def update(self, layer: int, input_pos: torch.Tensor, kv: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv (2, n, nkv, 1, hs) at input_pos (n, 1), the rows that are not
        live writing back what their position held."""
        buf = self.kv[layer]
        rows, pos = torch.arange(buf.shape[1], device=buf.device), input_pos[:, 0]
        new = kv.to(buf.dtype)[:, :, :, 0].transpose(0, 1)  # (n, 2, nkv, hs), as buf[:, rows, :, pos]
        # an index_put on the input buffer, which Inductor writes in place (a scatter
        # or gather on it costs a whole copy of the buffer and another back)
        buf[:, rows, :, pos] = torch.where(self.live[:, None, None, None], new, buf[:, rows, :, pos])
        return self.k[layer], self.v[layer]


def decode_graph(stage: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor, live: torch.Tensor,
                 keys: torch.Tensor, kv: list[torch.Tensor], uniform: bool) -> torch.Tensor:
    """The step a graph holds. x ids (n, 1) or activations (n, 1, C); pos (n, 1) int64;
    live (n,) bool: the rows whose key and value are written; keys (L,): the positions
    attention reads, 0..L-1 (L: the step's largest position + 1, a dynamic size); kv
    the layers' buffers (2, n, nkv, T, hs). uniform: every row at one position, so
    every key read is visible (no mask, as the eager step)."""
    mask = None if uniform else keys[None, None, None, :] <= pos[:, None, :, None]  # (n,1,1,L)
    step = CachedStep(pos, None, keys.shape[0], mask)
    return stage.forward_step(x, pos, step, _Buffers(kv, live), True, "dense")
