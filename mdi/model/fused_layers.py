"""A decoder block's forward through the fused kernels (fused_ops.py), for
float32 or bfloat16 CPU inference: the same layers, weights and GEMMs as
Block.forward, with the operations between the GEMMs one kernel each.

Per block of a decode step: the input norm, RoPE and the cache write together,
attention over the cache, the residual add with the second norm, SwiGLU's
gate, the last residual add (the int4, int8 and bfloat16 products of few rows
are the kernels' too, in their layers' forward). Where every piece of a decode
step's layer has its kernel, the layer is one call (csrc/layer_ops.cpp: the same
kernels in the same order, without ~80 us of Python between them). A piece whose
kernel does not apply falls back to the layers' own code: LayerNorm (GPT-2),
other activations, a cache that stores another dtype (--kv-dtype) or computes
its own writes (a compiled step's buffers), a packed prefill's rows. A prefill
attends with scaled_dot_product_attention, whose blocked kernel is faster for
many queries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import int4
from .cache import KVCache
from .kernels import GEMM_DTYPE
from .kept import kept
from .layers import (Block, CachedStep, CausalSelfAttention, LinearMode, RMSNorm, cached_attention,
                     linear, reads_rows, rope_cos_sin)
from .packed import packed_attention
from .quant import Int8Linear

# a decode step's layer as one call (csrc/layer_ops.cpp) where it applies; tests and
# benchmarks turn it off to compare with the calls one by one
LAYER_KERNEL = True


def step_rope(inv_freq: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, hs) of one step, for the kernels' rotation (built once per forward)."""
    cos, sin = rope_cos_sin(inv_freq, input_pos, torch.float32)  # (B, 1, T, hs)
    return cos[:, 0].contiguous(), sin[:, 0].contiguous()


def reads_bf16(layer: torch.nn.Module, rows: int) -> bool:
    """Does the linear take bfloat16 activations and give bfloat16 back, so that the
    kernels around it can write and read bfloat16 with the same bits as its own casts
    (an int8 layer's bfloat16 GEMM of many rows; no bias, which it adds after its
    output is widened to float32)? Not an int4 layer, nor an int8 one of few rows:
    with the kernels loaded their own products read float32 (csrc/rows_ops.cpp)."""
    if isinstance(layer, Int8Linear):
        return (layer.bias is None and not layer.refine and rows > layer.few_rows
                and rows >= layer.many_rows and GEMM_DTYPE == torch.bfloat16)
    return False


def float_weight(m: torch.nn.Module) -> torch.Tensor:
    """A norm's weight in float32, the kernels' operand: the weight itself, or a
    float32 copy kept on the module until the weight changes."""
    w = m.weight
    return w if w.dtype == torch.float32 else kept(m, "_mdi_w32", w, lambda t: t.detach().float())


