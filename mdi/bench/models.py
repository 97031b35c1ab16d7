"""Random-weight models at named sizes, for scaling studies without downloads.

The nanoGPT shapes are written in our format; the Llama-family shapes
(HF_SIZES) as Hugging Face directories (config.json, sharded safetensors,
a byte-level tokenizer.json), so a benchmark exercises the same loader as a
downloaded model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import open_checkpoint, read_info, save_checkpoint
from ..model import GPT, GPTConfig
from ..tokenizer import CharTokenizer

SIZES: dict[str, GPTConfig] = {
    # A few blocks of a few dozen channels: for tests of the benchmark itself.
    "tiny": GPTConfig(vocab_size=96, block_size=64, n_layer=4, n_head=2, n_embd=32),
    # The bundled Shakespeare model's shape.
    "bundled": GPTConfig(vocab_size=65, block_size=128, n_layer=6, n_head=6, n_embd=192),
    # GPT-2 small: compute and memory dominate rather than Python overhead.
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}


# Hugging Face config.json contents of real models' shapes (weights random).
HF_SIZES: dict[str, dict] = {
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "tinyllama-1.1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           hidden_act="silu", bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
}
SHARD_BYTES = 1 << 30


def llama_hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a bias-free Llama-family config.json."""
    C, V, I = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
    nh, nkv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    hs = hf.get("head_dim") or C // nh
    out = {"model.embed_tokens.weight": (V, C)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                    p + "self_attn.q_proj.weight": (nh * hs, C), p + "self_attn.k_proj.weight": (nkv * hs, C),
                    p + "self_attn.v_proj.weight": (nkv * hs, C), p + "self_attn.o_proj.weight": (C, nh * hs),
                    p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
                    p + "mlp.down_proj.weight": (C, I)})
    out["model.norm.weight"] = (C,)
    if not hf.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (V, C)
    return out


def byte_tokenizer_json() -> str:
    """A byte-level BPE tokenizer without merges: every byte is one token (ids 0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_random_hf_dir(hf: dict, path: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        shard_bytes: int = SHARD_BYTES) -> Path:
    """A Hugging Face directory with random weights, written shard by shard (peak
    memory: one shard), plus model.safetensors.index.json and a byte tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, files = 0, []

    def flush() -> None:
        files.append(f"part{len(files)}.tmp")
        save_file(shards[-1], str(path / files[-1]), metadata={"format": "pt"})
        shards[-1] = {}

    weight_map: dict[str, int] = {}
    for name, shape in llama_hf_shapes(hf).items():
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shards[-1][name] = t
        weight_map[name] = len(files)
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
            size = 0
    if shards[-1]:
        flush()
    n = len(files)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(files, names):
        (path / tmp).replace(path / final)
    index = {"metadata": {}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (path / "config.json").write_text(json.dumps(hf, indent=2))  # last: marks the directory complete
    return path


def synthetic_vocab(n: int) -> list[str]:
    """n distinct single characters, newline first so the default prompt encodes."""
    chars = ["\n"]
    code = 0x20
    while len(chars) < n:
        if not 0xD800 <= code <= 0xDFFF:  # no surrogates
            chars.append(chr(code))
        code += 1
    return chars


def random_checkpoint(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write (once) a random-weight checkpoint of a named size; return its path."""
    if name in HF_SIZES:
        path = Path(out_dir) / name
        if (path / "config.json").is_file():
            try:
                if json.loads((path / "config.json").read_text()) == HF_SIZES[name]:
                    open_checkpoint(path)
                    return path
            except ValueError:
                pass
        return write_random_hf_dir(HF_SIZES[name], path, seed)
    if name not in SIZES:
        raise ValueError(f"unknown --model-size {name!r}; choose from {', '.join([*SIZES, *HF_SIZES])}")
    path = Path(out_dir) / name
    config = SIZES[name]
    if (path / "config.json").is_file():
        try:
            if read_info(path).config == config:
                return path
        except ValueError:
            pass
    torch.manual_seed(seed)
    model = GPT(config)
    save_checkpoint(path, model, CharTokenizer(synthetic_vocab(config.vocab_size)),
                    {"random_weights": True, "model_size": name, "seed": seed})
    return path
