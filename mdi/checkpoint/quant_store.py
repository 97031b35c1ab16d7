"""Quantized checkpoints written tensor by tensor (`mdi convert --quantize
int8|int4|int4-g64|int4-g128`).

The source (ours, a Hugging Face directory or hub name, a GGUF) is read one
tensor at a time through the same builder a load uses (format.py:StageBuilder),
so every decision is the load's: which layers are int4 and which int8 (the
embedding, a head tied to it, widths the int4 kernel cannot take), a GGUF's
Q4_0/Q4_1/Q4_K codes kept exactly and its wider block formats as int8, never
requantized. Only the last step differs: where a load packs an int4 weight for
the kernel, StoreBuilder keeps its codes, scales and zeros in the stored form
(quant_parts.py). So loading the checkpoint builds the stage that loading the
source with the same --quantize (and --dtype) builds, bit for bit.

`write_quantized` writes each stored tensor to the file the moment it is made
(st_write.py) and keeps none: the peak is the runtime plus one source tensor
and its quantized form, not the model (holding every quantized tensor until a
single save_file made a TinyLlama-1.1B int4 conversion cost its whole 0.6 GB).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..model.dtypes import DTYPES
from ..model.int4 import Int4Weight, quantize_groups
from ..tokenizer import Tokenizer
from .format import (FORMAT, TIED_HEAD, TIED_SCALE, WEIGHTS, CheckpointInfo, StageBuilder,
                     build_stage, read_stage_file, write_checkpoint)
from .gguf_int4 import int4_target
from .hf import HFCheckpoint
from .quant_parts import int4_items, stored_float_dtype
from .st_write import TensorFileWriter

Sink = Callable[[str, torch.Tensor], None]


class StoreBuilder(StageBuilder):
    """A StageBuilder whose int4 layers stay in their stored parts; finish returns
    the tensors to store (the tied head left out, as a float checkpoint does).
    sink: each tensor to store goes there as it is made, and is not kept (finish
    then returns nothing)."""

    def __init__(self, *args, sink: Sink | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink

    def _put_int4(self, name: str, t: torch.Tensor, group: int) -> None:
        """StageBuilder._put_int4's choice (the file's own codes at this group, a
        wider block format as int8 rows, else quantize_groups), the codes kept."""
        w: Int4Weight | None = getattr(t, "mdi_int4", None)
        fmt = getattr(t, "mdi_format", None)
        if w is None and fmt is not None and int4_target(fmt) == "int8":
            super()._put_int4(name, t, group)  # int8 rows: _put_parts keeps them as they are
            return
        if w is None or w.group != group:
            w = quantize_groups(t, group)
        self._put_codes(name[:-len(".weight")], w)

    def _put_codes(self, prefix: str, w: Int4Weight) -> None:
        for name, t in int4_items(prefix, w):  # (a fused weight's scales may be views: own them)
            self._keep(name, t if self.sink else t.clone())

    def _stored(self, name: str) -> bool:
        """Is `name` written to the checkpoint (a tied head is not: the embedding is it)?"""
        return not (self.tied and name in (TIED_HEAD, TIED_SCALE))

    def _keep(self, name: str, t: torch.Tensor) -> None:
        if self.sink is None:
            super()._keep(name, t)
        elif self._stored(name):
            self.sink(name, t)

    def finish(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        self.check_complete()  # (with a sink: every tensor is written already)
        out = {k: v.contiguous() for k, v in self.sd.items() if self._stored(k)}
        self.sd = {}
        return out


def _build(ck: CheckpointInfo | HFCheckpoint, mode: str, dtype: torch.dtype | None, make):
    """build_stage over ck's whole model, tensor by tensor, with StoreBuilder `make`."""
    if isinstance(ck, HFCheckpoint):
        # int8 rows of a GGUF's block-format matrices made a block of rows at a time
        return build_stage(ck.config, 0, None, lambda name: ck.get(name, rows=True), dtype=dtype,
                           where=ck.source.origin, quantize=mode, make=make)
    if ck.quantized:
        dtype = dtype or DTYPES[ck.float_dtype]
    return read_stage_file(ck.weights_path, ck.config, 0, None, "cpu", dtype, mode, ck.quantized,
                           make=make)


def quantized_tensors(ck: CheckpointInfo | HFCheckpoint, mode: str,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of `ck`'s whole model in `mode`, all in memory (a quantized
    checkpoint of ours: its own mode, copied; format.run_mode has been asked)."""
    return _build(ck, mode, dtype, StoreBuilder)


def write_quantized(ck: CheckpointInfo | HFCheckpoint, out: str | Path, mode: str,
                    tokenizer: Tokenizer | None, dtype: torch.dtype | None = None) -> Path:
    """Write `ck` as a checkpoint stored in `mode` at `out`, tensor by tensor (may be
    ck's own directory: the new file replaces the old one once it is whole)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with TensorFileWriter(out / WEIGHTS, {"format": FORMAT}) as w:
        _build(ck, mode, dtype, lambda *a: StoreBuilder(*a, sink=w.add))
    return write_checkpoint(out, None, ck.config, tokenizer, dict(ck.training), mode,
                            float_dtype=stored_float_dtype(w.dtypes))
