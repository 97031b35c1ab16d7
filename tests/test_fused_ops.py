"""The fused decode kernels (mdi/model/csrc/decode_ops.cpp) against torch's own
operations: each kernel alone, then whole models with and without them. Bit for
bit where the operations are the same (RoPE, the cache write, bfloat16 rounding),
within float32 rounding where the order of a sum differs (norms, attention)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdi.bench.profile import count_decode
from mdi.generate import step
from mdi.model import fused_ops
from mdi.model.cache import KVCache
from mdi.model.fused_layers import float_weight
from mdi.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, rope_table
from mdi.model import GPT, GPTConfig
from mdi.model.quant import configure_stage, quantize_linears

from test_fused import FAMILIES, old_rmsnorm

ops = fused_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the fused kernels did not build here")
gen = torch.Generator().manual_seed(0)


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


@pytest.mark.parametrize("bf16", [False, True])
def test_rms_norm_and_add_rms_norm(bf16):
    n = RMSNorm(80, 1e-6)
    with torch.no_grad():
        n.weight.copy_(randn(80))
    x, y = randn(3, 5, 80, scale=3), randn(3, 5, 80)
    want = old_rmsnorm(n, x).detach()
    got = ops.rms_norm(x, n.weight.detach(), n.eps, bf16)
    assert got.dtype == (torch.bfloat16 if bf16 else torch.float32)
    torch.testing.assert_close(got.float(), want.to(got.dtype).float(), atol=2e-6 if not bf16 else 0.02,
                               rtol=1e-6 if not bf16 else 0.01)
    s, normed = ops.add_rms_norm(x, y, n.weight.detach(), n.eps, bf16)
    assert torch.equal(s, x + y)  # the sum: one rounding, as torch's add
    torch.testing.assert_close(normed.float(), ops.rms_norm(x + y, n.weight.detach(), n.eps, bf16).float(),
                               atol=0, rtol=0)
    # a bfloat16 residual: the sum rounded once, then normed as stored
    s16, _ = ops.add_rms_norm(x.bfloat16(), y.bfloat16(), n.weight.detach(), n.eps, bf16)
    assert torch.equal(s16, x.bfloat16() + y.bfloat16())


def test_bfloat16_outputs_round_as_torch_does():
    x = randn(4, 1000, scale=1e3)
    w = randn(1000)
    assert torch.equal(ops.rms_norm(x, w, 0.0, True), ops.rms_norm(x, w, 0.0, False).bfloat16())
    h = randn(3, 2 * 64, scale=4)
    assert torch.equal(ops.silu_mul(h, True), ops.silu_mul(h, False).bfloat16())
    h[0, 0] = float("nan")  # NaN stays NaN
    assert ops.silu_mul(h, True)[0, 0].isnan()


def test_silu_mul_matches_torch():
    h = randn(2, 3, 2 * 96, scale=6)
    want = F.silu(h[..., :96]) * h[..., 96:]
    torch.testing.assert_close(ops.silu_mul(h, False), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.silu_mul(h.bfloat16(), False),
                               F.silu(h.bfloat16().float()[..., :96]) * h.bfloat16().float()[..., 96:],
                               atol=1e-6, rtol=1e-5)


def test_rope_write_rotates_bit_for_bit_and_writes_the_cache():
    c = FAMILIES["llama"]
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    pos = torch.tensor([[3, 4, 5], [7, 8, 9]])
    qkv = randn(2, 3, nh + 2 * nkv, hs)
    want = apply_rope(qkv, *rope_table(rope_inv_freq(c), pos, torch.float32, nh + nkv, nkv))
    cos, sin = rope_cos_sin(rope_inv_freq(c), pos, torch.float32)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
    assert torch.equal(ops.rope_write(qkv, cos, sin, None, None, nh, nkv), want)
    # rows of a cache (a CacheRows view: strided) written at each row's positions
    whole = KVCache(1, 4, nkv, 16, hs)
    part = whole.rows(1, 3)
    got = ops.rope_write(qkv, cos, sin, pos, part.kv[0], nh, nkv)
    assert torch.equal(got, want)
    for b in range(2):
        for t in range(3):
            p = pos[b, t]
            assert torch.equal(whole.k[0][1 + b, :, p], want[b, t, nh:nh + nkv])
            assert torch.equal(whole.v[0][1 + b, :, p], want[b, t, nh + nkv:])
    written = whole.kv[0].abs().sum(dim=(0, 2, 4))  # (B, T): only the positions given
    assert written.count_nonzero() == 6 and written[0].sum() == 0 and written[3].sum() == 0
    # a bfloat16 cache stores the values rounded once
    c16 = KVCache(1, 2, nkv, 16, hs, dtype=torch.bfloat16)
    ops.rope_write(qkv.bfloat16(), cos, sin, pos, c16.kv[0], nh, nkv)
    want16 = apply_rope(qkv.bfloat16().float(), *rope_table(rope_inv_freq(c), pos, torch.float32,
                                                            nh + nkv, nkv))
    assert torch.equal(c16.k[0][1, :, 8], want16[1, 1, nh:nh + nkv].bfloat16())


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [[3, 0, 17], [300, 5, 1000]])  # > 256: the long path
def test_cache_attention_equals_masked_sdpa(kv_dtype, positions):
    nh, nkv, hs = 6, 2, 32
    B, T_max = len(positions), 1024
    cache = KVCache(1, B, nkv, T_max, hs, dtype=kv_dtype)
    cache.kv[0].copy_(randn(2, B, nkv, T_max, hs).to(kv_dtype))
    qkv = randn(B, 1, nh + 2 * nkv, hs)
    pos = torch.tensor(positions)[:, None]
    got = ops.cache_attention(qkv, cache.kv[0], pos, nh, nkv, hs ** -0.5, False)
    k, v = cache.k[0].float(), cache.v[0].float()
    keys = torch.arange(T_max)
    mask = keys[None, None, None, :] <= pos[:, None, :, None]
    q = qkv[:, :, :nh].transpose(1, 2)  # float32 queries; a bfloat16 cache read back widened
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = want.transpose(1, 2).reshape(B, 1, nh * hs)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    # a row's output depends on its own keys alone
    alone = ops.cache_attention(qkv[1:2], cache.kv[0][:, 1:2], pos[1:2], nh, nkv, hs ** -0.5, False)
    assert torch.equal(alone, got[1:2])
    got16 = ops.cache_attention(qkv, cache.kv[0], pos, nh, nkv, hs ** -0.5, True)
    assert torch.equal(got16, got.bfloat16())


def test_a_nan_in_the_cache_gives_nan_as_torch_does():
    nh, nkv, hs = 4, 2, 16
    cache = KVCache(1, 2, nkv, 512, hs)
    cache.kv[0].copy_(randn(2, 2, nkv, 512, hs))
    cache.k[0][0, 1, 3, 5] = float("nan")  # row 0, kv head 1 (query heads 2, 3), position 3
    for p in (10, 400):  # both paths
        pos = torch.tensor([[p], [p]])
        y = ops.cache_attention(randn(2, 1, nh + 2 * nkv, hs), cache.kv[0], pos, nh, nkv, 0.25, False)
        y = y.view(2, nh, hs)
        assert y[0, 2:].isnan().all() and not y[0, :2].isnan().any() and not y[1].isnan().any()


def test_bad_inputs_name_what_is_wrong():
    qkv, cache = randn(1, 1, 8, 16), KVCache(1, 1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="position 8 is outside the cache's 8 positions"):
        ops.cache_attention(qkv, cache.kv[0], torch.tensor([[8]]), 4, 2, 0.25, False)
    with pytest.raises(RuntimeError, match="rope_write: a cache write needs the positions"):
        ops.rope_write(qkv, None, None, None, cache.kv[0], 4, 2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU tensors only, got Half"):
        ops.silu_mul(randn(2, 4).half(), False)
    with pytest.raises(RuntimeError, match="weight of 16 elements needed"):
        ops.rms_norm(randn(2, 16), torch.ones(15), 1e-5, False)
    with pytest.raises(RuntimeError, match="a contiguous tensor is needed"):
        ops.rms_norm(randn(16, 2).t(), torch.ones(16), 1e-5, False)


def decode_run(model, prompts, n, fused: bool, monkeypatch) -> tuple[list[list[int]], torch.Tensor]:
    if not fused:
        monkeypatch.setitem(fused_ops._state, "ops", None)
    cache = model.new_cache(len(prompts))
    seqs, logits = [list(p) for p in prompts], []
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            step.prefill(model, cache, r, p[:-1])
        for _ in range(n):
            out = step.decode(model, cache, [s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            logits.append(out.float())
            for r, s in enumerate(seqs):
                s.append(int(out[r].argmax()))
    monkeypatch.undo()
    return seqs, torch.stack(logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("weights", ["float32", "int4", "int8"])
def test_fused_decode_equals_torch_operations(family, weights, make_model, monkeypatch):
    """Rows at different positions (their own lengths), a prefill from 0 and a decode
    each step: the same tokens; logits within float32 rounding (float32) or torch's
    low-bit kernels' bfloat16 rounding of their inputs (the fused path's low-bit
    products read float32: tests/test_lowbit_ops.py compares both with the exact sums)."""
    model = make_model(FAMILIES[family], seed=4)
    if weights != "float32":
        quantize_linears(model, weights)
    prompts = [[1, 5, 9, 2, 7], [3, 2], [8, 6, 4, 2, 0, 1, 3, 5, 7]]
    want_tokens, want = decode_run(model, prompts, 10, False, monkeypatch)
    tokens, got = decode_run(model, prompts, 10, True, monkeypatch)
    torch.testing.assert_close(got, want, atol=1e-5 if weights == "float32" else 4e-2, rtol=0)
    assert tokens == want_tokens


def test_bfloat16_model_stays_close_to_float32(make_model, monkeypatch):
    model = make_model(FAMILIES["llama"], seed=5)
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    ref_tokens, ref = decode_run(model, prompts, 6, False, monkeypatch)
    model = model.to(torch.bfloat16)
    tokens, got = decode_run(model, prompts, 6, True, monkeypatch)
    _, unfused = decode_run(model, prompts, 6, False, monkeypatch)
    err, err_unfused = (got - ref).abs().max(), (unfused - ref).abs().max()
    assert err < 0.05 and err <= 2 * err_unfused + 1e-3


def test_norm_weights_of_a_bfloat16_model_are_read_in_float32():
    n = RMSNorm(8, 1e-5).to(torch.bfloat16)
    w = float_weight(n)
    assert w.dtype == torch.float32 and torch.equal(w, n.weight.float())
    assert float_weight(n) is w  # kept while the weight is unchanged
    with torch.no_grad():
        n.weight.mul_(2)
    assert torch.equal(float_weight(n), n.weight.float())


@pytest.mark.parametrize("weights", [None, "int4", "int8"])
def test_a_decode_step_takes_at_most_40_aten_calls_per_layer(weights):
    """Issue 21's count (nested calls included, bench/profile.py), on SmolLM2's widths
    loaded as a run loads it: what a block adds (4 blocks against 2; the embedding and
    the head, ~100 calls a step, are the same in both). torch's own operations took 94
    (float32) and 129 (int4) per layer of the real model's 30."""
    totals = []
    for n_layer in (2, 4):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=n_layer, n_head=9,
                              n_kv_head=3, n_embd=576, intermediate_size=1536, norm="rmsnorm",
                              positions="rope", activation="swiglu", bias=False)).eval()
        configure_stage(model, weights)
        total, names = count_decode(model, 1)
        totals.append(total)
    assert (totals[1] - totals[0]) / 2 <= 40, names.most_common(8)


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MDI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    state: dict = {}
    monkeypatch.setattr(fused_ops, "_state", state)
    monkeypatch.setattr(fused_ops, "_compiler", lambda: [str(tmp_path / "no-such-compiler")])
    assert fused_ops.ops() is None
    assert "fused decode kernels unavailable" in caplog.text
    monkeypatch.setenv("MDI_FUSED_OPS", "0")
    state.clear()
    assert fused_ops.ops() is None


