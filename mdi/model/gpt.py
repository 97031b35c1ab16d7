"""The config-driven decoder (nanoGPT / GPT-2 / Llama family), as a stage over a
half-open range of blocks; its pieces live in layers.py.

Pure PyTorch: no I/O, no printing, no globals. Parameter names follow nanoGPT
(`transformer.wte`, `transformer.h.N.attn.c_attn`, ...) with N the block's index
in the *whole* model, so a stage's state dict is a subset of the full one.
`transformer.wpe` exists only with learned positions; `lm_head.weight` is the
token embedding when the config ties them (and the stage holds both).

Two forward modes:
- uncached (`cache=None`): training and reference logits, causal attention.
- cached: the explicit per-sample KV cache. By default one GEMM per layer for
  all rows of the step (the weights are read once per step, whatever the
  number of sequences), and attention reads only the filled part of the cache.
  With `batch_invariant = True` every matmul and the attention run per row, so
  a sample's numbers do not depend on which other samples share its step:
  distributed runs whose groupings differ from the single-device run's then
  produce identical tokens (`--batch-invariant`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .cache import KVCache, context_length
from .cache_int8 import make_cache
from .config import GPTConfig
from .layers import (Block, CachedStep, LinearMode, cached_step, linear, make_norm,
                     rope_inv_freq, rope_table)
from . import fused_ops
from .fused_layers import block_forward, norm, step_rope
from .packed import PackedRows

__all__ = ["GPT", "linear"]


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
            if config.positions == "learned":
                parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
            parts["drop"] = nn.Dropout(config.dropout)
        parts["h"] = nn.ModuleDict({str(i): Block(config) for i in range(start, stop)})
        if self.has_head:
            parts["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(parts)
        if self.has_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
            if self.has_embeddings and config.tie_embeddings:
                self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self._rope_freq: torch.Tensor | None = None
        # A runtime choice, not part of the config: with it, every matmul of a
        # cached forward runs per row (see layers.linear). Set by the caller.
        self.batch_invariant = False
        # Another: the positions a run keeps (--max-context; None: the default
        # cap, see cache.context_length). Caches and the window follow `context`.
        self.max_context: int | None = None
        # And the dtype its KV caches store (--kv-dtype; None: the compute dtype).
        # Attention reads a narrower cache back in the compute dtype.
        self.kv_dtype: torch.dtype | None = None
        # Also a runtime choice: CPU float32 inference runs every nn.Linear on a
        # oneDNN-prepacked copy of its weight (layers.packed_weight; faster, but
        # a second copy of the float32 weights). False: the plain nn.Linear.
        self.packed_linears = True
        # --compile: decode steps go through this compiled step (model/compiled.py;
        # generate/step.py:decode calls it); None: the eager forward.
        self.compiled_decode = None
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

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # A plain attribute, not a buffer: stages are built on the meta device and
        # given their weights by name, and this is derived from the config alone.
        if self._rope_freq is None or self._rope_freq.device != device:
            self._rope_freq = rope_inv_freq(self.config).to(device)
        return self._rope_freq

    @property
    def n_blocks(self) -> int:
        return self.stop - self.start

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.has_embeddings and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def context(self) -> int:
        """Positions a run keeps: min(block_size, max_context or its default)."""
        return context_length(self.config.block_size, self.max_context)

    def first_param(self) -> torch.Tensor:
        """A parameter that holds storage (its device and dtype are the stage's): not a
        weight given up for its packed copy (layers.pack_linears), which is on meta."""
        first = None
        for q in self.parameters():  # lazily: step.decode asks every step, and a whole list
            if not q.is_meta:        # walked every module (~0.3 ms a step for SmolLM2)
                return q
            first = q if first is None else first
        if first is None:
            raise ValueError("the stage has no parameters")
        return first

    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        p = self.first_param()
        c = self.config
        return make_cache(self.n_blocks, batch, c.kv_heads, self.context, c.head_size,
                          dtype=dtype or self.kv_dtype or p.dtype, device=device or p.device)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, logits: bool = True,
                packed: PackedRows | None = None) -> torch.Tensor:
        """x: ids (B, T) or activations (B, T, C); input_pos: (B, T) positions.

        Without a cache, input_pos defaults to 0..T-1 for every row. With
        logits=False the last stage returns the final activations (prefill
        needs no logits). packed (with a cache, B == 1): the row holds several
        sequences' tokens, each written to its own cache row at its own positions
        (packed.py: a batched prefill); input_pos is then packed.input_pos.
        """
        if self.has_embeddings:
            B, T = x.shape
        else:
            B, T, _ = x.shape
        if packed is not None:
            if cache is None or B != 1 or T != packed.n_tokens:
                raise ValueError(f"packed rows need a cache and one row of their "
                                 f"{packed.n_tokens} tokens, got shape {tuple(x.shape)}")
            input_pos = packed.input_pos
        if input_pos is None:
            if cache is not None:
                raise ValueError("a cached forward needs input_pos")
            input_pos = torch.arange(T, device=x.device).expand(B, T)
        if self.has_embeddings and T > self.config.block_size and packed is None:
            # (packed: its positions are checked)
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        per_row = cache is not None and self.batch_invariant
        mode: LinearMode = "per_row" if per_row else "packed" if self.packed_linears else "dense"
        step = None
        if packed is not None:
            step = CachedStep(input_pos, None, packed.length, None, packed=packed)
            cache.reserve(step.length)
        elif cache is not None:
            step = cached_step(input_pos, per_row)
            cache.reserve(step.length)  # the buffers reach the step's last position
        return self.forward_step(x, input_pos, step, cache, logits, mode)

    def forward_step(self, x: torch.Tensor, input_pos: torch.Tensor, step: CachedStep | None,
                     cache: KVCache | None, logits: bool = True,
                     mode: LinearMode = "dense") -> torch.Tensor:
        """The forward's computation once its step is built (forward does that): no
        Python reads of tensors, so that compiled.py can trace it with a step of its
        own (positions and mask as tensors, the cache's whole length)."""
        if self.has_embeddings:
            x = self.transformer.wte(x)
            if "wpe" in self.transformer:
                x = x + self.transformer.wpe(input_pos)
            if self.training:
                x = self.transformer.drop(x)
        # the fused kernels: eager CPU inference (not in train mode: no dropout there)
        ops = None if self.training else fused_ops.for_forward(x)
        rope = None
        if self.config.positions == "rope" and ops is not None:
            rope = step_rope(self._inv_freq(x.device), input_pos)  # (B, T, hs) each
        elif self.config.positions == "rope":
            c = self.config  # (B, T, heads, hs) each: q and k heads rotated, v heads kept
            rope = rope_table(self._inv_freq(x.device), input_pos, x.dtype,
                              c.n_head + c.kv_heads, c.kv_heads)
        for i, block in enumerate(self.transformer.h.values()):
            if ops is not None:
                x = block_forward(ops, block, x, step, cache, i, rope, mode)
            else:
                x = block.forward(x, step, cache, i, rope, mode)  # (no hooks: see Block.forward)
        if not self.has_head or not logits:
            return x
        return self.head(x, mode, ops)

    def head(self, x: torch.Tensor, mode: LinearMode = "dense", ops=None) -> torch.Tensor:
        """Final norm and lm_head: activations (B, T, C) -> logits (B, T, vocab).
        ops: the fused kernels (fused_ops.ops()) for the norm, where they apply."""
        ln_f = self.transformer.ln_f
        h = ln_f(x) if ops is None else norm(ops, ln_f, x, x.dtype == torch.bfloat16)
        return linear(self.lm_head, h, mode)
