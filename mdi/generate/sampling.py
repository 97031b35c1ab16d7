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
    top_p: float | None = None        # nucleus: keep the smallest set of tokens with mass >= top_p

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        k = self.top_k
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        p = self.top_p
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["top_p"] is None:  # the fixed-batch ring's /init body has no top_p field
            del d["top_p"]
        return d


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample `sample_index`'s random stream in a run seeded with `seed`."""
    return (seed * 1_000_003 + sample_index) % (2**63)


def seeded_generator(stream_seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed)
    return g


def sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """The random stream of one sample: independent of batching and placement."""
    return seeded_generator(sample_seed(seed, sample_index))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the smallest set of likeliest tokens whose probability
    mass reaches top_p; logits (V,). The likeliest token always stays."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of likelier tokens
    drop_sorted = before >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Draw one token id from logits (V,). temperature 0 is greedy (argmax)."""
    logits = logits.detach().to("cpu", torch.float32)
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = top_p_filter(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits: torch.Tensor, cfg: SamplingConfig,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits (B, V), row b drawn with generators[b]."""
    logits = logits.detach().to("cpu", torch.float32)  # one copy for the step, not one per row
    return [sample_token(logits[b], cfg, g) for b, g in enumerate(generators)]
