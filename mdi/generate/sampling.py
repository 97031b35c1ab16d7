"""Sampling as pure functions over one sample's logits.

Each sample owns its own torch.Generator, seeded from (seed, sample index), so
the tokens drawn for a sample do not depend on how samples are grouped into
batches or on which node does the sampling.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_k: int | None = 200
    seed: int = 1337

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        k = self.top_k
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """The random stream of one sample: independent of batching and placement."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + sample_index) % (2**63))
    return g


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Draw one token id from logits (V,). temperature 0 is greedy (argmax)."""
    logits = logits.detach().to("cpu", torch.float32)
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, cfg: SamplingConfig,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits (B, V), row b drawn with generators[b]."""
    return [sample_token(logits[b], cfg, g) for b, g in enumerate(generators)]