@pytest.mark.slow
def test_a_torn_cached_build_is_built_again(tmp_path):
    """A cached library that does not load (torn, another machine's) is built again, in
    a process of its own (a process loads the kernels' library once)."""
    env = {**os.environ, "MDI_CACHE_DIR": str(tmp_path)}
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from mdi.model import fused_ops; print(fused_ops.library_path()); "
            "print(fused_ops.ops() is not None)")
    path = subprocess.run([sys.executable, "-c", code.replace("print(fused_ops.ops() is not None)", "")],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    Path(path).parent.mkdir(parents=True)
    Path(path).write_bytes(b"not a shared library")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.stdout.split() == [path, "True"], done.stderr[-2000:]
    assert "do not load" in done.stderr and "building the fused decode kernels" in done.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert Path(path).stat().st_mode & 0o777 == 0o755 & ~umask  # others sharing the cache load it


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path):
    """Three processes on a cold cache: one builds, the others wait for it and load it."""
    env = {**os.environ, "MDI_CACHE_DIR": str(tmp_path)}
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from mdi.model import fused_ops; print(fused_ops.ops() is not None)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [o.strip() for o, _ in outs] == ["True"] * 3, [e[-1000:] for _, e in outs]
    assert sum("building the fused decode kernels" in e for _, e in outs) == 1
