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
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_ops
from .cache import KVCache, in_dtype
from .config import GPTConfig
from .kept import kept
from .kernels import FEW_ROWS
from .packed import PackedRows, packed_attention


# How a linear runs (GPT.forward picks one per forward and passes it down):
# "dense": nn.Linear as is; "packed": the same weights in oneDNN's blocked layout
# (CPU float32 inference); "per_row": one GEMM per batch row (--batch-invariant).
LinearMode = Literal["dense", "packed", "per_row"]

# oneDNN's prepacked float32 linear. On this project's CPUs (AMD, AVX-512) MKL's
# sgemm (PyTorch's default) repacks the weight on every call and its GEMV read
# weights at ~11 GB/s of ~30; with the weights prepacked, GPT-2 small decodes
# 1.5x (1 sequence) to 2.6x (4) the tokens/s of the plain layers, 2 threads
# (docs/benchmarks.md, section 6).
_HAS_PACKED = (torch.backends.mkldnn.is_available()
               and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
               and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packing_available() -> bool:
    """Does this torch build have oneDNN's prepacked float32 linear?"""
    return _HAS_PACKED


# The batch size oneDNN tunes the blocked layout for; any batch runs with it.
PACK_BATCH = 16
# A oneDNN call costs ~15 us more than MKL's: smaller weights (the bundled
# model's, 192 wide) stay dense, where that overhead is the larger part.
PACK_MIN_WEIGHTS = 1 << 19


def can_pack(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Does a linear on x use a packed weight? CPU float32 without autograd, and
    a weight large enough to gain."""
    return (_HAS_PACKED and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and layer.weight.numel() >= PACK_MIN_WEIGHTS)


class _Packed:
    """A layer's packed weight and what it was packed from. Copies and pickles of
    the layer start empty (an opaque oneDNN tensor has no storage to copy) and
    pack again on first use."""

    def __init__(self) -> None:
        self.key: tuple | None = None  # (weakref to the weight, data_ptr, version)
        self.weight: torch.Tensor | None = None
        self.only = False  # the plain weight was given up: this is the layer's one copy

    def __deepcopy__(self, memo: dict) -> "_Packed":
        if not self.only:
            return _Packed()
        twin = _Packed()  # nothing else holds the weights: share them (read-only at inference)
        twin.weight, twin.only = self.weight, True
        return twin

    def __reduce__(self) -> tuple:
        return (_Packed, ())


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """layer.weight in oneDNN's layout, packed on first use and kept on the layer
    (a plain attribute: not a parameter, not in the state dict) until the weight
    changes: another tensor, storage or in-place version repacks it. Costs a
    second copy of the weight while the float32 layer is used for inference."""
    w = layer.weight
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot change
        version = -1
    held = layer.__dict__.get("_mdi_packed")
    if held is not None and held.only:
        return held.weight
    if held is None:
        held = layer.__dict__["_mdi_packed"] = _Packed()
    key = held.key
    if key is None or key[0]() is not w or key[1:] != (w.data_ptr(), version):
        held.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_BATCH)
        held.key = (weakref.ref(w), w.data_ptr(), version)
    return held.weight


def pack_linears(model: nn.Module, one_copy: bool = True) -> int:
    """Pack now, at load, every weight a CPU float32 forward would pack on its first
    use (packed_weight), so the first token does not wait for it; returns how many.

    one_copy: the packed weight replaces the plain one (its storage is given back;
    the parameter keeps its shape on the meta device, so sizes and names still
    read), one layer at a time, so that the stage never holds both copies of more
    than one weight. A weight shared with another module (a tied head, whose plain
    rows the embedding looks up) keeps its plain copy. Such a stage computes only
    through the packed path: a per-row (--batch-invariant) or dense forward, or
    autograd, refuses with an error naming the layer."""
    if not _HAS_PACKED:
        return 0
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, nn.Linear) and w.device.type == "cpu" and w.dtype == torch.float32
                and w.numel() >= PACK_MIN_WEIGHTS):
            packed_weight(m)
            if one_copy and uses[id(w)] == 1:
                m.__dict__["_mdi_packed"].only = True
                m.__dict__.pop("_mdi_wt", None)  # (its view would keep the plain weight alive)
                m.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"),
                                        requires_grad=False)
            n += 1
    return n


def has_plain_weight(layer: nn.Module) -> bool:
    """False for a Linear whose plain weight gave way to its packed copy (pack_linears)."""
    held = layer.__dict__.get("_mdi_packed")
    return held is None or not held.only


def _plain(layer: nn.Linear) -> torch.Tensor:
    if not has_plain_weight(layer):
        raise RuntimeError("this layer keeps only oneDNN's packed copy of its weight (loaded with "
                           "pack=True): it computes through the packed path only; load with "
                           "pack=False for per-row (--batch-invariant), dense or training use")
    return layer.weight


def linear(layer: nn.Module, x: torch.Tensor, mode: LinearMode = "dense") -> torch.Tensor:
    """`layer(x)`: one GEMM for all rows (the weights are read once per step).

    "per_row": one GEMM per batch row, so a row's numbers do not depend on
    its step-mates (`--batch-invariant`; every row re-reads the weights). An
    int8 layer (quant.Int8Linear) is row-independent by construction: no loop.
    "packed": the prepacked weight (falls back to dense where it cannot run).
    """
    if not isinstance(layer, nn.Linear):  # a quantized layer: its forward, without __call__'s
        return layer.forward(x)              # hook machinery (no hooks are used on a stage)
    if mode == "per_row":
        w = _plain(layer).t().unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, C_in, C_out)
        y = torch.bmm(x, w)
        return y if layer.bias is None else y + layer.bias
    if x.dim() != 3:
        _plain(layer)
        return layer(x)
    B, T, C = x.shape
    if mode == "packed" and can_pack(layer, x):  # 2-D in and out: 3 aten calls, not 7
        x2 = x.view(B * T, C) if x.is_contiguous() else x.reshape(B * T, C)
        y = torch.ops.mkldnn._linear_pointwise(x2, packed_weight(layer),
                                               layer.bias, "none", [], "")
        return y.view(B, T, -1)
    if torch.is_grad_enabled():
        _plain(layer)
        return layer(x)
    if reads_rows(layer, x, B * T):
        ops = fused_ops.for_lowbit(x)
        if ops is not None:  # float32 sums of exact inputs, one rounding (csrc/rows_ops.cpp)
            x2 = x.view(B * T, C) if x.is_contiguous() else x.reshape(B * T, C)
            return ops.bf16_mm(x2, layer.weight, layer.bias).view(B, T, -1)
    # F.linear's own path for a 3-D input (flatten, mm/addmm, view back), without
    # its dispatch layers, and with the weight's transposed view kept on the layer:
    # 3-4 aten calls instead of 11 per small-weight or bfloat16 decode GEMM
    # (a traced graph takes the plain view: dynamo cannot trace the kept view's check)
    w = _plain(layer).t() if torch.compiler.is_compiling() else _transposed(layer)
    x2 = x.view(B * T, C) if x.is_contiguous() else x.reshape(B * T, C)
    y = torch.mm(x2, w) if layer.bias is None else torch.addmm(layer.bias, x2, w)
    return y.view(B, T, -1)


def reads_rows(layer: nn.Linear, x: torch.Tensor, rows: int) -> bool:
    """Does mdi's bfloat16 kernel (fused_ops: `bf16_mm`, where loaded) compute the
    layer on `rows` rows of x? bfloat16 activations, a bfloat16 CPU weight,
    contiguous (out, in), a bfloat16 bias or none, and up to FEW_ROWS rows (a
    decode step: 1.4x torch's bfloat16 product at one row, level at 16, slower
    above; docs/benchmarks.md); more rows keep torch's GEMM."""
    w, b = layer.weight, layer.bias
    return (x.dtype == torch.bfloat16 and rows <= FEW_ROWS and w.dtype == torch.bfloat16
            and w.device.type == "cpu" and w.is_contiguous()
            and (b is None or (b.dtype == torch.bfloat16 and b.is_contiguous())))


def _transposed(layer: nn.Linear) -> torch.Tensor:
    """layer.weight.t(), a view kept on the layer: it shares the weight's storage."""
    return kept(layer, "_mdi_wt", _plain(layer), torch.Tensor.t)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm.

    Written out rather than `F.rms_norm`: in torch 2.13 that is a composite of 24
    aten calls on CPU (casts included) against 7 here for float32, with the same
    operations in the same order (equal bit for bit)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        n, eps = _scalars(self, x.device, float(x.shape[-1]), self.eps)
        # mean(x*x) as torch computes it (sum, then divide by n), with n and eps as
        # float32 tensors: a Python number costs a conversion per call
        r = (x * x).sum(-1, keepdim=True).div_(n).add_(eps).rsqrt_()
        x = x * r
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


def _scalars(module: nn.Module, device: torch.device, *values: float) -> tuple[torch.Tensor, ...]:
    """float32 0-dim tensors of `values`, made once per device and kept on the
    module (a plain attribute: not state, not saved)."""
    held = module.__dict__.get("_mdi_scalars")
    if held is None or held[0].device != device or len(held) != len(values):
        held = module.__dict__["_mdi_scalars"] = tuple(
            torch.tensor(v, dtype=torch.float32, device=device) for v in values)
    return held


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


def rope_table(inv_freq: torch.Tensor, input_pos: torch.Tensor, dtype: torch.dtype,
               n_rotated: int, n_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of one step for a fused (B, T, heads, hs) q|k|v tensor, built
    once per forward: cos, signed sin (B, T, n_rotated + n_kept, hs) with the
    rotate-half sign folded into sin (-sin on the first half), and the last
    n_kept heads (the values) left as they are (cos 1, sin 0: x*1 + y*0 == x)."""
    cos, sin = rope_cos_sin(inv_freq, input_pos, dtype)           # (B, 1, T, hs)
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)           # (B, T, 1, hs)
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    B, T, _, hs = cos.shape
    ones = cos.new_ones(B, T, n_kept, hs)
    cos = torch.cat((cos.expand(B, T, n_rotated, hs), ones), dim=2)
    sin = torch.cat((sin.expand(B, T, n_rotated, hs), ones.new_zeros(B, T, n_kept, hs)), dim=2)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face's layout, so its q/k weights load unpermuted)
    with a rope_table: x*cos + swap_halves(x)*signed_sin, i.e. Hugging Face's
    x*cos + cat(-x2, x1)*sin with the same products and sums."""
    *lead, hs = x.shape
    swapped = x.view(*lead, 2, hs // 2).flip(-2).view(x.shape)
    return x * cos + swapped * sin


@dataclass(frozen=True)
class CachedStep:
    """What every block of one cached forward shares, built once per forward
    (`cached_step`, in GPT.forward) rather than in each layer.

    input_pos (B, T): the positions written. start: when every row writes the
    same positions start..start+T-1, the cache write is a slice copy instead of a
    scatter. length: keys read, the largest position + 1 (only the filled part).
    mask (B, 1, T, length): key j is visible to query t of row b iff j <=
    input_pos[b, t]; None when every key below `length` is visible to every
    query (a decode whose rows are all at one position), `causal` when the mask
    is the plain causal one (a prefill from position 0). rows: with
    --batch-invariant, one step per row, each with its own length. packed: several
    sequences' tokens in the one row of the step (packed.py; a batched prefill).
    """
    input_pos: torch.Tensor
    start: int | None
    length: int
    mask: torch.Tensor | None
    causal: bool = False
    rows: tuple["CachedStep", ...] = ()
    packed: PackedRows | None = None


def cached_step(input_pos: torch.Tensor, per_row: bool = False) -> CachedStep:
    """The CachedStep of a cached forward at input_pos (B, T)."""
    B, T = input_pos.shape
    rows = tuple(cached_step(input_pos[b:b + 1]) for b in range(B)) if per_row and B > 1 else ()
    pos = input_pos.tolist()  # one read of a small tensor, instead of syncs in every layer
    lo = pos[0][0]
    length = max(max(r) for r in pos) + 1
    same = all(r == pos[0] for r in pos) and pos[0] == list(range(lo, lo + T))
    if same and T == 1:   # a decode with every row at one position: every key is visible
        return CachedStep(input_pos, lo, length, None, rows=rows)
    if same and lo == 0:  # a prefill from position 0: plain causal attention
        return CachedStep(input_pos, lo, length, None, causal=True, rows=rows)
    key_pos = torch.arange(length, device=input_pos.device)
    mask = key_pos[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, L)
    return CachedStep(input_pos, lo if same else None, length, mask, rows=rows)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.kv_heads, config.head_size
        q_size, kv_size = self.n_head * self.hs, self.n_kv_head * self.hs
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.bias_of("qkv"))
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias_of("attn_proj"))
        self.rope = config.positions == "rope"
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, step: CachedStep | None = None,
                cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mode: LinearMode = "dense") -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.hs
        qkv = linear(self.c_attn, x, mode).view(B, T, nh + 2 * nkv, hs)  # q|k|v heads
        if rope is not None:
            qkv = apply_rope(qkv, *rope)  # q and k rotated in one go, v as it was
        gqa = nkv != nh
        if cache is None:
            q, k, v = qkv.transpose(1, 2).split((nh, nkv, nkv), dim=1)  # (B, heads, T, hs)
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               enable_gqa=gqa)
            y = y.transpose(1, 2)
        else:
            assert step is not None
            if step.packed is not None:  # several sequences in one row: their own rows, masks
                y = packed_attention(qkv, cache, layer, step.packed, nh, gqa)
                return linear(self.c_proj, y.reshape(B, T, nh * hs), mode)
            kv = qkv[:, :, nh:].view(B, T, 2, nkv, hs).permute(2, 0, 3, 1, 4)  # (2, B, nkv, T, hs)
            k, v = cache.update(layer, step.input_pos, kv, step.start)  # (B, nkv, T_max, hs)
            y = cached_attention(qkv[:, :, :nh], k, v, step, gqa)  # (B, T, nh, hs)
        y = linear(self.c_proj, y.reshape(B, T, nh * hs), mode)
        return self.resid_dropout(y) if self.training else y


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: CachedStep,
                     gqa: bool) -> torch.Tensor:
    """q (B, T, nh, hs) against the cache k, v (B, nkv, T_max, hs) -> (B, T, nh, hs).

    Reads only the filled part: keys [0, L) with L = the largest position of the
    step + 1, not all T_max. Query t of row b sees keys at positions <=
    input_pos[b, t]; stale entries past a row's position (after a reset) and the
    rows shorter than L stay masked. With per-row steps (--batch-invariant), each
    row uses its own L, so its numbers do not depend on its step-mates.
    (Two bmms at decode make 5 fewer aten calls than SDPA but were measured
    slower: 27 vs 18 us at one row of SmolLM2, 940 vs 498 us at 16.)
    """
    if step.rows:
        return torch.cat([cached_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], row, gqa)
                          for b, row in enumerate(step.rows)])
    L = step.length
    k, v = in_dtype(k[:, :, :L], q.dtype), in_dtype(v[:, :, :L], q.dtype)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v,
                                       attn_mask=step.mask, is_causal=step.causal, enable_gqa=gqa)
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        width = self.width = config.mlp_size
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width,
                              bias=config.bias_of("mlp"))
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                    "relu": nn.ReLU(), "swiglu": nn.SiLU()}[config.activation]
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias_of("mlp"))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mode: LinearMode = "dense") -> torch.Tensor:
        h = linear(self.c_fc, x, mode)
        if self.swiglu:  # rows of c_fc: gate, then up
            h = F.silu(h[..., :self.width]) * h[..., self.width:]
        else:
            h = self.act(h)
        h = linear(self.c_proj, h, mode)
        return self.dropout(h) if self.training else h


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: CachedStep | None = None,
                cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mode: LinearMode = "dense") -> torch.Tensor:
        # the submodules' forward, not __call__: its hook machinery costs ~1 us a call,
        # 5 calls a layer, and no hooks are used on a stage
        x = x + self.attn.forward(self.ln_1.forward(x), step, cache, layer, rope, mode)
        return x + self.mlp.forward(self.ln_2.forward(x), mode)
