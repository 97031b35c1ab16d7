"""The `--quantize` mode that keeps a GGUF file's precision.

Weights keep the precision the file gives them (DESIGN.md): a Q4 file runs as
int4 (the file's own codes, kept exactly where the file's blocks allow), a
Q8_0 file as int8, a float file (F32, F16, BF16) in float. This is what a
command that runs a model does when no `--quantize` is given; `--quantize none`
asks for the float weights (every tensor dequantized) instead. The library's
loaders (`load_model`, `load_stage`) take no such default: they load what they
are told.

The file's type is the type of most of its blocks' tensor bytes (a Q4_K_M file
keeps a few tensors in Q6_K; it is a Q4 file). Types under 4 bits (Q2_K, Q3_K,
IQ2, IQ3, ...) run as int4: float would take 8-16x the file's memory.
"""
from __future__ import annotations

from pathlib import Path

# GGUF tensor types by the name's start: float ones run in float; 5- to 8-bit ones
# as int8; every other quantized type (Q4, the 1- to 3-bit K and I quants, ternary)
# as int4: the closest our kernels hold without inflating the file
FLOAT_TYPES = ("F", "BF")
INT8_TYPES = ("Q8", "Q5", "Q6", "IQ5", "IQ6")


def main_weight_type(path: str | Path) -> str:
    """The GGUF file's main weight type: the type of most of its blocks' tensor bytes
    (the embedding and head, often kept wider, left out: a small model's vocabulary
    can outweigh its blocks)."""
    from .gguf_file import bytes_by_type

    sizes = bytes_by_type(path, prefix="blk.") or bytes_by_type(path)
    if not sizes:
        raise ValueError(f"{path} holds no tensors")
    return max(sizes, key=sizes.get)


def mode_for(weights: str) -> str | None:
    """The --quantize mode that keeps a weight type's precision (None: float)."""
    if weights.startswith(FLOAT_TYPES):
        return None
    return "int8" if weights.startswith(INT8_TYPES) else "int4"


def gguf_path(ckpt: str | Path) -> Path | None:
    """The GGUF file a `--ckpt` value names (a shipped model's name, a .gguf path, a
    file with GGUF's magic), or None for any other checkpoint."""
    from .shipped import has_gguf_magic, is_shipped_name, shipped_path

    if is_shipped_name(str(ckpt)):
        return shipped_path(str(ckpt))
    path = Path(ckpt)
    if path.is_file() and (path.suffix.lower() == ".gguf" or has_gguf_magic(path)):
        return path
    return None


def file_mode(ckpt: str | Path) -> tuple[str | None, str | None]:
    """(the mode keeping the file's precision, its main weight type) for a GGUF
    checkpoint; (None, None) for any other."""
    path = gguf_path(ckpt)
    if path is None:
        return None, None
    weights = main_weight_type(path)
    return mode_for(weights), weights
