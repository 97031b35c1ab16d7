"""Hugging Face architectures onto our config-driven decoder: config.json ->
GPTConfig, and each of our tensor names -> the HF tensor(s) it is made of.

Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM (no sliding
window in use), Qwen2ForCausalLM. Anything that would change the maths and
that the decoder does not do (sliding windows, MoE, other rope scalings,
quantized weights, other activations) is refused by name: a wrong answer
must never look like a right one.

Tensor rules, ours <- HF:
  GPT-2  same names (with or without the `transformer.` prefix); the Conv1D
         weights (c_attn, c_proj, c_fc) are stored (in, out) and transposed.
  Llama  wte <- model.embed_tokens; ln_1/ln_2 <- input/post_attention_layernorm;
         attn.c_attn <- cat(q_proj, k_proj, v_proj); attn.c_proj <- o_proj;
         mlp.c_fc <- cat(gate_proj, up_proj); mlp.c_proj <- down_proj;
         ln_f <- model.norm; lm_head <- lm_head (or embed_tokens when tied).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..model.int4 import Int4Weight
from .gguf_int4 import fused_format

from ..model import GPTConfig
from .format import CheckpointError

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {"GPT2LMHeadModel": GPT2, "LlamaForCausalLM": LLAMA,
                 "MistralForCausalLM": LLAMA, "Qwen2ForCausalLM": LLAMA}
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "gelu": "gelu", "relu": "relu"}
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
              "num_experts_per_tok")
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def _get(hf: dict, key: str, default: Any = None, where: str = "config.json") -> Any:
    value = hf.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return value


def architecture(hf: dict, where: str = "config.json") -> tuple[str, str]:
    """(HF architecture name, our family) or a CheckpointError naming it."""
    archs = hf.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name is None:
        name = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type"))
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {name or hf.get('model_type')!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
    return name, ARCHITECTURES[name]


def _refuse(where: str, field: str, value: Any, why: str) -> None:
    raise CheckpointError(f"{where}: {field}={value!r} is not supported ({why})")


def _rope_fields(hf: dict, where: str) -> dict[str, Any]:
    # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; hub
    # configs from 4.x carry rope_theta and rope_scaling {type|rope_type, ...}.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(merged["factor"])}
    if kind == "llama3":
        try:
            return {**out, "rope_scaling": "llama3", "rope_factor": float(merged["factor"]),
                    "rope_low_freq_factor": float(merged["low_freq_factor"]),
                    "rope_high_freq_factor": float(merged["high_freq_factor"]),
                    "rope_original_max_len": int(merged["original_max_position_embeddings"])}
        except KeyError as e:
            raise CheckpointError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None
    _refuse(where, "rope_scaling.rope_type", kind, "only default, linear and llama3 RoPE are")
    return out


def config_from_hf(hf: dict, where: str = "config.json") -> tuple[GPTConfig, str]:
    """(GPTConfig, family) for a Hugging Face config.json dict."""
    name, family = architecture(hf, where)
    if hf.get("quantization_config"):
        _refuse(where, "quantization_config", hf["quantization_config"].get("quant_method", "?"),
                "load unquantized weights")
    for f in MOE_FIELDS:
        if hf.get(f):
            _refuse(where, f, hf[f], "mixture-of-experts models are not supported")
    if family == GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTS:
            _refuse(where, "activation_function", act, f"choose one of {', '.join(GPT2_ACTS)}")
        for f, bad in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                       ("scale_attn_weights", False)):
            if hf.get(f, not bad) == bad:
                _refuse(where, f, bad, "changes the attention")
        kw = dict(vocab_size=_get(hf, "vocab_size"), block_size=_get(hf, "n_positions"),
                  n_layer=_get(hf, "n_layer"), n_head=_get(hf, "n_head"), n_embd=_get(hf, "n_embd"),
                  bias=True, activation=GPT2_ACTS[act],
                  layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                  intermediate_size=hf.get("n_inner") or 0,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            _refuse(where, "hidden_act", act, "the Llama family's MLP is SwiGLU with silu")
        window = hf.get("sliding_window")
        uses_window = hf.get("use_sliding_window", name != "Qwen2ForCausalLM")
        max_pos = _get(hf, "max_position_embeddings")
        if window is not None and uses_window and window < max_pos:
            _refuse(where, "sliding_window", window, "sliding-window attention is not implemented; "
                    f"it would change the output past {window} tokens")
        attn_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if name == "Qwen2ForCausalLM" else attn_bias
        proj_bias = False if name == "Qwen2ForCausalLM" else attn_bias
        heads = _get(hf, "num_attention_heads")
        kw = dict(vocab_size=_get(hf, "vocab_size"), block_size=max_pos,
                  n_layer=_get(hf, "num_hidden_layers"), n_head=heads, n_embd=_get(hf, "hidden_size"),
                  bias=False, activation="swiglu", norm="rmsnorm", positions="rope",
                  layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  n_kv_head=hf.get("num_key_value_heads") or heads,
                  head_dim=hf.get("head_dim") or 0, intermediate_size=_get(hf, "intermediate_size"),
                  qkv_bias=qkv_bias, attn_proj_bias=proj_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_fields(hf, where))
    try:
        return GPTConfig(**kw), family
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _gpt2_sources(ours: str, have: Callable[[str], bool]) -> tuple[list[str], str]:
    if ours == "lm_head.weight":
        return ["lm_head.weight"], "copy"
    bare = ours.removeprefix("transformer.")
    name = ours if have(ours) else bare  # the hub's gpt2 stores names without the prefix
    return [name], "t" if CONV1D.search(ours) else "copy"


LLAMA_BLOCK = {
    "ln_1.weight": ["input_layernorm.weight"],
    "ln_2.weight": ["post_attention_layernorm.weight"],
    "attn.c_attn.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.c_attn.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attn.c_proj.weight": ["self_attn.o_proj.weight"],
    "attn.c_proj.bias": ["self_attn.o_proj.bias"],
    "mlp.c_fc.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.c_fc.bias": ["mlp.gate_proj.bias", "mlp.up_proj.bias"],
    "mlp.c_proj.weight": ["mlp.down_proj.weight"],
    "mlp.c_proj.bias": ["mlp.down_proj.bias"],
}
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def _llama_sources(ours: str) -> tuple[list[str], str]:
    if ours in LLAMA_TOP:
        return [LLAMA_TOP[ours]], "copy"
    m = BLOCK.match(ours)
    if not m or m.group(2) not in LLAMA_BLOCK:
        raise CheckpointError(f"no Hugging Face tensor maps to {ours!r}")
    names = [f"model.layers.{m.group(1)}.{n}" for n in LLAMA_BLOCK[m.group(2)]]
    return names, "cat" if len(names) > 1 else "copy"


def hf_sources(family: str, ours: str, have: Callable[[str], bool]) -> tuple[list[str], str]:
    """(HF names, how to combine them: copy | t | cat) that make our tensor `ours`."""
    return _gpt2_sources(ours, have) if family == GPT2 else _llama_sources(ours)


def embedding_name(family: str, have: Callable[[str], bool]) -> str:
    return _gpt2_sources("transformer.wte.weight", have)[0][0] if family == GPT2 \
        else LLAMA_TOP["transformer.wte.weight"]


def combine(parts: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "t":
        return parts[0].t().contiguous()
    if how == "cat":
        out = torch.cat(parts, dim=0)
        int4 = [getattr(p, "mdi_int4", None) for p in parts]
        if all(q is not None for q in int4):  # a GGUF's int4 codes, fused like the floats
            out.mdi_int4 = Int4Weight.cat_rows(int4)
        formats = [getattr(p, "mdi_format", None) for p in parts]
        if all(formats):  # a GGUF's block formats: the fused weight takes the widest
            out.mdi_format = fused_format(formats)
        return out
    return parts[0]
