"""A GGUF's tensors in Hugging Face layout, read whole or a block of rows at a time.

`read(name)` dequantizes a tensor to float32 with `gguf.quants.dequantize` (bit
for bit what transformers loads), undoing the Q/K row permutation of llama.cpp's
converter; a Q4_0/Q4_1/Q4_K matrix carries its exact int4 codes along
(`mdi_int4`, gguf_int4.py) and every tensor its block format (`mdi_format`).
`rows(name)` gives a block-format matrix as hf_source.Rows, each block of rows
dequantized when asked for, so a loader that makes int8 rows of it never holds
it whole in float. Either way the file's pages leave the process once copied
out (gguf_file.GGUFFile.release).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .format import CheckpointError
from .gguf_file import GGUFFile
from .gguf_int4 import INT4_TYPES, int4_from_blocks
from .hf_source import Rows

ROWS_AT_ONCE = 512  # rows dequantized at a time: the gguf package's temporaries stay small


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (its converter's interleaved RoPE order).

    Rows of one head are stored as (dim, 2) pairs; Hugging Face's rotate-half
    layout wants (2, dim). Same reshape/swap as transformers'
    `LlamaTensorProcessor._reverse_permute_weights`; works for biases (1-D) too.
    """
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _dequantize(dequantize: Any, t: Any) -> np.ndarray:
    """gguf.quants.dequantize of a block-format tensor, a few hundred rows at a time
    into the result: whole, its temporaries were twice the float tensor (the load's
    peak: +226 MB over the 113 MB float table for SmolLM2's Q8_0 embedding)."""
    data = t.data
    if data.ndim != 2 or data.dtype != np.uint8 or data.shape[0] <= ROWS_AT_ONCE:
        return dequantize(data, t.tensor_type)
    first = dequantize(data[:ROWS_AT_ONCE], t.tensor_type)
    out = np.empty((data.shape[0], first.shape[1]), dtype=first.dtype)
    out[:ROWS_AT_ONCE] = first
    for a in range(ROWS_AT_ONCE, data.shape[0], ROWS_AT_ONCE):
        out[a:a + ROWS_AT_ONCE] = dequantize(data[a:a + ROWS_AT_ONCE], t.tensor_type)
    return out


class GGUFTensors:
    """The tensors of `reader` by Hugging Face name (`by_hf`); n_head, n_kv: the
    model's query and key/value heads (the Q/K rows' permutation)."""

    def __init__(self, reader: GGUFFile, by_hf: dict[str, Any], n_head: int, n_kv: int,
                 path: Path) -> None:
        from gguf.quants import dequantize

        self.reader, self.by_hf, self.path = reader, by_hf, path
        self.n_head, self.n_kv, self._dequantize = n_head, n_kv, dequantize

    def _heads(self, t: Any) -> int:
        return self.n_head if ".attn_q." in t.name else self.n_kv if ".attn_k." in t.name else 0

    def _unreadable(self, t: Any) -> CheckpointError:
        return CheckpointError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                               "which the gguf package cannot dequantize")

    def read(self, name: str) -> torch.Tensor:
        t = self.by_hf.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        try:
            w = _dequantize(self._dequantize, t)  # (rows, cols) float32, ne reversed
        except NotImplementedError:
            raise self._unreadable(t) from None
        heads = self._heads(t)
        if heads:
            w = unpermute_rows(w, heads)
        # a copy out of the memory map where F32 "dequantizes" to a view of it; a block
        # format's floats are new already (a second copy was the load's peak: 113 MB
        # more for SmolLM2's embedding)
        if w.dtype != np.float32 or np.may_share_memory(w, t.data) or not w.flags.writeable:
            w = np.array(w, dtype=np.float32)
        out = torch.from_numpy(w)
        out.mdi_format = t.tensor_type.name  # what --quantize int4 keeps it as (int4_target)
        if t.tensor_type.name in INT4_TYPES and out.dim() == 2:
            # the exact int4 codes ride along for loaders that keep them (--quantize int4)
            try:
                q = int4_from_blocks(t.data, t.tensor_type.name, tuple(out.shape), t.name)
            except ValueError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
            if heads:
                q = q.rows(torch.from_numpy(unpermute_rows(np.arange(out.shape[0]), heads)))
            out.mdi_int4 = q
        self.reader.release(t)  # copied out: the file's pages leave this process
        return out

    def rows(self, name: str) -> Rows | None:
        """A block-format matrix as Rows, each block of rows dequantized when asked for
        (as `read` dequantizes the whole, so the pieces equal its rows bit for bit);
        None for other tensors."""
        t = self.by_hf.get(name)
        if t is None or t.data.ndim != 2 or t.data.dtype != np.uint8:
            return None
        heads = self._heads(t)
        order = unpermute_rows(np.arange(t.data.shape[0]), heads) if heads else None
        n = t.data.shape[0]

        def read_rows(a: int, b: int) -> torch.Tensor:
            try:
                w = self._dequantize(t.data[a:b] if order is None else t.data[order[a:b]],
                                     t.tensor_type)
            except NotImplementedError:
                raise self._unreadable(t) from None
            # the pages read so far leave this process (from the tensor's start: the
            # kernel maps a fault's neighbours too, the last rows' pages among them); in
            # file order only: a permuted q/k reads rows from all over the tensor
            if order is None:
                self.reader.release(t, (0, b))
            elif b >= n:
                self.reader.release(t)
            return torch.from_numpy(np.asarray(w, dtype=np.float32))

        return Rows(tuple(int(d) for d in reversed(t.shape.tolist())), read_rows,
                    lambda: self.read(name), t.tensor_type.name)
