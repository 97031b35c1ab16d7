"""Group-wise int4 weights: what GGUF's Q4_0 / Q4_1 / Q4_K files hold, and `--quantize int4`.

A weight (out N, in K) is split along K into groups of `group` (32, 64 or 128)
values; each group has a float scale and zero and 4-bit codes q in 0..15 with

    w = (q - 8) * scale + zero

(the form of torch's CPU int4 kernel; llama.cpp's Q4_0 is zero = 0, Q4_1's
`q*d + m` is scale d, zero m + 8d, Q4_K's `d*sc*q - dmin*m` per sub-block of 32 is
scale d*sc, zero 8*d*sc - dmin*m: the same numbers, see checkpoint/gguf_int4.py).

Storage (`Int4Linear`): the codes packed two to a byte in the layout of
`torch.ops.aten._weight_int4pack_mm_for_cpu` (made by
`_convert_weight_to_int4pack_for_cpu`, by this process's CPU capability: with
AVX-512 per block of 64 rows and per input k 32 bytes, byte j holding rows j
and j + 32; `packed_layout`), 0.5 byte per weight, and `scales_and_zeros` (K/group, N, 2) in bfloat16, the kernel's
operand (0.125 byte per weight at group 32): one stored copy, which the kernel
reads as it is. The scales' rounding to bfloat16 is the only change from the
file's numbers (relative 2^-9 of a scale; the codes are exact).

Compute: mdi's own kernel (`int4_mm` of csrc/lowbit_ops.cpp, loaded with the
fused decode kernels, fused_ops.for_lowbit; also inside a compiled step) reads
the same packed codes against float32 activations, at every row count: 1.3-1.5x
torch's kernel here, and a row keeps float32's precision. Where those kernels
are not loaded (no compiler, MDI_FUSED_OPS=0) or under autograd: torch's
weight-only kernel with bfloat16 activations (with float32 ones it is 10-40x
slower), its output cast back to the input's dtype. Either way each row's
result depends on that row alone (no activation quantization across rows), so
`--batch-invariant` needs no per-row loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import fused_ops

GROUP_SIZES = (32, 64, 128)
INNER_K_TILES = 2  # the packing's parameter; K must be a multiple of 16 * it


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@dataclass
class Int4Weight:
    """A weight as 4-bit codes with a scale and zero per group, before packing:
    codes uint8 (N, K) in 0..15, scale and zero float32 (N, K / group)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K): (q - 8) * scale + zero."""
        g = self.group
        q = self.codes.float() - 8.0
        return (q.view(q.shape[0], -1, g) * self.scale[..., None] + self.zero[..., None]).view(q.shape)

    def rows(self, index: torch.Tensor | slice) -> "Int4Weight":
        return Int4Weight(self.codes[index], self.scale[index], self.zero[index], self.group)

    @staticmethod
    def cat_rows(parts: list["Int4Weight"]) -> "Int4Weight":
        """Parts stacked along N (a fused q|k|v or gate|up weight)."""
        if len({p.group for p in parts}) != 1:
            raise ValueError("int4 parts with different group sizes cannot be fused")
        return Int4Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]), parts[0].group)


def quantize_groups(w: torch.Tensor, group: int = 32) -> Int4Weight:
    """Asymmetric min/max int4 per group of `group` inputs: scale = (max - min) / 15,
    q = round((w - min) / scale), zero = min + 8 * scale (so q = 0 gives min)."""
    if group not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group}")
    N, K = w.shape
    if K % group:
        raise ValueError(f"int4 group size {group} does not divide the input width {K}")
    codes = torch.empty(N, K, dtype=torch.uint8)
    scale = torch.empty(N, K // group)
    zero = torch.empty(N, K // group)
    for a in range(0, N, 1024):  # pieces: the float temporaries stay a few MB
        part = w[a:a + 1024].detach().float().reshape(-1, K // group, group)
        lo, hi = part.amin(-1), part.amax(-1)
        s = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((part - lo[..., None]) / s[..., None]).clamp_(0, 15)
        codes[a:a + 1024] = q.reshape(-1, K).to(torch.uint8)
        scale[a:a + 1024], zero[a:a + 1024] = s, lo + 8.0 * s
    return Int4Weight(codes, scale, zero, group)


def packable(N: int, K: int, group: int) -> bool:
    """Can the CPU kernel take an (N, K) weight at this group size? (Its packing
    refuses an N that 16 does not divide.)"""
    return (int4_kernel_available() and K % group == 0 and K % (16 * INNER_K_TILES) == 0
            and N % 16 == 0)


def packed_layout() -> int | None:
    """How this process's torch packs int4 codes, which depends on its CPU capability
    (csrc/lowbit_ops.cpp reads each): 64 (AVX-512: blocks of 64 outputs, byte j holding
    outputs j and j + 32), 32 (AVX2: blocks of 32, j and j + 16), 0 (other CPUs: pairs,
    2j and 2j + 1); None for a packing none of these describes (mdi's kernel then stays
    unused, torch's computes). Found at import by packing a pattern (a plain value for
    a compiled step's trace to read)."""
    return PACKED_LAYOUT


def _find_layout() -> int | None:
    if not int4_kernel_available():
        return None
    codes = torch.zeros(64, 32, dtype=torch.int32)
    codes[1, 0], codes[16, 0], codes[32, 0] = 9, 7, 5  # who shares byte 0 with output 0
    try:
        byte = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
                   .flatten()[0])
    except RuntimeError:
        return None
    return {5 << 4: 64, 7 << 4: 32, 9 << 4: 0}.get(byte)


