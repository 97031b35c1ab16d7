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
source with the same --quantize (and --dtype) builds, bit for bit, and the
peak is the quantized model plus one float tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.dtypes import DTYPES
from ..model.int4 import Int4Weight, quantize_groups
from ..tokenizer import Tokenizer
from .format import (TIED_HEAD, TIED_SCALE, CheckpointInfo, StageBuilder, build_stage, read_stage_file,
                     write_checkpoint)
from .gguf_int4 import int4_target
from .hf import HFCheckpoint
from .quant_parts import int4_items


class StoreBuilder(StageBuilder):
    """A StageBuilder whose int4 layers stay in their stored parts; finish returns
    the tensors to store (the tied head left out, as a float checkpoint does)."""

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
            self._keep(name, t.clone())

    def finish(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        self.check_complete()
        out = {k: v.contiguous() for k, v in self.sd.items()
               if not (self.tied and k in (TIED_HEAD, TIED_SCALE))}
        self.sd = {}
        return out


def quantized_tensors(ck: CheckpointInfo | HFCheckpoint, mode: str,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of `ck`'s whole model in `mode` (a quantized checkpoint of
    ours: its own mode, copied; format.run_mode has been asked)."""
    if isinstance(ck, HFCheckpoint):
        # int8 rows of a GGUF's block-format matrices made a block of rows at a time
        return build_stage(ck.config, 0, None, lambda name: ck.get(name, rows=True), dtype=dtype,
                           where=ck.source.origin, quantize=mode, make=StoreBuilder)
    if ck.quantized:
        dtype = dtype or DTYPES[ck.float_dtype]
    return read_stage_file(ck.weights_path, ck.config, 0, None, "cpu", dtype, mode, ck.quantized,
                           make=StoreBuilder)


def write_quantized(ck: CheckpointInfo | HFCheckpoint, out: str | Path, mode: str,
                    tokenizer: Tokenizer | None, dtype: torch.dtype | None = None) -> Path:
    """Write `ck` as a checkpoint stored in `mode` at `out` (may be ck's own
    directory: the source is read whole before the file is replaced)."""
    tensors = quantized_tensors(ck, mode, dtype)
    return write_checkpoint(out, tensors, ck.config, tokenizer, dict(ck.training), mode)
