"""mdi's int4 products (mdi/model/csrc/lowbit_ops.cpp) and int8 products of few rows
(rows_ops.cpp; tests/test_rows_ops.py has their sums and bfloat16's) against the
exact sums of the weights they store: the packed int4 codes are unpacked here
by the layout's own rule, independently of the kernel. The vector loops (AVX-512
or AVX2, whichever this machine built) and the portable loop give the same bits;
a row's result never depends on the rows beside it."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from mdi.model import fused_ops
from mdi.model.int4 import Int4Linear, packed_layout
from mdi.model.quant import Int8Linear, configure_stage, quantize_rows

from test_fused import FAMILIES
from test_fused_ops import decode_run

ops = fused_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the fused kernels did not build here")
gen = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def unpack_int4(lin: Int4Linear) -> torch.Tensor:
    """The float64 weight (N, K) an Int4Linear holds, read from torch's packed layout
    (`packed_layout`: blocks of 64 or 32 outputs, per input k half as many bytes,
    byte j holding outputs j (low nibble) and j + 32 or j + 16 (high); or blocks of
    32 in pairs, byte j holding outputs 2j and 2j + 1; the last N % block outputs
    per k in pairs)."""
    N, K, g = lin.out_features, lin.in_features, lin.group
    layout = packed_layout()
    bw = layout or 32
    p = lin.weight.flatten().to(torch.int64)
    codes = torch.empty(N, K, dtype=torch.int64)
    full = N // bw * bw
    if full:
        b = p[:full * K // 2].view(N // bw, K, bw // 2)
        if layout:
            codes[:full] = torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(full, K)
        else:
            codes[:full] = torch.stack([b & 15, b >> 4], dim=3).reshape(N // bw, K, bw) \
                .permute(0, 2, 1).reshape(full, K)
    if N > full:
        b = p[full * K // 2:].view(K, (N - full) // 2)
        codes[full:] = torch.stack([b & 15, b >> 4], dim=2).reshape(K, N - full).t()
    sz = lin.scales_and_zeros.double()  # (K / g, N, 2)
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (N, K / g)
    w = (codes.double() - 8).view(N, K // g, g) * scale[..., None] + zero[..., None]
    return w.view(N, K)


def int4_mm(x, lin, **kw):
    """mdi's product of x and an Int4Linear's weight, for this process's packing."""
    return ops.int4_mm(x, lin.weight, lin.scales_and_zeros, lin.group, packed_layout(), **kw)


