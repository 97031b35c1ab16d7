"""Weights quantized and packed a block of rows at a time, so that a load's peak
stays one tensor and a block's temporaries (not a whole head's int32 codes or a
whole float32 copy of a bfloat16 embedding), equal the whole-tensor results."""
import pytest
import torch

from mdi.model import int4
from mdi.model.int4 import INNER_K_TILES, Int4Linear, Int4Weight, int4_kernel_available

from mdi.model import quant
from mdi.model.quant import quantize_rows

needs_int4 = pytest.mark.skipif(not int4_kernel_available(), reason="torch has no CPU int4 kernel")


def test_int8_rows_rounded_to_the_run_dtype_piece_by_piece(monkeypatch):
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(quant, "ROWS_AT_ONCE", 64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, s = quantize_rows(w, dtype)
        q0, s0 = quantize_rows(w.to(dtype))
        assert torch.equal(q, q0) and torch.equal(s, s0)
    q, s = quantize_rows(w.to(torch.bfloat16), torch.float32)  # widening changes nothing
    assert torch.equal(q, quantize_rows(w.to(torch.bfloat16))[0])


@needs_int4
@pytest.mark.parametrize("rows", [64, 128])
def test_packing_in_pieces_equals_one_call(monkeypatch, rows):
    N, K, group = 5 * 64 + 16, 256, 32  # a last piece shorter than the others
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    w = Int4Weight(codes, torch.rand(N, K // group, generator=g),
                   torch.randn(N, K // group, generator=g), group)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)
    monkeypatch.setattr(int4, "PACK_ROWS", rows)
    layer = Int4Linear.from_weight(w)
    assert torch.equal(layer.weight, whole)
    x = torch.randn(3, K, generator=g)
    ref = (codes.float() - 8).view(N, K // group, group) * w.scale[..., None] + w.zero[..., None]
    got = layer(x)
    assert torch.allclose(got, x @ ref.view(N, K).t(), rtol=0.05, atol=0.5)


@needs_int4
def test_from_float_equals_quantizing_the_whole_tensor(monkeypatch):
    N, K, group = 3 * 64 + 16, 128, 32
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = Int4Linear.from_weight(int4.quantize_groups(w, group))
    monkeypatch.setattr(int4, "PACK_ROWS", 64)
    pieces = Int4Linear.from_float(w, group)
    assert torch.equal(pieces.weight, whole.weight)
    assert torch.equal(pieces.scales_and_zeros, whole.scales_and_zeros)
