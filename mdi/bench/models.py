"""Random-weight models at named sizes, for scaling studies without downloads."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import read_info, save_checkpoint
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
    if name not in SIZES:
        raise ValueError(f"unknown --model-size {name!r}; choose from {', '.join(SIZES)}")
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
