"""Which kernel an int8 layer runs for the rows of a step.

Two kernels read the same stored int8 weight (one copy serves both), both on
bfloat16 activations:
- weight-only `torch._weight_int8pack_mm`: few aten calls, fastest for a few
  rows (decode of one or a few sequences), where the weight read is the cost;
- the weight converted to bfloat16 for one bfloat16 GEMM (`dequantized_matmul`;
  float32 on CPUs without native bfloat16, `GEMM_DTYPE`)
  for more rows (larger batches, prefill, eval's windows): the conversion is
  paid once for all of them.
An Int8Linear runs the first up to `few_rows` rows, the second from
`many_rows`. Where the fused kernels are loaded (fused_ops.py) the first is
mdi's own `int8_mm` (csrc/rows_ops.cpp): the same weight against float32
activations (no bfloat16 rounding of the input or the output, so the head needs
no `refine_top`), 1.0-1.2x torch's kernel. The thresholds are fixed, so every process of a ring (and a
single-device run) makes the same choice for the same rows and their tokens
stay equal; on one kind of CPU: the many-rows GEMM runs in bfloat16 or float32
by the CPU (`GEMM_DTYPE`), so a ring mixing a CPU with native bfloat16 and one
without computes prefills and steps of more than `few_rows` rows in two ways. The head and `--batch-invariant` stages take the weight-only kernel
at every row count (its rows are independent, checked in tests/test_quant.py).

The dynamic int8 kernel (`int8_matmul`: per-row int8 activations, `torch._int_mm`)
was the one above 4 rows until 2026-12-07 and is faster at 16-512 rows on this
project's CPUs (1.6x at 16 rows here), but rounding the activations to 8 bits
per row cost SmolLM2 +1.9% perplexity on top of the weights' +0.5% (two thirds
of it in the MLP's down projection, whose input has a few channels far larger
than the rest), and keeping it on the other layers left +0.9% to +1.7% by
details of the down projection's kernel (docs/benchmarks.md section 7). It is
kept for layers built outside configure_stage (its rows are exact integer sums).
"""
from __future__ import annotations

import torch

# rows up to which the weight-only kernel runs, the bfloat16 GEMM above (2026-12-07,
# Sapphire Rapids with AMX, 2 threads, SmolLM2's 120 block matrices, ms, weight-only /
# bfloat16 GEMM / dynamic int8: 13.8 / 44.1 / 21.0 at 1 row, 45.2 / 46.6 / 28.4 at 16,
# 73.8 / 51.5 / 41.6 at 32, 2021 / 1032 / 507 at 512; a loaded machine)
FEW_ROWS = 16
# the head, and --batch-invariant: weight-only at every row count
HEAD_ROWS = 1 << 62


def weight_only_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, in) float @ dequant(q, scale).T -> (N, out) float32, on CPU.

    Per-row dynamic activation scale; integer accumulation is exact, so row n's
    result depends on row n alone.
    """
    x = x.float()
    xs = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (N, 1)
    xq = torch.round(x / xs).to(torch.int8)  # |x / xs| <= 127: no clamp needed
    acc = torch._int_mm(xq, q.t())  # (N, out) int32; q.t() as a view is the fast layout
    return acc.float() * (xs * scale)


def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX-512 BF16 or AMX tiles)? Without,
    every bfloat16 element is converted in software: a bfloat16 GEMM of many rows ran
    3x slower than float32 on the AVX2 machine of docs/benchmarks.md."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


# the many-rows GEMM's dtype: bfloat16 where the CPU has it natively, else float32
# (exact for the int8 codes either way; only the activations' rounding differs)
GEMM_DTYPE = torch.bfloat16 if native_bf16() else torch.float32


def dequantized_matmul(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (N, in) @ dequant(q, scale).T -> (N, out) in `dtype` (None: GEMM_DTYPE): the int8
    weight converted to it (exact: |q| <= 127), one GEMM (in bfloat16 as the weight-only
    kernel, bfloat16 activations), the channel scales applied to its result. The
    converted weight is a temporary of out x in x 2 (4) bytes per call (TinyLlama's
    MLP: 23 (46) MB), which the memory plan does not count."""
    dtype = dtype or GEMM_DTYPE
    return torch.mm(x.to(dtype), q.t().to(dtype)) * scale_bf16.to(dtype)


# logits the head recomputes in float32 (per row, its best candidates by the bfloat16
# product), REFINE_ROWS rows at a time (the gathered weights stay ~2 MB for SmolLM2)
REFINE_TOP = 16
REFINE_ROWS = 64


def refine_top(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               k: int = REFINE_TOP) -> torch.Tensor:
    """The weight-only kernel's output, y (N, out) bfloat16, as float32 with each row's
    k largest entries recomputed exactly in float32 from x (N, in) and the int8 rows
    (q (out, in), scale (out,)). The kernel rounds its output to bfloat16: logits near
    25 come out in steps of 0.125, so two candidates 0.03 apart tie, and greedy
    decoding took the wrong one of SmolLM2's first answer (docs/benchmarks.md). The
    candidates a sampler can draw are the top ones; the rest keep the kernel's value.
    Each row depends on itself alone: the sums are elementwise products summed
    along the row (a batched GEMM's sums changed with the number of rows)."""
    y = y.float()
    k = min(k, y.shape[1])
    for a in range(0, y.shape[0], REFINE_ROWS):
        part = y[a:a + REFINE_ROWS]
        idx = part.topk(k, dim=1, sorted=False).indices                  # (n, k)
        w = q[idx].float() * scale[idx].float()[..., None]               # (n, k, in)
        part.scatter_(1, idx, (w * x[a:a + REFINE_ROWS].float()[:, None, :]).sum(-1))
    return y