def test_the_unpacking_here_reads_torchs_layout():
    """The layout rule above, checked against torch's own kernel (bfloat16 activations:
    exact for an identity matrix; the bfloat16 output rounds)."""
    assert packed_layout() in (64, 32, 0)
    for N in (64, 48, 96, 112, 960):
        lin = Int4Linear.from_float(randn(N, 64), 32)
        eye = torch.eye(64, dtype=torch.bfloat16)
        torch_w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, lin.weight, 32,
                                                              lin.scales_and_zeros).double().t()
        torch.testing.assert_close(torch_w, unpack_int4(lin), atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("N,K,group", [(960, 576, 32), (128, 128, 64), (576, 256, 128),
                                       (80, 64, 32), (48, 32, 32), (16, 64, 64), (112, 64, 32)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_int4_mm_equals_the_exact_sums(N, K, group, rows):
    lin = Int4Linear.from_float(randn(N, K), group)
    x = randn(rows, K)
    got = int4_mm(x, lin)
    want = x.double() @ unpack_int4(lin).t()
    assert got.dtype == torch.float32 and got.shape == (rows, N)
    torch.testing.assert_close(got.double(), want, atol=2e-5 * K ** 0.5, rtol=1e-5)
    # the vector loop and the portable one: the same bits
    assert torch.equal(got, int4_mm(x, lin, portable=True))
    # each row on its own: the same bits as in the batch
    for r in (0, rows - 1):
        assert torch.equal(got[r:r + 1], int4_mm(x[r:r + 1], lin))
    # bfloat16 activations: widened, computed alike, the result rounded once
    xb = x.bfloat16()
    assert torch.equal(int4_mm(xb, lin),
                       int4_mm(xb.float(), lin).bfloat16())


def test_bad_inputs_name_what_is_wrong():
    lin = Int4Linear.from_float(randn(64, 64), 32)
    w, sz = lin.weight, lin.scales_and_zeros
    with pytest.raises(RuntimeError, match="activations \\(rows, 64\\)"):
        ops.int4_mm(randn(2, 32), w, sz, 32, 64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int4_mm(randn(2, 64).double(), w, sz, 32, 64)
    with pytest.raises(RuntimeError, match="group 24 does not divide"):
        ops.int4_mm(randn(2, 64), w, sz, 24, 64)
    with pytest.raises(RuntimeError, match="scales and zeros"):
        ops.int4_mm(randn(2, 64), w, sz[:1], 32, 64)
    with pytest.raises(RuntimeError, match="packed uint8 codes"):
        ops.int4_mm(randn(2, 64), w.to(torch.int8), sz, 32, 64)
    with pytest.raises(RuntimeError, match="layout 16 is not one of torch's packings"):
        ops.int4_mm(randn(2, 64), w, sz, 32, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.int4_mm(randn(64, 2).t(), w, sz, 32, 64)
    q, scale = quantize_rows(randn(8, 16))
    with pytest.raises(RuntimeError, match="float32 scales \\(8\\)"):
        ops.int8_mm(randn(1, 16), q, scale[:4])
    with pytest.raises(RuntimeError, match="int8 weight"):
        ops.int8_mm(randn(1, 16), q.float(), scale)


def test_the_layers_compute_with_the_kernels_where_they_apply():
    """Int4Linear on every row count, Int8Linear up to its few_rows: the kernels' bits
    (+ bias); under autograd torch's kernels (bfloat16 activations) instead."""
    lin = Int4Linear.from_float(randn(64, 64), 32, bias=randn(64))
    x = randn(2, 3, 64)
    with torch.no_grad():
        y = lin(x)
    want = int4_mm(x.view(6, 64), lin) + lin.bias
    assert torch.equal(y, want.view(2, 3, 64))
    with torch.enable_grad():
        assert not torch.equal(lin(x), y)  # torch's kernel: bfloat16 activations
    many = randn(130, 64)  # a prefill's rows: the same kernel
    with torch.no_grad():
        assert torch.equal(lin(many), int4_mm(many, lin) + lin.bias)
    layer = torch.nn.Linear(40, 24)
    q8 = Int8Linear.from_linear(layer)
    q8.few_rows = 4
    with torch.no_grad():
        assert torch.equal(q8(x[:1, :, :40].contiguous()),
                           (ops.int8_mm(x[0, :, :40].contiguous(), q8.weight, q8.scale)
                            + q8.bias).view(1, 3, 24))
        many = q8(randn(5, 40))  # more than few_rows: not the kernel's float32 sums
    assert many.shape == (5, 24)


def dequantized(model):
    """The model with every low-bit linear replaced by a float32 one of the weight it holds."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (Int4Linear, Int8Linear)):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(unpack_int4(m) if isinstance(m, Int4Linear)
                                   else m.dequantized())
                if m.bias is not None:
                    dense.bias.copy_(m.bias)
            model.set_submodule(name, dense)
    return model


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_low_bit_decode_is_closer_to_its_weights_exact_sums(weights, make_model, monkeypatch):
    """A low-bit model decoding with the kernels (float32 activations) is within float32
    rounding of the same weights held in float32, and closer to it than torch's kernels
    (bfloat16 activations)."""
    model = make_model(FAMILIES["llama"], seed=6)
    configure_stage(model, weights)
    exact = dequantized(copy.deepcopy(model))
    prompts = [[1, 5, 9, 2, 7], [3, 2]]
    want = decode_run(exact, prompts, 6, False, monkeypatch)[1]  # torch's operations
    unfused = decode_run(model, prompts, 6, False, monkeypatch)[1]
    got = decode_run(model, prompts, 6, True, monkeypatch)[1]
    err, err_torch = (got - want).abs().max().item(), (unfused - want).abs().max().item()
    assert err < 1e-4 and err < err_torch / 10, (err, err_torch)


CROSS = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from mdi.model.int4 import Int4Linear, packed_layout
from mdi.model.quant import quantize_rows
outs = []
int4s, int8s, bf16s = torch.load(sys.argv[3], weights_only=True)  # (randn differs by capability)
for w, x in int4s:
    lin = Int4Linear.from_float(w, 32)  # packed by this process's capability
    outs.append(torch.ops.mdi_fused.int4_mm(x, lin.weight, lin.scales_and_zeros, 32,
                                            packed_layout()))
for w, x in int8s:
    q, s = quantize_rows(w)
    outs.append(torch.ops.mdi_fused.int8_mm(x, q, s))
for w, x in bf16s:
    b = w[:, 0].contiguous()
    outs += [torch.ops.mdi_fused.bf16_mm(x, w), torch.ops.mdi_fused.bf16_mm(x.bfloat16(), w, b)]
torch.save((packed_layout(), outs), sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")),
                    reason="the AVX2 build needs an AVX2 CPU to run")
def test_builds_for_other_cpus_give_the_same_bits(tmp_path, monkeypatch):
    """The library built as for an AVX2 CPU and as for one without vector extensions,
    each in a process whose torch runs (and packs int4 codes) as on such a CPU,
    computes the same bits as this machine's build: a ring of different CPUs agrees."""
    inputs = tmp_path / "inputs.pt"
    torch.save(([(randn(n, k), randn(5, k)) for n, k in [(960, 576), (80, 64), (112, 64)]],
                [(randn(n, k), randn(5, k)) for n, k in [(96, 576), (37, 40), (21, 96)]],
                [(randn(n, k).bfloat16(), randn(5, k)) for n, k in [(96, 576), (37, 40), (22, 48)]]),
               inputs)
    results, layouts = [], []
    for name, flags, cap in (("native", None, None), ("avx2", ["-mavx2", "-mfma"], "avx2"),
                             ("plain", [], "default")):
        lib = fused_ops.library_path() if flags is None else tmp_path / f"{name}.so"
        if flags is not None:
            monkeypatch.setattr(fused_ops, "_vector_flags", lambda flags=flags: flags)
            fused_ops.build(lib)
        out = tmp_path / f"{name}.pt"
        env = {**os.environ, **({"ATEN_CPU_CAPABILITY": cap} if cap else {})}
        subprocess.run([sys.executable, "-c", CROSS, str(lib), str(out), str(inputs)],
                       check=True, timeout=300, env=env)
        layout, outs = torch.load(out, weights_only=True)
        layouts.append(layout)
        results.append(outs)
    assert layouts[1:] == [32, 0]  # torch's own packing differs by capability
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
