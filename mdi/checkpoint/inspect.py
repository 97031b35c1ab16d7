"""A checkpoint's structure as data: what `mdi inspect` prints, reachable from Python.

Reads headers only (shapes and dtypes), never the weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import TokenizerError
from . import st_io
from .format import CheckpointError, CheckpointInfo
from .gguf_int4 import int4_target
from .quant_parts import QUANT_FLOATS
from .sampling_defaults import SamplingDefaults, sampling_defaults
from .sources import Checkpoint, open_checkpoint


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Inspection:
    path: Path
    kind: str                        # "mdi" | "hf"
    config: dict                     # our GPTConfig, as a dict
    tensors: list[TensorInfo]        # as stored (our names, or the source's names)
    n_params: int
    tokenizer: str                   # "bpe, vocabulary 1000" or "unavailable (why)"
    training: dict = field(default_factory=dict)
    source_config: dict = field(default_factory=dict)  # an HF config.json, as given
    sampling: SamplingDefaults | None = None           # the model's own sampling settings


def _dtype_text(dtype: str, fmt: str | None, is_matrix: bool) -> str:
    """"float32" or, for a GGUF tensor, "float32 (Q4_1 file; --quantize int4: int4 (exact))"."""
    if fmt is None:
        return dtype
    return f"{dtype} ({fmt} file; --quantize int4: {int4_target(fmt, is_matrix)})"


def inspect_checkpoint(spec: str | Path | Checkpoint) -> Inspection:
    """Structure of any checkpoint `open_checkpoint` accepts; a bad file raises CheckpointError."""
    ck = open_checkpoint(spec)
    if isinstance(ck, CheckpointInfo):
        if not ck.weights_path.is_file():
            raise CheckpointError(f"{ck.path} has no {ck.weights_path.name}")
        try:
            with st_io.open_file(ck.weights_path) as f:
                entries, data_start = st_io.read_header(f, int8=ck.quantized is not None)
            ordered = st_io.in_order(entries)
            end = data_start + (ordered[-1].end if ordered else 0)
            if ck.weights_path.stat().st_size < end:
                raise st_io.SafetensorsFormatError(f"file is shorter than its header says ({end} bytes)")
        except (st_io.SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"{ck.weights_path} is corrupt or unreadable: {e}") from None
        shapes = {n: (e.shape, str(e.dtype).removeprefix("torch.")) for n, e in entries.items()}
        source_config: dict = {}
    else:
        formats = getattr(ck.source, "formats", {})  # a GGUF's block format per tensor
        shapes = {n: (s, _dtype_text(str(ck.source.dtypes[n]).removeprefix("torch."),
                                     formats.get(n), len(s) == 2))
                  for n, s in ck.source.shapes.items()}
        source_config = dict(ck.source.config)
    tensors = [TensorInfo(n, tuple(s), d) for n, (s, d) in sorted(shapes.items())]
    try:
        tok = ck.tokenizer()
        tok_text = f"{tok.kind}, vocabulary {tok.vocab_size}"
    except (CheckpointError, TokenizerError) as e:
        tok, tok_text = None, f"unavailable ({e})"
    # a quantized checkpoint's scales and zeros are no parameters; int4 codes are two a byte
    quantized = getattr(ck, "quantized", None)
    n_params = sum(math.prod(t.shape) * (2 if t.name.endswith(".int4_codes") else 1)
                   for t in tensors if not (quantized and t.name.endswith(QUANT_FLOATS)))
    return Inspection(ck.path, getattr(ck, "kind", "mdi"), ck.config.to_dict(), tensors,
                      n_params, tok_text, dict(ck.training), source_config,
                      sampling_defaults(ck, tok))
