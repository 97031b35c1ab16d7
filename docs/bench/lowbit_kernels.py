"""mdi's int4 and int8 products (model/csrc/lowbit_ops.cpp, rows_ops.cpp) against torch's
weight-only kernels on the same stored weights: SmolLM2-135M's 120 block matrices,
COPIES distinct copies (so a pass reads them from L3 or memory, as a decode step
does), at 1-16 rows; and the int8 head (49152 x 576) at one row.

    python docs/bench/lowbit_kernels.py [COPIES]

Prints ms per pass, best of 7, mdi's / torch's, with the two threads torch uses
by default here. `ATEN_CPU_CAPABILITY=avx2` makes torch run as on an AVX2 CPU: its
AVX2 kernels, its AVX2 packing of the int4 codes, and mdi's library built for AVX2.
"""
import sys
import time

import torch

from mdi.model import fused_ops
from mdi.model.int4 import Int4Linear, packed_layout
from mdi.model.quant import quantize_rows

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of a SmolLM2 block


def best(f, n: int = 7) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ops = fused_ops.ops()
    if ops is None:
        sys.exit("mdi's kernels did not build here")
    copies = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    layout = packed_layout()  # torch's packing on this CPU (capability)
    if layout is None:
        sys.exit("torch packs int4 codes here in a layout mdi's kernel does not read")
    torch.manual_seed(0)
    layers = [Int4Linear.from_float(torch.randn(n, k) * 0.02, 32)
              for _ in range(copies) for n, k in SHAPES]
    mb = sum(m.weight.numel() + 2 * m.scales_and_zeros.numel() for m in layers) / 1e6
    print(f"int4: {len(layers)} matrices, {mb:.0f} MB; ms per pass, mdi / torch")
    for rows in (1, 2, 4, 8, 16):
        x = {k: torch.randn(rows, k) for k in (576, 1536)}
        xb = {k: v.bfloat16() for k, v in x.items()}
        mine = best(lambda: [ops.int4_mm(x[m.in_features], m.weight, m.scales_and_zeros, 32,
                                         layout) for m in layers])
        theirs = best(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb[m.in_features], m.weight, 32, m.scales_and_zeros) for m in layers])
        print(f"  {rows:2d} rows: {mine:7.2f} / {theirs:7.2f}  ({mb / mine:.1f} GB/s mdi)")
    q, scale = quantize_rows(torch.randn(49152, 576) * 0.02)
    sb = scale.bfloat16()
    x = torch.randn(1, 576)
    mine = best(lambda: ops.int8_mm(x, q, scale), 20)
    theirs = best(lambda: torch._weight_int8pack_mm(x.bfloat16(), q, sb), 20)
    print(f"int8 head 49152 x 576, 1 row: {mine:.2f} / {theirs:.2f} ms")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
