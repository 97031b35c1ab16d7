"""Quantized weights inside a stage's weights stream: what a GGUF's 4-bit (and
wider block) tensors travel as to a node of a `--quantize int4` ring, so the
node holds the file's own numbers, as one device loading the file does
(format.py:StageBuilder._put_int4), without a float copy crossing the network.

For a Linear `p` that the int4 stage holds as `Int4Linear`, the stream carries
instead of the float `p.weight` (N, K) either

- int4, group 32 (a Q4_0 / Q4_1 / Q4_K tensor, checkpoint/gguf_int4.py):
  `p.int4_codes` uint8 (N, K/2), code 2j in the low nibble of byte j and code
  2j+1 in the high one; `p.int4_scale` and `p.int4_zero` float32 (N, K/32):
  w = (q - 8) * scale + zero. The node packs them for the kernel itself (the
  packed layout is torch's, not a wire format);
- int8 (a wider block format: Q5_x, Q6_K, Q8_0): `p.weight` int8 (N, K) and
  `p.scale` float32 (N,), the starter's `quantize_rows` of the float tensor.
  The stage's own int8 Linears (a head tied to the embedding, on the last node;
  a width the int4 kernel cannot take) travel so too, from any Hugging Face or
  GGUF source: the starter quantizes them as the node would have.

Every other tensor travels as before. The stream's header says which form
each layer takes; the node checks names and shapes against that
(`stream_want`), dtypes and finite scales as each part arrives
(`QuantParts.take`). Pure tensor code: no I/O.
"""
from __future__ import annotations

import torch

from ..model.int4 import Int4Weight

GROUP = 32  # the block formats' group; other --quantize groups travel as floats
INT4_PARTS = ("int4_codes", "int4_scale", "int4_zero")
INT8_PARTS = ("weight", "scale")


class QuantPartsError(ValueError):
    """A quantized part of a weights stream with the wrong dtype or values."""


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in 0..15 -> (N, K/2), two to a byte (the module doc's order)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> uint8 codes (N, K): the inverse of pack_codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_items(prefix: str, w: Int4Weight) -> list[tuple[str, torch.Tensor]]:
    """The stream's tensors for an int4 weight (group 32)."""
    if w.group != GROUP:
        raise ValueError(f"{prefix}.weight: int4 travels at group {GROUP}, not {w.group}")
    return [(f"{prefix}.int4_codes", pack_codes(w.codes)),
            (f"{prefix}.int4_scale", w.scale.float().contiguous()),
            (f"{prefix}.int4_zero", w.zero.float().contiguous())]


def part_shapes(form: str, N: int, K: int) -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of a layer's parts in a stream: form "int4" or "int8"."""
    if form == "int4":
        return {"int4_codes": (N, K // 2), "int4_scale": (N, K // GROUP),
                "int4_zero": (N, K // GROUP)}
    return {"weight": (N, K), "scale": (N,)}


def stream_want(want: dict[str, tuple[int, ...]], int4_layers: dict[str, tuple[int, int, int]],
                names: set[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The names and shapes a stream must hold, given the names its header has:
    `want` (the float stage's) with, for each int4 layer prefix -> (N, K, group)
    whose quantized parts the header names, those parts in place of its float
    weight (int4 codes only for a group-32 layer). Returns (that, prefix -> "int4"
    | "int8" for the layers that come quantized)."""
    out, forms = dict(want), {}
    for prefix, (N, K, group) in int4_layers.items():
        if f"{prefix}.int4_codes" in names and group == GROUP:
            form = "int4"
        elif f"{prefix}.scale" in names:
            form = "int8"
        else:
            continue
        forms[prefix] = form
        del out[f"{prefix}.weight"]
        out.update({f"{prefix}.{s}": shape for s, shape in part_shapes(form, N, K).items()})
    return out, forms


class QuantParts:
    """Collects the parts of the layers that come quantized, each checked as it
    arrives; `take` returns a layer's finished weight once all its parts are in."""

    def __init__(self, forms: dict[str, str], where: str) -> None:
        self.forms, self.where = forms, where
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def owns(self, name: str) -> bool:
        prefix, _, part = name.rpartition(".")
        form = self.forms.get(prefix)
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
        form = self.forms[prefix]
        if len(parts) < (3 if form == "int4" else 2):
            return None
        del self.pending[prefix]
        if form == "int8":
            return prefix, (parts["weight"], parts["scale"])
        codes = unpack_codes(parts["int4_codes"])
        return prefix, Int4Weight(codes, parts["int4_scale"], parts["int4_zero"], GROUP)