def norm(ops, m: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """m(x), in bfloat16 with bf16 (a bfloat16 model, or a linear that reads_bf16)."""
    if isinstance(m, RMSNorm) and x.is_contiguous():
        return ops.rms_norm(x, float_weight(m), m.eps, bf16)
    y = m.forward(x)
    return y.to(torch.bfloat16) if bf16 and x.dtype != torch.bfloat16 else y


def _writes_plainly(cache: KVCache, layer: int) -> bool:
    """Does the cache store float32 or bfloat16 keys and values with KVCache's own update?"""
    return (type(cache).update is KVCache.update
            and cache.kv[layer].dtype in (torch.float32, torch.bfloat16))


def wants_bf16(layer: torch.nn.Module, x: torch.Tensor, rows: int) -> bool:
    """Is the input of `layer` bfloat16: a bfloat16 model's, or an int8 GEMM's?"""
    return x.dtype == torch.bfloat16 or reads_bf16(layer, rows)


def attention(ops, a: CausalSelfAttention, x: torch.Tensor, step: CachedStep | None,
              cache: KVCache | None, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
              mode: LinearMode, bf16: bool, act: torch.dtype) -> torch.Tensor:
    """The attention's output projection of x (the normed input); bf16: its input is
    bfloat16; act: the model's activation dtype (a prefill's attention runs in it)."""
    B, T, _ = x.shape
    nh, nkv, hs = a.n_head, a.n_kv_head, a.hs
    qkv = linear(a.c_attn, x, mode).view(B, T, nh + 2 * nkv, hs)
    cos, sin = rope if rope is not None else (None, None)
    gqa = nkv != nh
    if cache is not None and step.packed is None and _writes_plainly(cache, layer):
        pos = step.input_pos if step.input_pos.is_contiguous() else step.input_pos.contiguous()
        qkv = ops.rope_write(qkv, cos, sin, pos, cache.kv[layer], nh, nkv)  # float32
        if T == 1:  # a decode step: each row against its own positions
            y = ops.cache_attention(qkv, cache.kv[layer], pos, nh, nkv, hs ** -0.5, bf16)
            return linear(a.c_proj, y, mode)
        y = cached_attention(qkv[:, :, :nh].to(act), cache.k[layer], cache.v[layer], step, gqa)
    else:
        if cos is not None or qkv.dtype != torch.float32:
            qkv = ops.rope_write(qkv, cos, sin, None, None, nh, nkv)  # rotation only, float32
        if cache is None:
            q, k, v = qkv.transpose(1, 2).split((nh, nkv, nkv), dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=gqa).transpose(1, 2)
        elif step.packed is not None:
            y = packed_attention(qkv, cache, layer, step.packed, nh, gqa)
        else:
            kv = qkv[:, :, nh:].view(B, T, 2, nkv, hs).permute(2, 0, 3, 1, 4)
            k, v = cache.update(layer, step.input_pos, kv, step.start)
            y = cached_attention(qkv[:, :, :nh], k, v, step, gqa)
    y = y.reshape(B, T, nh * hs)
    return linear(a.c_proj, y.to(torch.bfloat16) if bf16 else y, mode)


def _linear_operands(m: torch.nn.Module, x: torch.Tensor, mode: LinearMode) -> tuple | None:
    """(kind, group, weight, scales, bias) of a linear that the layer kernel computes as
    its own forward does on the rows of x (B, 1, C) (the same kernel: int4_mm at any
    rows, int8_mm up to few_rows, bf16_mm as layers.linear picks it), or None."""
    rows = x.shape[0]
    if isinstance(m, int4.Int4Linear):
        return None if int4.PACKED_LAYOUT is None else (0, m.group, m.weight,
                                                         m.scales_and_zeros, m.bias)
    if isinstance(m, Int8Linear):
        return (1, 0, m.weight, m.scale, m.bias) if m.own_kernel(rows) else None
    if type(m) is torch.nn.Linear and mode != "per_row" and reads_rows(m, x, rows):
        return (2, 0, m.weight, None, m.bias)
    return None


def layer_operands(block: Block, x: torch.Tensor, mode: LinearMode) -> tuple | None:
    """decode_layer's operands after (x, pos, cos, sin, kv) for a decode step (one
    position per row) of a block whose pieces it computes as block_forward would:
    RMSNorms, SwiGLU, and four linears it reads (_linear_operands); else None."""
    attn, m = block.attn, block.mlp
    ln_1, ln_2 = block.ln_1, block.ln_2
    if not (type(ln_1) is RMSNorm and type(ln_2) is RMSNorm and m.swiglu):
        return None
    linears, meta = [], [attn.n_head, attn.n_kv_head, int4.PACKED_LAYOUT or 0]
    for lin in (attn.c_attn, attn.c_proj, m.c_fc, m.c_proj):
        got = _linear_operands(lin, x, mode)
        if got is None:
            return None
        meta += got[:2]
        linears += got[2:]
    return (float_weight(ln_1), float_weight(ln_2), linears, meta,
            [ln_1.eps, ln_2.eps, attn.hs ** -0.5])


def block_forward(ops, block: Block, x: torch.Tensor, step: CachedStep | None,
                  cache: KVCache | None, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                  mode: LinearMode) -> torch.Tensor:
    """Block.forward's result (within the kernels' rounding) through the kernels.
    Around a linear that reads bfloat16 (reads_bf16) the kernels write its bfloat16
    input and read its bfloat16 output themselves: the same bits as its own casts,
    without them. A decode step's layer whose pieces all have kernels is one call
    (layer_operands; the same kernels in the same order)."""
    if (LAYER_KERNEL and rope is not None and x.shape[1] == 1 and cache is not None
            and step.packed is None and x.is_contiguous() and _writes_plainly(cache, layer)):
        operands = layer_operands(block, x, mode)
        if operands is not None:
            pos = step.input_pos if step.input_pos.is_contiguous() else step.input_pos.contiguous()
            return ops.decode_layer(x, pos, rope[0], rope[1], cache.kv[layer], *operands)
    rows = x.shape[0] * x.shape[1]
    attn, m = block.attn, block.mlp
    h = norm(ops, block.ln_1, x, wants_bf16(attn.c_attn, x, rows))
    a = attention(ops, attn, h, step, cache, layer, rope, mode, wants_bf16(attn.c_proj, x, rows),
                  x.dtype)
    ln_2 = block.ln_2
    fc16 = wants_bf16(m.c_fc, x, rows)
    if isinstance(ln_2, RMSNorm) and a.shape == x.shape and x.is_contiguous() and a.is_contiguous():
        x, h = ops.add_rms_norm(x, a, float_weight(ln_2), ln_2.eps, fc16)
    else:
        x = residual(x, a)
        h = norm(ops, ln_2, x, fc16)
    h = linear(m.c_fc, h, mode)
    if m.swiglu and h.is_contiguous():
        h = ops.silu_mul(h, wants_bf16(m.c_proj, x, rows))
    elif m.swiglu:
        h = F.silu(h[..., :m.width]) * h[..., m.width:]
    else:
        h = m.act(h.to(x.dtype))
    return residual(x, linear(m.c_proj, h, mode))


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y in x's dtype (a bfloat16 y widens exactly into a float32 sum)."""
    return x + (y if y.dtype == x.dtype or x.dtype == torch.float32 else y.to(x.dtype))
