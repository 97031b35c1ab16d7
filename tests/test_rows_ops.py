"""mdi's products of weights stored as rows (mdi/model/csrc/rows_ops.cpp): int8 rows
with a scale per output (Int8Linear of few rows) and bfloat16 rows (a bfloat16
Linear's decode), against the exact sums of the weights they store. The vector
loops and the portable loop give the same bits; a row's result never depends on
the rows beside it; a bfloat16 input gets its float32 result rounded once.
(tests/test_lowbit_ops.py builds the library for other CPUs and compares.)"""
from __future__ import annotations

import pytest
import torch

from mdi.model import fused_ops
from mdi.model.kernels import FEW_ROWS
from mdi.model.layers import linear
from mdi.model.quant import quantize_rows

ops = fused_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the fused kernels did not build here")
gen = torch.Generator().manual_seed(0)

SHAPES = [(96, 576), (37, 40), (5, 17), (64, 16), (3, 1536), (130, 96)]


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 6])
def test_int8_mm_equals_the_exact_sums(N, K, rows):
    q, scale = quantize_rows(randn(N, K))
    x = randn(rows, K)
    got = ops.int8_mm(x, q, scale)
    want = x.double() @ (q.double() * scale.double()[:, None]).t()
    torch.testing.assert_close(got.double(), want, atol=2e-6 * K ** 0.5, rtol=1e-5)
    assert torch.equal(got, ops.int8_mm(x, q, scale, True))
    assert torch.equal(got[-1:], ops.int8_mm(x[-1:], q, scale))
    assert torch.equal(ops.int8_mm(x.bfloat16(), q, scale),
                       ops.int8_mm(x.bfloat16().float(), q, scale).bfloat16())


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_bf16_mm_equals_the_exact_sums(N, K, rows):
    w = randn(N, K).bfloat16()
    x = randn(rows, K)
    got = ops.bf16_mm(x, w)
    assert got.dtype == torch.float32
    want = x.double() @ w.double().t()
    torch.testing.assert_close(got.double(), want, atol=2e-6 * K ** 0.5, rtol=1e-5)
    assert torch.equal(got, ops.bf16_mm(x, w, portable=True))  # the portable loop: same bits
    assert torch.equal(got[1:2], ops.bf16_mm(x[1:2], w)) or rows == 1  # rows independent
    xb = x.bfloat16()  # a bfloat16 input: widened exactly, the sum rounded once
    got_b = ops.bf16_mm(xb, w)
    assert got_b.dtype == torch.bfloat16
    assert torch.equal(got_b, ops.bf16_mm(xb.float(), w).bfloat16())
    b = randn(N).bfloat16()  # a bias: added to the float32 sums, before that one rounding
    with_bias = ops.bf16_mm(x, w, b)
    assert torch.equal(with_bias, got + b.float())
    assert torch.equal(ops.bf16_mm(x, w, b, portable=True), with_bias)
    assert torch.equal(ops.bf16_mm(xb, w, b), ops.bf16_mm(xb.float(), w, b).bfloat16())


def test_a_bfloat16_output_is_the_exact_sum_rounded_once():
    """Each output, its bias included, within half a bfloat16 step of the exact sum
    (float32's error on top is ~1e-6 of it; a bias added after a first rounding was
    off by more for a fifth of them), level with torch's bfloat16 product."""
    w, x, b = randn(512, 1536).bfloat16(), randn(3, 1536).bfloat16(), (randn(512) * 50).bfloat16()
    for bias in (None, b):
        exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        got = ops.bf16_mm(x, w, bias).double()
        assert ((got - exact).abs() <= exact.abs() * 2.0 ** -8 * 1.001 + 1e-6).all()  # half a step
        want = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
        torch.testing.assert_close(got, want.double(), atol=0.02, rtol=0.01)


def test_bad_inputs_name_what_is_wrong():
    w = randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16 weight \\(N, K\\) contiguous"):
        ops.bf16_mm(randn(1, 16), w.float())
    with pytest.raises(RuntimeError, match="bfloat16 weight \\(N, K\\) contiguous"):
        ops.bf16_mm(randn(1, 8), w.t())
    with pytest.raises(RuntimeError, match="activations \\(rows, 16\\)"):
        ops.bf16_mm(randn(1, 8), w)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.bf16_mm(randn(1, 16).half(), w)
    with pytest.raises(RuntimeError, match="a bfloat16 bias \\(8\\)"):
        ops.bf16_mm(randn(1, 16), w, randn(8))
    with pytest.raises(RuntimeError, match="a bfloat16 bias \\(8\\)"):
        ops.bf16_mm(randn(1, 16), w, randn(4).bfloat16())
    q, scale = quantize_rows(randn(8, 16))
    with pytest.raises(RuntimeError, match="float32 scales \\(8\\)"):
        ops.int8_mm(randn(1, 16), q, scale[:4])
    with pytest.raises(RuntimeError, match="int8 weight"):
        ops.int8_mm(randn(1, 16), q.float(), scale)


def test_a_bfloat16_linear_decodes_with_the_kernel():
    """Up to FEW_ROWS rows (a decode step) the kernel's bits, the bias added before its
    one rounding; more rows, a float32 layer or autograd: torch's product."""
    layer = torch.nn.Linear(64, 48).bfloat16()
    x = randn(2, 3, 64).bfloat16()
    with torch.no_grad():
        y = linear(layer, x)
        want = ops.bf16_mm(x.view(6, 64), layer.weight, layer.bias)
        assert torch.equal(y, want.view(2, 3, 48))
        many = randn(1, FEW_ROWS + 1, 64).bfloat16()
        assert torch.equal(linear(layer, many), torch.nn.functional.linear(many, layer.weight,
                                                                           layer.bias))
        f32 = torch.nn.Linear(64, 48)
        assert torch.equal(linear(f32, x.float()), f32(x.float()))
    with torch.enable_grad():
        assert torch.equal(linear(layer, x), layer(x))
