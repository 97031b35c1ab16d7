"""Sampling as pure functions over one sample's logits.

Each sample owns its own torch.Generator, seeded from (seed, sample index), so
the tokens drawn for a sample do not depend on how samples are grouped into
batches or on which node does the sampling.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


MAX_TOP_K = 2**31 - 1     # as /init's sampling.top_k
SEED_LIMIT = 2**63        # a sequence's stream seed is in 0..2**63-1 (an int64 on the wire)


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn: the one set of sampling parameters, from where they
    enter (a CLI run, an HTTP request, a node's ADMIT frame) to sample_token.

    Checked once, by this constructor, where they enter: a bad value raises
    ValueError whose message starts with the field's name (the CLI, the API and the
    nodes refuse with the same words). What is built from parameters that passed
    (an engine's Admit, a batch's per-sample streams) uses `trusted` and is not
    checked again. The defaults draw from the model's distribution unchanged.

    seed: a sequence's stream seed, or a batch's seed, sample i drawing from
    sample_seed(seed, i) (for_sample); 0..2**63-1 (an int64 on the wire); None: a
    random one (picked by the engine, or by the batch when it starts)."""
    temperature: float = 1.0          # 0 is greedy
    top_k: int | None = None          # keep the k likeliest tokens
    seed: int | None = None
    top_p: float | None = None        # nucleus: keep the smallest set of tokens with mass >= top_p

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        k = self.top_k
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
                raise ValueError(f"top_k must be a positive integer, got {k!r}")
            if k > MAX_TOP_K:
                raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {k}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)
                              or not 0 <= s < SEED_LIMIT):
            raise ValueError(f"seed must be in 0..2**63-1, got {s!r}")

    @classmethod
    def trusted(cls, temperature: float, top_k: int | None, seed: int | None,
                top_p: float | None) -> SamplingConfig:
        """Parameters that passed the constructor's check before (copied field by
        field into a message, or derived from checked ones): built without it."""
        self = object.__new__(cls)
        for name, value in (("temperature", temperature), ("top_k", top_k), ("seed", seed),
                            ("top_p", top_p)):
            object.__setattr__(self, name, value)  # frozen: as the dataclass __init__ does
        return self

    def for_sample(self, index: int) -> SamplingConfig:
        """Sample `index` of a batch drawn with these parameters: its own stream seed."""
        if self.seed is None:
            return self
        return SamplingConfig.trusted(self.temperature, self.top_k,
                                      sample_seed(self.seed, index), self.top_p)

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
    mass reaches top_p; logits (V,). The likeliest token always stays. The masses
    add up in float64, as in nucleus()."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of likelier tokens
    drop_sorted = before >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


NUCLEUS_FIRST_K = 256  # nucleus() looks among this many likeliest tokens first


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, ids) of the top_p nucleus of logits (V,), likeliest first: the tokens
    top_p_filter keeps. Found with a top-k of growing k, not a sort of the whole
    vocabulary (4 ms for 50257 tokens): the nucleus lies within the k likeliest
    tokens once they hold a mass of top_p."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    n = probs.numel()
    k = min(n, NUCLEUS_FIRST_K)
    while True:
        top, ids = torch.topk(probs, k)
        if k == n or float(top.sum()) >= top_p:
            break
        k = min(n, 8 * k)
    before = torch.cumsum(top, dim=0) - top  # the mass of the likelier tokens
    keep = int((before < top_p).sum().clamp(min=1))
    return logits[ids[:keep]], ids[:keep]


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Draw one token id from logits (V,). temperature 0 is greedy (argmax).

    top_k keeps the k likeliest tokens (torch.topk breaks a tie at the k-th), then
    top_p the nucleus of those. The draw takes one uniform number from `generator`
    and inverts the kept tokens' cumulative distribution (in float64):
    torch.multinomial draws one exponential per entry of the vocabulary instead,
    about 1 ms per row for GPT-2's 50257 tokens on a CPU core."""
    logits = logits.detach().to("cpu", torch.float32)
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    ids = None
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        logits, ids = torch.topk(logits, cfg.top_k)  # the candidates, likeliest first
    if cfg.top_p is not None and cfg.top_p < 1:
        if ids is None:
            logits, ids = nucleus(logits, cfg.top_p)
        else:  # the nucleus of the top-k tokens' own distribution
            logits = top_p_filter(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
    cdf = torch.cumsum(probs, dim=0)
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0:
        raise ValueError("cannot sample: the logits hold NaN or infinity")
    u = torch.rand((), generator=generator, dtype=torch.float64) * total
    i = int(torch.searchsorted(cdf, u, right=True))  # the first entry whose cdf passes u
    if i >= cdf.numel():  # u rounded up to the total: the last token that can be drawn
        i = int(torch.nonzero(probs)[-1])
    return i if ids is None else int(ids[i])


def sample_rows(logits: torch.Tensor, cfg: SamplingConfig,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of logits (B, V), row b drawn with generators[b]."""
    logits = logits.detach().to("cpu", torch.float32)  # one copy for the step, not one per row
    return [sample_token(logits[b], cfg, g) for b, g in enumerate(generators)]
