"""The decoder's pieces, each selected by GPTConfig: norms, rotary positions,
attention (multi-head or grouped-query), MLPs (GELU, ReLU, SwiGLU).

Parameter names keep nanoGPT's (`ln_1`, `attn.c_attn`, `attn.c_proj`,
`mlp.c_fc`, `mlp.c_proj`) for every architecture: Llama's q/k/v projections
are stored fused in `c_attn` (rows: q heads, then k heads, then v heads) and
SwiGLU's gate and up projections fused in `c_fc` (rows: gate, then up), so one
GEMM does the work of two or three and the stage layout is one for all.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .config import GPTConfig


def linear(layer: nn.Linear, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """`layer(x)`; with per_row, one GEMM per batch row so results are batch-invariant."""
    if not per_row:
        return layer(x)
    w = layer.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, C_in, C_out)
    y = torch.bmm(x, w)
    return y if layer.bias is None else y + layer.bias


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias_of("norm"))


def rope_inv_freq(config: GPTConfig) -> torch.Tensor:
    """(hs/2,) float32 inverse frequencies, with the config's scaling (as in HF)."""
    hs = config.head_size
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if config.rope_scaling == "linear":
        inv = inv / config.rope_factor
    elif config.rope_scaling == "llama3":
        factor, old = config.rope_factor, config.rope_original_max_len
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)  # long waves: slowed down
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, input_pos: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, hs) for positions input_pos (B, T); rows may differ."""
    freqs = input_pos[..., None].float() * inv_freq.float()  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]        # (B, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face's layout, so its q/k weights load unpermuted)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.kv_heads, config.head_size
        q_size, kv_size = self.n_head * self.hs, self.n_kv_head * self.hs
        self.sizes = (q_size, kv_size, kv_size)
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.bias_of("qkv"))
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias_of("attn_proj"))
        self.rope = config.positions == "rope"
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        per_row = cache is not None
        q, k, v = linear(self.c_attn, x, per_row).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               enable_gqa=gqa)
        else:
            k, v = cache.update(layer, input_pos, k, v)  # (B, nkv, T_max, hs)
            # Query t of row b sees keys at positions <= input_pos[b, t]. Stale
            # entries past a sample's position (after a reset) stay masked.
            key_pos = torch.arange(cache.max_len, device=x.device)
            mask = key_pos[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, T_max)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)
        return self.resid_dropout(linear(self.c_proj, y, per_row))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        width = config.mlp_size
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width,
                              bias=config.bias_of("mlp"))
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                    "relu": nn.ReLU(), "swiglu": nn.SiLU()}[config.activation]
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias_of("mlp"))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        h = linear(self.c_fc, x, per_row)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(linear(self.c_proj, h, per_row))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, cache, layer, rope)
        return x + self.mlp(self.ln_2(x), per_row=cache is not None)
