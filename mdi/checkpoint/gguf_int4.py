"""GGUF's 4-bit block formats as group-32 int4 codes with a scale and zero per
group (model/int4.py's `w = (q - 8) * scale + zero`), read from the blocks as
stored, never through float: Q4_0, Q4_1 and Q4_K map exactly.

- Q4_0, blocks of 32: f16 d, 16 bytes of nibbles; w = (q - 8) * d:
  scale d, zero 0.
- Q4_1, blocks of 32: f16 d, f16 m, 16 bytes; w = q * d + m: scale d, zero m + 8d.
- Q4_K, super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins
  for 8 sub-blocks of 32, 128 bytes; w = d*sc*q - dmin*m: scale d*sc, zero
  8*d*sc - dmin*m.
Nibble order (llama.cpp's): in each 32-value run, the low nibbles of 16 bytes are
values 0..15 and the high nibbles 16..31 (Q4_K: low nibbles of 32 bytes, then
their high nibbles). tests/test_gguf_int4.py checks every mapping against the
`gguf` package's own dequantization, exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.int4 import Int4Weight

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def fused_format(formats: list[str]) -> str:
    """The format a fused weight (q|k|v, gate|up) counts as: int4 only if every part
    is; else a part's wider block format (int8); else float."""
    if all(f in INT4_TYPES for f in formats):
        return formats[0]
    return next((f for f in formats if f not in INT4_TYPES + FLOAT_TYPES), "F32")


def int4_target(fmt: str, is_matrix: bool = True) -> str:
    """What a GGUF tensor of format `fmt` becomes under --quantize int4: its own
    codes (int4), the next wider format for the other block formats (int8: Q5_x,
    Q6_K, Q8_0, ...; a narrower one, Q2/Q3_K or IQ*, also lands on int8), int4
    quantized from the floats for float tensors; norms and biases stay float."""
    if not is_matrix:
        return "float"
    if fmt in INT4_TYPES:
        return "int4 (exact)"
    return "int4" if fmt in FLOAT_TYPES else "int8"
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
BLOCK_VALUES = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 256}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """(blocks, bytes) -> (blocks, 2 * bytes) codes: per run of `run` bytes, the
    low nibbles then the high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, run) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & np.uint8(0x0F)).reshape(n, -1)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def int4_from_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int], name: str) -> Int4Weight:
    """The int4 weight (N, K) = `shape` of a tensor's raw blocks (uint8, as in the file)."""
    N, K = shape
    nb = K // BLOCK_VALUES[qtype]
    raw = np.asarray(data, dtype=np.uint8)
    if K % BLOCK_VALUES[qtype] or raw.size != N * nb * BLOCK_BYTES[qtype]:
        raise ValueError(f"tensor {name!r}: {raw.size} bytes of {qtype} do not hold a "
                         f"{N}x{K} weight")
    blocks = raw.reshape(N * nb, BLOCK_BYTES[qtype])
    if qtype == "Q4_0":
        d = _f16(blocks[:, 0:2])
        codes, scale, zero = _nibbles(blocks[:, 2:], 16), d, np.zeros_like(d)
    elif qtype == "Q4_1":
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        codes, scale, zero = _nibbles(blocks[:, 4:], 16), d, m + np.float32(8) * d
    else:
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, mn = _q4k_scale_min(blocks[:, 4:16])
        codes = _nibbles(blocks[:, 16:], 32)
        scale = d * sc                                   # (blocks, 8)
        zero = np.float32(8) * scale - dmin * mn
    if not (np.isfinite(scale).all() and np.isfinite(zero).all()):
        raise ValueError(f"tensor {name!r}: {qtype} blocks hold non-finite scales")
    groups = K // 32
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(codes).reshape(N, K)),
                      torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(N, groups)),
                      torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32).reshape(N, groups)),
                      32)
