"""GGUF files (llama.cpp's format) as an `HFSource`.

A GGUF holds the hyper-parameters and the tokenizer as metadata and the
weights as (often block-quantized) tensors under llama.cpp's names. This reads
one (gguf_file.py: plain metadata, tensors memory-mapped) and presents it in
Hugging Face terms, the way `transformers` does when it loads the same file
(`from_pretrained(..., gguf_file=...)`, its legacy llama path):

- config: a `LlamaForCausalLM` config.json dict from `llama.*` metadata;
- tensors: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`,
  ..., dequantized to float32 with `gguf.quants.dequantize` (bit for bit what
  transformers loads), the Q/K row permutation of llama.cpp's converter
  undone; each tensor is read and dequantized only when asked for, so a node
  touches only the pages of its own stage;
- the tokenizer (`tokenizer.ggml.*`) as tokenizer.json text, and the chat
  template, special tokens and add_bos flag as tokenizer_config.

Only the llama architecture is read; any other is refused by name, as is any
tensor this mapping does not know (e.g. Llama 3.1's `rope_freqs`), since
skipping it would silently change the maths.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .format import CheckpointError
from .gguf_file import GGUFFile
from .gguf_tensors import GGUFTensors, unpermute_rows  # noqa: F401 (unpermute_rows: tests)
from .gguf_tokenizer import build_tokenizer
from .hf_source import HFSource
from .malloc import release_free_memory

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name -> Hugging Face LlamaForCausalLM name ("{}" = block index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def open_reader(path: str | Path) -> GGUFFile:
    """A GGUF file's metadata and tensor table (gguf_file.py), with every way a file
    can be bad as a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFFile(path)
    except (ValueError, OverflowError, UnicodeDecodeError) as e:  # GGUFFormatError is one
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None


def metadata(reader: GGUFFile, *, skip_arrays: bool = True) -> dict[str, Any]:
    """Scalar and string metadata (arrays left out unless asked for)."""
    return {k: v for k, v in reader.fields.items()
            if not (skip_arrays and isinstance(v, list))}


def _require(meta: dict, key: str, where: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{where}: GGUF metadata has no {key!r}")
    return meta[key]


def llama_config(meta: dict, tensor_names: set[str], vocab_size: int, path: Path) -> dict:
    """A LlamaForCausalLM config.json dict from `llama.*` metadata."""
    a = "llama"
    n_head = int(_require(meta, f"{a}.attention.head_count", path))
    hidden = int(_require(meta, f"{a}.embedding_length", path))
    head_dim = int(meta.get(f"{a}.attention.key_length", meta.get(f"{a}.rope.dimension_count",
                                                                    hidden // n_head)))
    theta = float(np.float32(meta.get(f"{a}.rope.freq_base", 10000.0)))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get(f"{a}.vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{a}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, f"{a}.block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{a}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 2048)),
        # float32 in the file; widened exactly as transformers does (9.999999747378752e-06)
        "rms_norm_eps": float(np.float32(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "hidden_act": "silu",
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_names),
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    scaling = meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = float(meta.get(f"{a}.rope.scaling.factor", 1.0))
        if scaling != "linear":
            raise CheckpointError(f"{path}: RoPE scaling {scaling!r} is not supported (only linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    for key in ("expert_count", "attention.sliding_window"):
        if meta.get(f"{a}.{key}"):
            raise CheckpointError(f"{path}: {a}.{key} is set; MoE and sliding-window attention "
                                  "are not supported")
    return cfg


# The model's own sampling settings (GGUF's general.sampling.*, where the file has them),
# under their generation_config.json names; checkpoint/sampling_defaults.py reads them.
GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p"}


def gguf_source(path: str | Path) -> HFSource:
    """A GGUF file in Hugging Face terms; tensors dequantized to float32 on `read(name)`
    (or a block of rows at a time: `rows(name)`, gguf_tensors.py)."""
    path = Path(path)
    reader = open_reader(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    by_hf: dict[str, Any] = {}
    unknown = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
        else:
            by_hf[name] = t
    if unknown:
        raise CheckpointError(f"{path}: tensor(s) {', '.join(unknown[:5])} have no Llama "
                              "equivalent here (not supported)")

    tok, tok_config, ids = build_tokenizer(reader, meta, path)
    config = llama_config(meta, {t.name for t in reader.tensors}, len(ids.get("tokens", ())), path)
    # the vocabulary and merges are in the tokenizer now: the header's arrays as Python
    # lists were ~11 MB kept for the run (the reader lives on in `read`)
    reader.fields = metadata(reader)
    ids.pop("tokens", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if ids.get(k) is not None:
            config[k] = ids[k]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors = GGUFTensors(reader, by_hf, n_head, n_kv, path)

    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_hf.items()}
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    gen.update({hf: meta[key] for key, hf in GGUF_SAMPLING.items() if key in meta})
    log.info("GGUF %s: %s, %d tensors (%s)", path.name, meta.get("general.name", arch), len(by_hf),
             ", ".join(sorted({t.tensor_type.name for t in reader.tensors})))
    src = HFSource(config=config, shapes=shapes, dtypes={n: torch.float32 for n in shapes},
                   read=tensors.read, tokenizer_json=tok and tok.to_str(), tokenizer_config=tok_config,
                   generation_config=gen, origin=str(path), rows=tensors.rows)
    src.formats = {name: t.tensor_type.name for name, t in by_hf.items()}  # for mdi inspect
    src.tokenizer_built = tok
    release_free_memory()  # what building the tokenizer freed (~11 MB kept by malloc)
    return src

