"""Which kernel an int8 layer runs for the rows of a step.

Two kernels read the same stored int8 weight (one copy serves both):
- weight-only `torch._weight_int8pack_mm` with bfloat16 activations: no
  activation quantization, few aten calls; fastest for a few rows (decode of
  one or a few sequences), where the weight read is the cost;
- dynamic int8 (`int8_matmul`: per-row int8 activations, `torch._int_mm`,
  exact integer sums), VNNI-fast for many rows.
An Int8Linear runs the first up to `few_rows` rows (0: never). The default is
the fixed FEW_ROWS, so that every process of a ring (and a single-device run)
makes the same choice for the same rows and their tokens stay equal; a measured
threshold (`probe_few_rows`, cached per weight shape) is available where one
process computes alone, or for a starter to measure once and hand to its nodes.
`--batch-invariant` takes the dynamic kernel in the blocks (the choice would
otherwise depend on how many rows share a step); the head always runs weight-only.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

# rows up to which the weight-only kernel runs by default (issue 15's figures on
# this project's AVX-512 BF16 CPU: weight-only 1.4-2.4x faster at 1-4 rows, the
# dynamic int8 GEMM faster at 16)
FEW_ROWS = 4
PROBE_ROWS = (1, 2, 4, 8, 16)
# the head: weight-only at every row count (quant.choose_kernels says why); its
# rows are independent (checked bit for bit in tests/test_quant.py)
HEAD_ROWS = 1 << 62


def weight_only_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def _best_time(fn: Callable[[], object], reps: int = 3, calls: int = 5) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t)
    return best


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


def probe_few_rows(weight: torch.Tensor, scale: torch.Tensor,
                   cache: dict[tuple[int, int], int] | None = None) -> int:
    """The largest row count of PROBE_ROWS up to which the weight-only kernel beat
    the dynamic one at every count, timed on this CPU (best of 3 x 5 calls each);
    cached in `cache` per weight shape (a stage's layers share their shapes)."""
    key = tuple(weight.shape)
    if cache is not None and key in cache:
        return cache[key]
    scale_bf16 = scale.to(torch.bfloat16)
    few = 0
    for rows in PROBE_ROWS:
        x = torch.randn(rows, weight.shape[1])
        xb = x.to(torch.bfloat16)
        wo = _best_time(lambda: torch._weight_int8pack_mm(xb, weight, scale_bf16))
        dyn = _best_time(lambda: int8_matmul(x, weight, scale))
        if wo >= dyn:
            break
        few = rows
    if cache is not None:
        cache[key] = few
    return few
