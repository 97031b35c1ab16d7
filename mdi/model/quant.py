"""int8 weights with per-output-channel scales, applied to a stage in place.

Storage: every `nn.Linear` weight (out, in) becomes int8 `q` and a float32
`scale` (out,) with `w ≈ q * scale[:, None]` (symmetric, round to nearest,
q in [-127, 127]); every `nn.Embedding` table (vocab, C) likewise, one scale
per row. Weights take 1 byte instead of 4 (plus 4 bytes per row for the scale).

Compute on CPU: one of three kernels by the rows of the call (kernels.py):
weight-only for a few rows (mdi's `int8_mm` with float32 activations where the
fused kernels are loaded, csrc/rows_ops.cpp; else torch's
`_weight_int8pack_mm`, bfloat16 activations), a bfloat16 GEMM on the weight converted to bfloat16 for more (float32 on
a CPU without native bfloat16); no 8-bit
rounding of the activations (it cost SmolLM2 +1.9% perplexity). The dynamic int8
kernel (`torch._int_mm`, each input row quantized to int8 with its own scale)
serves layers that no configure_stage has set. Rows
are independent in the first two, so `--batch-invariant` takes the weight-only
kernel at every row count. `torch.ao` dynamic quantization was measured and not
taken: one activation scale per *tensor*, so a row's numbers depend on its
step-mates. Other devices dequantize per call (weight-only): correct, not tuned.

Tied head: the embedding and the head are the same matrix. Both are quantized
from the same fp32 tensor with the same rule (one scale per vocabulary row), so
a stage holding only the embedding (first node) and a stage holding only the
head (last node) use identical int8 values; on a stage holding both, the
quantized tensors are shared, not duplicated.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_ops
from .cache import context_length
from .int4 import Int4Linear, packable
from .dtypes import dtype_name
from .kernels import (FEW_ROWS, GEMM_DTYPE, HEAD_ROWS, dequantized_matmul,
                      int8_matmul, refine_top, weight_only_available)
from .layers import pack_linears

# "int4" is group 32; "int4-g64" and "int4-g128" the coarser groups (--quantize values)
QUANT_MODES = ("int8", "int4", "int4-g64", "int4-g128")


def parse_mode(mode: str) -> tuple[str, int]:
    """A QUANT_MODES name -> (kind "int8" | "int4", int4 group size)."""
    kind, _, group = mode.partition("-g")
    return kind, int(group or 32)


ROWS_AT_ONCE = 1024  # rows quantized per piece: the float temporaries stay a few MB


def quantize_rows(w: torch.Tensor, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w (out, in) -> q int8 (out, in), scale float32 (out,).
    dtype: quantize w.to(dtype) (rounded to it first), without a whole copy.
    w may be anything sliced by rows into float tensors (checkpoint/hf_source.Rows).

    Every row on its own, in pieces of ROWS_AT_ONCE rows: a loader quantizing
    tensor by tensor holds the float tensor, the int8 result and a few MB more
    (a 50k-row embedding's float temporaries would be as large as the tensor).
    """
    w = w.detach() if isinstance(w, torch.Tensor) else w  # or hf_source.Rows
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    if w.is_meta:
        # a skeleton's placeholder: nothing to compute, and arithmetic on the meta device
        # runs torch's Python meta kernels, whose first use imports sympy, torch._dynamo
        # and torch._inductor (+68 MB of RSS in every process that loads int8/int4)
        return q, scale
    for a in range(0, w.shape[0], ROWS_AT_ONCE):
        part = w[a:a + ROWS_AT_ONCE]
        part = (part if dtype is None else part.to(dtype)).float()
        s = (part.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (rows,)
        q[a:a + ROWS_AT_ONCE] = torch.round(part / s[:, None]).clamp_(-127, 127)
        scale[a:a + ROWS_AT_ONCE] = s
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 (out, in) with a float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, layer: nn.Linear,
                    quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int8Linear":
        """Quantize `layer`; `quantized` = (q, scale) already made from the same weight (ties)."""
        out = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  device=layer.weight.device)
        q, scale = quantized if quantized is not None else quantize_rows(layer.weight)
        out.weight, out.scale = q, scale  # buffers: assignment re-registers them (shared if tied)
        if layer.bias is not None:
            out.bias = layer.bias.detach().clone()
        return out

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    # rows up to which the weight-only kernel runs, and from which the dequantized GEMM
    # does (kernels.py); set by configure_stage
    few_rows = 0
    many_rows = HEAD_ROWS
    refine = False  # the head: its best candidates recomputed in float32 (kernels.refine_top)

    def weight_only_fits(self, rows: int) -> bool:
        """Can the weight-only kernel take `rows` rows? torch 2.13's crashed (SIGSEGV)
        for 2 or more rows of an input width not a multiple of 16 (40: a tiny test
        model's MLP) and gave NaN or changing values at 1 row; such a layer takes the
        dequantized GEMM instead."""
        return self.in_features % 16 == 0

    def own_kernel(self, rows: int) -> bool:
        """Does mdi's `int8_mm` (where loaded) compute `rows` rows: up to few_rows."""
        return rows <= self.few_rows

    def scales_bf16(self) -> torch.Tensor:
        """The scales in bfloat16, torch's kernels' operand: kept on the layer (not
        state; an attribute that aoti.load_package reads from the stage)."""
        sb = self.__dict__.get("_scale_bf16")
        if sb is None or sb.shape != self.scale.shape:
            sb = self.__dict__["_scale_bf16"] = self.scale.to(torch.bfloat16)
        return sb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        n = x2.shape[0]
        ops = fused_ops.for_lowbit(x2) if self.own_kernel(n) else None
        if ops is not None:  # float32 activations, its own kernel (csrc/rows_ops.cpp)
            y = ops.int8_mm(x2 if x2.is_contiguous() else x2.contiguous(), self.weight,
                            self.scale)
        elif x.device.type == "cpu" and (n <= self.few_rows or n >= self.many_rows):
            sb = self.scales_bf16()
            if n <= self.few_rows and self.weight_only_fits(n):
                y = torch._weight_int8pack_mm(
                    x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16), self.weight, sb)
                if self.refine and x.dtype == torch.float32:
                    y = refine_top(y, x2, self.weight, self.scale)
            else:
                y = dequantized_matmul(x2, self.weight, sb)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        elif x.device.type == "cpu":
            y = int8_matmul(x2, self.weight, self.scale).to(x.dtype)
        else:
            y = x2 @ self.dequantized(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """An Embedding whose table is int8 (num, dim) with a float32 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.out_dtype = dtype  # an embedding has no input to take the dtype from
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding,
                       quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int8Embedding":
        out = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype, emb.weight.device)
        q, scale = quantized if quantized is not None else quantize_rows(emb.weight)
        out.weight, out.scale = q, scale
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).float() * self.scale[idx].unsqueeze(-1)
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or name.endswith("." + pat) or name == pat
               for pat in skip)


@torch.no_grad()
def quantize_linears(module: nn.Module, skip: Iterable[str] = (), embeddings: bool = True,
                     mode: str = "int8") -> nn.Module:
    """Replace, in place, every nn.Linear (and nn.Embedding if `embeddings`) by its
    quantized counterpart; returns `module`. On the meta device: placeholders.

    mode "int4[-gN]": Linears become Int4Linear where the kernel takes their shape;
    embeddings, a head tied to one, and other Linears int8.
    skip: module names (as in named_modules) or fnmatch patterns to leave in float.
    Modules that share one weight tensor (a tied embedding and head) share one
    quantized tensor afterwards.
    """
    kind, group = parse_mode(mode)
    skip = tuple(skip)
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(fp weight) -> (q, scale)
    targets = [(name, m) for name, m in module.named_modules()
               if (isinstance(m, nn.Linear) or (embeddings and isinstance(m, nn.Embedding)))
               and not _skipped(name, skip)]
    embedded = {id(m.weight) for _, m in targets if isinstance(m, nn.Embedding)}
    # a head tied to the embedding is int8 on a stage without the embedding too (the
    # ring's last node): every split of the model holds the same numbers
    tied = getattr(getattr(module, "config", None), "tie_embeddings", False)
    for name, m in targets:
        key = id(m.weight)
        if (kind == "int4" and isinstance(m, nn.Linear) and key not in embedded
                and not (tied and name == "lm_head")
                and packable(m.out_features, m.in_features, group)):
            new: nn.Module = Int4Linear.from_linear(m, group)
        else:
            if key not in done:
                done[key] = quantize_rows(m.weight)
            new = (Int8Linear.from_linear(m, done[key]) if isinstance(m, nn.Linear)
                   else Int8Embedding.from_embedding(m, done[key]))
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
    choose_kernels(module)  # the defaults; configure_stage sets the run's
    return module


def check_mode(mode: str | None) -> str | None:
    """A `--quantize` mode by name: None (or "none") for float, else one of QUANT_MODES."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    return mode


def quantize(module: nn.Module, mode: str | None) -> nn.Module:
    """Apply a `--quantize` mode by name (None: unchanged)."""
    if check_mode(mode) is None:
        return module
    return quantize_linears(module, mode=mode)


def is_quantized(module: nn.Module) -> bool:
    """Does module hold any quantized layer (at load, or from an int8 checkpoint)?"""
    return any(isinstance(m, (Int8Linear, Int8Embedding, Int4Linear)) for m in module.modules())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def choose_kernels(stage: nn.Module, few_rows: int | None = None,
                   batch_invariant: bool = False) -> None:
    """Set every Int8Linear's kernel thresholds (kernels.py): weight-only up to
    few_rows (None: FEW_ROWS) rows, the bfloat16 GEMM above. The head and
    --batch-invariant stages take the weight-only kernel at every row count: int8
    activations before the vocabulary cost SmolLM2 +1.2% perplexity, and its rows
    are independent, so nothing depends on the rows of a step."""
    for name, m in stage.named_modules():
        if not isinstance(m, Int8Linear):
            continue
        if not weight_only_available():  # (other devices: Int8Linear checks x's device)
            m.few_rows, m.many_rows = 0, HEAD_ROWS
        elif name == "lm_head" or batch_invariant:
            m.few_rows = m.many_rows = HEAD_ROWS
            m.refine = name == "lm_head"
        else:
            m.few_rows = FEW_ROWS if few_rows is None else int(few_rows)
            m.many_rows = m.few_rows + 1


def configure_stage(stage: nn.Module, quantize_mode: str | None = None,
                    batch_invariant: bool = False, max_context: int | None = None,
                    pack: bool = True, few_rows: int | None = None,
                    kv_dtype: torch.dtype | None = None, compile: bool = False) -> nn.Module:
    """Apply the runtime choices every loader of a stage takes (`--quantize`,
    `--batch-invariant`, `--max-context`): single-device, the starter and each
    node alike. A stage already int8 (quantized while loading) stays as it is.
    pack: prepack the CPU float32 weights now (layers.pack_linears) rather than on
    the first forward; False for a stage that computes on the plain weights
    (a node without room for the packed copy). few_rows: see choose_kernels.
    kv_dtype: what its KV caches store (--kv-dtype; None: the compute dtype).
    compile: decode through a compiled step (--compile, model/compiled.py); the
    float32 weights stay plain (the compiled graph reads them, not oneDNN's copy)."""
    if not is_quantized(stage):
        quantize(stage, quantize_mode)
    else:
        check_mode(quantize_mode)
    stage.batch_invariant = batch_invariant
    if max_context is not None:
        context_length(1, max_context)  # a ValueError naming a bad value, here
        stage.max_context = max_context
    stage.kv_dtype = kv_dtype
    choose_kernels(stage, few_rows, batch_invariant)
    if compile:
        from .compiled import CompiledDecode  # a ValueError for --batch-invariant, here

        if kv_dtype == torch.int8:
            raise ValueError("--compile with --kv-dtype int8: the compiled step writes the "
                             "cache's float buffers; use one or the other")

        stage.compiled_decode = CompiledDecode(stage)
        pack = False
    if any(p.device.type == "cpu" for p in stage.parameters()):
        fused_ops.ops()  # the decode kernels built (once per machine) or loaded now, not at step 1
    stage.packed_linears = pack
    if pack and not batch_invariant:
        pack_linears(stage)
    return stage


def kernel_summary(stage: nn.Module) -> dict[str, int]:
    """How many layers of a configured stage run which kernel (for logs and --json)."""
    from .layers import can_pack, has_plain_weight

    out: dict[str, int] = {}
    # the weight-only products: mdi's kernels (float32 activations) where loaded, else torch's
    acts = "mdi's kernel, float32 activations" if fused_ops.loaded() else "bfloat16 activations"
    for m in stage.modules():
        if isinstance(m, Int4Linear):
            kind = f"int4 g{m.group} weight-only ({acts})"
        elif isinstance(m, Int8Linear):
            kind = (f"int8 weight-only ({acts})" if m.few_rows >= HEAD_ROWS else
                    "int8 dynamic (per-row int8 activations)" if m.few_rows <= 0 else
                    f"int8 weight-only up to {m.few_rows} rows, {dtype_name(GEMM_DTYPE)} GEMM above"
                    if m.many_rows <= m.few_rows + 1 else
                    f"int8 weight-only up to {m.few_rows} rows, dynamic above")
        elif isinstance(m, Int8Embedding):
            kind = "int8 embedding rows"
        elif isinstance(m, nn.Linear):
            w = m.weight
            packed = not has_plain_weight(m) or (
                getattr(stage, "packed_linears", False) and not getattr(stage, "batch_invariant", False)
                and can_pack(m, torch.empty(0, dtype=w.dtype, device=w.device)))
            kind = "float32 prepacked (oneDNN)" if packed else f"{str(w.dtype).removeprefix('torch.')} dense"
        else:
            continue
        out[kind] = out.get(kind, 0) + 1
    return out