PACKED_LAYOUT = _find_layout()


# the kernel's OpOverload, looked up once: `torch.ops.aten.X(...)` resolves two
# attributes and an overload packet on every call (0.3 us a call, 120 calls a step)
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_INT4_MM = _INT4_MM.default if _INT4_MM is not None else None

PACK_ROWS = 1024  # a multiple of the packed layout's 64-row blocks


class Int4Linear(nn.Module):
    """A Linear over packed int4 codes and bfloat16 scales and zeros (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: int = 32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(
            in_features // group, out_features, 2, dtype=torch.bfloat16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, w: Int4Weight, bias: torch.Tensor | None = None) -> "Int4Linear":
        N, K = w.shape
        out = cls(K, N, bias is not None, w.group, device="meta")
        # packed 1024 rows at a time (the layout packs blocks of 64 rows on their own,
        # so the pieces equal one call): the kernel's int32 input of a 32k-row head
        # would be 4x the codes, the peak of a node's load
        out.weight = torch.empty(N, K // 2, dtype=torch.uint8)
        for a in range(0, N, PACK_ROWS):
            out.weight[a:a + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                w.codes[a:a + PACK_ROWS].to(torch.int32), INNER_K_TILES)
        out.scales_and_zeros = torch.stack([w.scale.t(), w.zero.t()], dim=-1).to(torch.bfloat16)
        if bias is not None:
            out.bias = bias.detach().clone()
        return out

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int = 32, bias: torch.Tensor | None = None
                   ) -> "Int4Linear":
        """from_weight(quantize_groups(w, group)), equal to it, a block of rows at a
        time: the whole tensor's codes (a byte each) are never held at once."""
        N, K = w.shape
        out = cls(K, N, bias is not None, group, device="meta")
        out.weight = torch.empty(N, K // 2, dtype=torch.uint8)
        out.scales_and_zeros = torch.empty(K // group, N, 2, dtype=torch.bfloat16)
        for a in range(0, N, PACK_ROWS):
            part = cls.from_weight(quantize_groups(w[a:a + PACK_ROWS], group))
            out.weight[a:a + PACK_ROWS] = part.weight
            out.scales_and_zeros[:, a:a + PACK_ROWS] = part.scales_and_zeros
        if bias is not None:
            out.bias = bias.detach().clone()
        return out

    @classmethod
    def from_linear(cls, layer: nn.Linear, group: int = 32) -> "Int4Linear":
        if layer.weight.is_meta:  # a loader's skeleton: filled by name later
            return cls(layer.in_features, layer.out_features, layer.bias is not None, group, "meta")
        return cls.from_float(layer.weight, group, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ops = fused_ops.for_lowbit(x2)
        if ops is not None and PACKED_LAYOUT is not None:
            y = ops.int4_mm(x2 if x2.is_contiguous() else x2.contiguous(), self.weight,
                            self.scales_and_zeros, self.group, PACKED_LAYOUT)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(shape[:-1] + (self.out_features,))
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = _INT4_MM(x2, self.weight, self.group, self.scales_and_zeros)
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, int4 group {self.group}"
