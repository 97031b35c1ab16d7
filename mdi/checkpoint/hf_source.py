"""A model described in Hugging Face terms, wherever its bytes live.

The contract between readers of external formats and the mapping onto our
config-driven decoder: a Hugging Face directory (`config.json`, safetensors
shards, `tokenizer.json`, ...) is one reader, a GGUF file another. Readers
yield tensors under Hugging Face names (`model.layers.3.self_attn.q_proj.weight`)
in Hugging Face layout (e.g. Llama q/k rows in the rotate-half order), one at a
time on request, so a node can read only its stage's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class Rows:
    """A 2-D float32 tensor of a source, read a block of rows at a time (`rows[a:b]`)
    or whole (`whole()`): a loader that quantizes it row by row (int8 rows) never holds
    it whole in float (SmolLM2's Q8_0 embedding: 113 MB of float32 for 28 MB of int8).
    `fmt`: the source's block format (a GGUF type name), as a read tensor's mdi_format."""

    dtype = torch.float32
    device = torch.device("cpu")
    is_meta = False

    def __init__(self, shape: tuple[int, int], read_rows: Callable[[int, int], torch.Tensor],
                 whole: Callable[[], torch.Tensor], fmt: str | None = None) -> None:
        self.shape = torch.Size(shape)
        self._read_rows, self._whole, self.mdi_format = read_rows, whole, fmt

    def whole(self) -> torch.Tensor:
        """The whole tensor, as the source's `read` gives it."""
        return self._whole()

    def is_floating_point(self) -> bool:
        return True

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Rows are read by a slice of rows")
        a, b, _ = rows.indices(self.shape[0])
        return self._read_rows(a, max(a, b))


@dataclass
class HFSource:
    config: dict                                   # config.json contents
    shapes: dict[str, tuple[int, ...]]             # HF tensor name -> shape
    dtypes: dict[str, torch.dtype]                 # HF tensor name -> stored (or dequantized) dtype
    read: Callable[[str], torch.Tensor]            # one tensor by HF name; reads only that tensor
    tokenizer_json: str | None = None              # tokenizer.json contents
    tokenizer_config: dict = field(default_factory=dict)   # bos_token, eos_token, chat_template, ...
    generation_config: dict = field(default_factory=dict)  # eos_token_id, ...
    origin: str = ""                               # where it came from, for messages
    # HF name -> the tensor as Rows (read a block of rows at a time), or None where the
    # source reads it whole only (see Rows)
    rows: Callable[[str], Rows | None] | None = None
    # the tokenizers.Tokenizer that tokenizer_json describes, where the reader built it
    # already (a GGUF): used as it is rather than parsed again from the text (a second
    # build left ~25 MB behind in malloc's heap)
    tokenizer_built: Any = None
