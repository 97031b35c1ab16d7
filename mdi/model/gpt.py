"""nanoGPT's GPT-2-style decoder, as a stage over a half-open range of blocks.

Pure PyTorch: no I/O, no printing, no globals. Parameter names follow nanoGPT
(`transformer.wte`, `transformer.h.N.attn.c_attn`, ...) with N the block's index
in the *whole* model, so a stage's state dict is a subset of the full one.

Two forward modes:
- uncached (`cache=None`): training and reference logits, causal attention.
- cached: the explicit per-sample KV cache; every matmul is computed per sample
  (a batched matmul with one problem per row), so a sample's numbers do not
  depend on which other samples share its micro-batch. Distributed and
  single-device generation rely on this to produce identical tokens.
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        per_row = cache is not None
        q, k, v = linear(self.c_attn, x, per_row).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if cache is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            k, v = cache.update(layer, input_pos, k, v)  # (B, nh, T_max, hs)
            # Query t of row b sees keys at positions <= input_pos[b, t]. Stale
            # entries past a sample's position (after a reset) stay masked.
            key_pos = torch.arange(cache.max_len, device=x.device)
            mask = key_pos[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, T_max)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(linear(self.c_proj, y, per_row))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        x = self.act(linear(self.c_fc, x, per_row))
        return self.dropout(linear(self.c_proj, x, per_row))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, cache, layer)
        return x + self.mlp(self.ln_2(x), per_row=cache is not None)


class GPT(nn.Module):
    """Blocks [start, stop) of a GPT; embeddings if start == 0, head if stop == n_layer.

    The first stage takes token ids (B, T); later stages take activations
    (B, T, n_embd). The last stage returns logits (B, T, vocab); others return
    activations.
    """

    def __init__(self, config: GPTConfig, start: int = 0, stop: int | None = None) -> None:
        super().__init__()
        stop = config.n_layer if stop is None else stop
        if not 0 <= start < stop <= config.n_layer:
            raise ValueError(f"invalid layer range [{start}, {stop}) for {config.n_layer} layers")
        self.config = config
        self.start, self.stop = start, stop
        self.has_embeddings = start == 0
        self.has_head = stop == config.n_layer
        parts: dict[str, nn.Module] = {}
        if self.has_embeddings:
            parts["wte"] = nn.Embedding(config.vocab_size, config.n_embd)
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            parts["drop"] = nn.Dropout(config.dropout)
        parts["h"] = nn.ModuleDict({str(i): Block(config) for i in range(start, stop)})
        if self.has_head:
            parts["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.transformer = nn.ModuleDict(parts)
        if self.has_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
            if self.has_embeddings:
                self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled init of residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def n_blocks(self) -> int:
        return self.stop - self.start

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.has_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        p = next(self.parameters())
        c = self.config
        return KVCache(self.n_blocks, batch, c.n_head, c.block_size, c.head_size,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, logits: bool = True) -> torch.Tensor:
        """x: ids (B, T) or activations (B, T, C); input_pos: (B, T) positions.

        Without a cache, input_pos defaults to 0..T-1 for every row. With
        logits=False the last stage returns the final activations (prefill
        needs no logits).
        """
        if self.has_embeddings:
            B, T = x.shape
        else:
            B, T, _ = x.shape
        if input_pos is None:
            if cache is not None:
                raise ValueError("a cached forward needs input_pos")
            input_pos = torch.arange(T, device=x.device).expand(B, T)
        if self.has_embeddings:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
            x = self.transformer.drop(self.transformer.wte(x) + self.transformer.wpe(input_pos))
        for i, block in enumerate(self.transformer.h.values()):
            x = block(x, input_pos, cache, i)
        if not self.has_head or not logits:
            return x
        x = self.transformer.ln_f(x)
        return linear(self.lm_head, x, per_row=cache is not None)
