"""A model described in Hugging Face terms, wherever its bytes live.

The contract between readers of external formats and the mapping onto our
config-driven decoder: a Hugging Face directory (`config.json`, safetensors
shards, `tokenizer.json`, ...) is one reader, a GGUF file another. Readers
yield tensors under Hugging Face names (`model.layers.3.self_attn.q_proj.weight`)
in Hugging Face layout (e.g. Llama q/k rows in the rotate-half order), one at a
time on request, so a node can read only its stage's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class HFSource:
    config: dict                                   # config.json contents
    shapes: dict[str, tuple[int, ...]]             # HF tensor name -> shape
    dtypes: dict[str, torch.dtype]                 # HF tensor name -> stored (or dequantized) dtype
    read: Callable[[str], torch.Tensor]            # one tensor by HF name; reads only that tensor
    tokenizer_json: str | None = None              # tokenizer.json contents
    tokenizer_config: dict = field(default_factory=dict)   # bos_token, eos_token, chat_template, ...
    generation_config: dict = field(default_factory=dict)  # eos_token_id, ...
    origin: str = ""                               # where it came from, for messages
