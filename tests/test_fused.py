"""The fused decoder layers (one q|k|v GEMM, one gate|up GEMM, RoPE on q and k
at once from a per-step table, one cache write per layer, decode attention as two
batched matmuls) against the unfused maths written out here: bit for bit where
the operations are the same, within 1e-5 where the order of sums differs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdi.generate import step
from mdi.model import GPT, GPTConfig
from mdi.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, rope_table

FAMILIES = {
    "gpt2": GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32),
    "llama": GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       intermediate_size=48, tie_embeddings=False, rope_theta=500.0),
    "qwen2": GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=1,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       qkv_bias=True, intermediate_size=40, layer_norm_eps=1e-6),
    "mistral": GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32,
                         n_kv_head=2, head_dim=16, norm="rmsnorm", positions="rope",
                         activation="swiglu", bias=False, intermediate_size=48),
}


def old_rmsnorm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * x.to(dtype)


def old_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return old_rmsnorm(m, x) if isinstance(m, RMSNorm) else m(x)


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the whole model, unfused: separate q, k, v and gate, up projections
    (slices of the fused weights), each head's keys repeated for its query group."""
    c = model.config
    B, T = idx.shape
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    pos = torch.arange(T).expand(B, T)
    x = model.transformer.wte(idx)
    if c.positions == "learned":
        x = x + model.transformer.wpe(pos)
    rope = rope_cos_sin(rope_inv_freq(c), pos, x.dtype) if c.positions == "rope" else None
    for block in model.transformer.h.values():
        a = block.attn
        h = norm(block.ln_1, x)
        ws = a.c_attn.weight.split((nh * hs, nkv * hs, nkv * hs))
        bs = a.c_attn.bias.split((nh * hs, nkv * hs, nkv * hs)) if a.c_attn.bias is not None \
            else (None,) * 3
        q, k, v = (F.linear(h, w, b).view(B, T, -1, hs).transpose(1, 2) for w, b in zip(ws, bs))
        if rope is not None:
            q, k = old_rope(q, *rope), old_rope(k, *rope)
        k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, nh * hs))
        h = norm(block.ln_2, x)
        m = block.mlp
        if m.swiglu:
            gate, up = m.c_fc.weight.split(m.width)
            h = F.silu(F.linear(h, gate)) * F.linear(h, up)
        else:
            h = m.act(m.c_fc(h))
        x = x + m.c_proj(h)
    return model.lm_head(norm(model.transformer.ln_f, x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_model_equals_the_unfused_reference(family, make_model):
    model = make_model(FAMILIES[family], seed=3)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_forward(model, idx)
        torch.testing.assert_close(model(idx), ref, atol=1e-5, rtol=0)
        # cached: a prefill of 8, then decode steps, rows at one position
        cache = model.new_cache(2)
        for b in range(2):
            step.prefill(model, cache, b, idx[b, :8].tolist())
        for t in range(8, 12):
            out = step.decode(model, cache, idx[:, t].tolist(), [t, t])
            torch.testing.assert_close(out, ref[:, t], atol=1e-5, rtol=0)


def test_rmsnorm_is_bit_for_bit_the_old_formula():
    n = RMSNorm(48, 1e-6)
    with torch.no_grad():
        n.weight.normal_()
    x = torch.randn(3, 5, 48) * 3
    assert torch.equal(n(x), old_rmsnorm(n, x))
    xb = x.bfloat16()
    assert torch.equal(n.to(torch.bfloat16)(xb), old_rmsnorm(n, xb))


def test_rope_table_rotates_q_and_k_bit_for_bit_and_keeps_v():
    c = FAMILIES["llama"]
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    pos = torch.tensor([[3, 4, 5], [7, 8, 9]])
    qkv = torch.randn(2, 3, nh + 2 * nkv, hs)
    cos, sin = rope_cos_sin(rope_inv_freq(c), pos, torch.float32)   # (B, 1, T, hs)
    out = apply_rope(qkv, *rope_table(rope_inv_freq(c), pos, torch.float32, nh + nkv, nkv))
    want = old_rope(qkv[:, :, :nh + nkv].transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.equal(out[:, :, :nh + nkv], want)
    assert torch.equal(out[:, :, nh + nkv:], qkv[:, :, nh + nkv:])


def test_one_cache_write_holds_keys_and_values(make_model):
    model = make_model(FAMILIES["mistral"], seed=0)
    cache = model.new_cache(2)
    with torch.no_grad():
        step.prefill(model, cache, 1, [1, 2, 3])
    assert cache.kv[0].shape == (2, 2, 2, 32, 16)   # (k|v, B, nkv, T_max, hs)
    assert cache.k[0].data_ptr() == cache.kv[0].data_ptr()  # views, no copies
    assert cache.k[0][1, :, :3].abs().sum() > 0 and cache.v[0][1, :, :3].abs().sum() > 0
    assert cache.k[0][0].abs().sum() == 0 and cache.k[0][1, :, 3:].abs().sum() == 0
    assert math.prod(cache.kv[0].shape) * 4 * 2 == cache.nbytes()
