"""GPTConfig: the shape of a decoder, saved inside every checkpoint.

One config-driven decoder covers nanoGPT / GPT-2 (the defaults: LayerNorm,
learned positions, GELU MLP, biases everywhere, tied head) and the Llama family
(RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head).
Every field added after version 1 defaults to nanoGPT's behaviour, so older
checkpoints' config.json load unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")  # swiglu: silu(gate) * up
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256          # maximum positions (HF max_position_embeddings)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True              # default for every bias below that is None
    # Import compatibility: the original MDI system used ReLU and a biased head.
    activation: str = "gelu"       # one of ACTIVATIONS; the MLP's form follows from it
    head_bias: bool = False
    layer_norm_eps: float = 1e-5   # eps of every norm, LayerNorm or RMSNorm
    # ---- architecture switches (defaults = nanoGPT) ----
    norm: str = "layernorm"        # one of NORMS
    positions: str = "learned"     # "learned" (wpe table) or "rope" (rotate-half, HF layout)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"     # one of ROPE_SCALINGS
    rope_factor: float = 1.0       # linear and llama3
    rope_low_freq_factor: float = 1.0    # llama3
    rope_high_freq_factor: float = 4.0   # llama3
    rope_original_max_len: int = 8192    # llama3: original_max_position_embeddings
    n_kv_head: int = 0             # grouped-query attention; 0 = n_head
    head_dim: int = 0              # 0 = n_embd // n_head
    intermediate_size: int = 0     # MLP width; 0 = 4 * n_embd
    qkv_bias: bool | None = None   # None = follow `bias`
    attn_proj_bias: bool | None = None
    mlp_bias: bool | None = None
    norm_bias: bool | None = None  # LayerNorm only; RMSNorm has none
    tie_embeddings: bool = True    # lm_head shares the token embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"GPTConfig.{name} must be a non-negative integer, got {value!r}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of "
                             f"n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS),
                              ("positions", POSITIONS), ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_size % 2:
            raise ValueError(f"GPTConfig: RoPE needs an even head size, got {self.head_size}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def bias_of(self, which: str) -> bool:
        """Whether the named projection ('qkv', 'attn_proj', 'mlp', 'norm') has a bias."""
        value = getattr(self, f"{which}_bias")
        return self.bias if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Build from a dict, rejecting unknown keys with a message naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        for key, value in data.items():
            want = str(known[key].type)
            if want.endswith(" | None"):
                if value is None:
                    continue
                want = want[:-len(" | None")]
            ok = {
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "bool": isinstance(value, bool),
                "str": isinstance(value, str),
            }.get(want, True)
            if not ok:
                raise ValueError(f"model config field {key!r} must be {want}, got {value!r}")
        return cls(**data)
