"""Quantized layers as tensors: the stored form of an int4 or int8 checkpoint
(`mdi convert --quantize`), of its per-node chunks, and of the layers a weights
stream carries quantized. One form everywhere, so a stored checkpoint, a chunk
and a stream hold the same numbers, and whoever builds the stage
(format.py:StageBuilder) packs them for its kernel itself (the packed int4
layout is torch's, not a storage format).

A quantized layer `p` (N out, K in) is, instead of its float `p.weight`, either

- int4, group g (32, 64 or 128: the checkpoint's --quantize mode; a GGUF
  Q4_0 / Q4_1 / Q4_K tensor's own codes at group 32, checkpoint/gguf_int4.py):
  `p.int4_codes` uint8 (N, K/2), code 2j in the low nibble of byte j and code
  2j+1 in the high one; `p.int4_scale` and `p.int4_zero` float32 (N, K/g):
  w = (q - 8) * scale + zero;
- int8: `p.weight` int8 (N, K) and `p.scale` float32 (N,) (model/quant.py's
  `quantize_rows`): every Linear and Embedding of an int8 stage, and in an int4
  stage the embedding, a head tied to it, widths the int4 kernel cannot take
  and a GGUF's wider block formats (Q5_x, Q6_K, Q8_0).

Every other tensor (norms, biases) stays float. A file's or stream's header
says which form each layer takes; the builder checks names and shapes against
that (`stream_want`), dtypes and finite scales as each part arrives
(`QuantParts.take`). Pure tensor code: no I/O.
"""
from __future__ import annotations

import torch

from ..model.int4 import Int4Weight

GROUP = 32  # the GGUF block formats' group
INT4_PARTS = ("int4_codes", "int4_scale", "int4_zero")
INT8_PARTS = ("weight", "scale")
QUANT_FLOATS = (".scale", ".int4_scale", ".int4_zero")  # a quantized layer's float32 parts


def stored_float_dtype(dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    """The dtype of a checkpoint's float tensors, a quantized layer's own parts aside."""
    return next((d for k, d in dtypes.items()
                 if d.is_floating_point and not k.endswith(QUANT_FLOATS)), None)


class QuantPartsError(ValueError):
    """A quantized part of a weights stream with the wrong dtype or values."""


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in 0..15 -> (N, K/2), two to a byte (the module doc's order)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> uint8 codes (N, K): the inverse of pack_codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_items(prefix: str, w: Int4Weight) -> list[tuple[str, torch.Tensor]]:
    """The stored tensors of an int4 weight, in part_shapes' order."""
    return [(f"{prefix}.int4_codes", pack_codes(w.codes)),
            (f"{prefix}.int4_scale", w.scale.float().contiguous()),
            (f"{prefix}.int4_zero", w.zero.float().contiguous())]


def part_shapes(form: str, N: int, K: int, group: int = GROUP) -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of a layer's parts: form "int4" (at `group`) or "int8"."""
    if form == "int4":
        return {"int4_codes": (N, K // 2), "int4_scale": (N, K // group),
                "int4_zero": (N, K // group)}
    return {"weight": (N, K), "scale": (N,)}


def stream_want(want: dict[str, tuple[int, ...]], layers: dict[str, tuple[int, int, int]],
                names: set[str], stored: bool = False
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, int]]]:
    """The names and shapes a file or stream must hold, given the names its header
    has: `want` (the float stage's) with, for each quantized layer prefix ->
    (N, K, int4 group; 0 for a layer that is int8 only) whose parts the header
    names, those parts in place of its float weight. stored: the source is a
    quantized checkpoint, so every such layer comes quantized (int4 where it can
    be, unless the header names int8 parts). Returns (that, prefix -> (form
    "int4" | "int8", group) for the layers that come quantized)."""
    forms: dict[str, tuple[str, int]] = {}
    for prefix, (N, K, group) in layers.items():
        if group and f"{prefix}.int4_codes" in names:
            form = "int4"
        elif f"{prefix}.scale" in names:
            form = "int8"
        elif stored:
            form = "int4" if group else "int8"
        else:
            continue
        forms[prefix] = (form, group)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in want.items():  # the parts where the float weight was
        prefix = name.removesuffix(".weight")
        if prefix in forms and name.endswith(".weight"):
            form, group = forms[prefix]
            out.update({f"{prefix}.{s}": p for s, p in part_shapes(form, *shape, group).items()})
        else:
            out[name] = shape
    return out, forms


class QuantParts:
    """Collects the parts of the layers that come quantized, each checked as it
    arrives; `take` returns a layer's finished weight once all its parts are in."""

    def __init__(self, forms: dict[str, tuple[str, int]], where: str) -> None:
        self.forms, self.where = forms, where
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def owns(self, name: str) -> bool:
        prefix, _, part = name.rpartition(".")
        form, _ = self.forms.get(prefix, (None, 0))
        return form is not None and part in (INT4_PARTS if form == "int4" else INT8_PARTS)

    def take(self, name: str, t: torch.Tensor) -> tuple[str, Int4Weight | tuple] | None:
        """(prefix, Int4Weight or (int8 q, float32 scale)) when `name` completes its layer."""
        prefix, _, part = name.rpartition(".")
        want = torch.uint8 if part == "int4_codes" else torch.int8 if part == "weight" \
            else torch.float32
        if t.dtype != want:
            raise QuantPartsError(f"{self.where}: tensor {name!r} has dtype {t.dtype}, "
                                  f"expected {want}")
        if t.dtype == torch.float32 and not torch.isfinite(t).all():
            raise QuantPartsError(f"{self.where}: tensor {name!r} holds non-finite values")
        parts = self.pending.setdefault(prefix, {})
        parts[part] = t
        form, group = self.forms[prefix]
        if len(parts) < (3 if form == "int4" else 2):
            return None
        del self.pending[prefix]
        if form == "int8":
            return prefix, (parts["weight"], parts["scale"])
        codes = unpack_codes(parts["int4_codes"])
        return prefix, Int4Weight(codes, parts["int4_scale"], parts["int4_zero"], group)
