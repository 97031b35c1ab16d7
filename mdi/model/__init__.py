"""Pure model code: configuration, GPT stages and the KV cache. No I/O."""
from .cache import KVCache
from .config import GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "KVCache"]
