"""What a user waits for: time to first token and inter-token latency, and prompts
of a given token length to measure them by.

A prompt of N tokens is a fixed English passage (public domain) encoded with the
model's own tokenizer, its ids repeated until there are N: the same ids on every
run and every node count, whatever the tokenizer (a char model's vocabulary
holds every character of the passage, a BPE one makes fewer, longer tokens).
"""
from __future__ import annotations

import math

import numpy as np

from ..tokenizer import Tokenizer

PASSAGE = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
"""


LATENCY_FIELDS = ["ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "ttft_count", "itl_count"]


def prompt_ids(tokenizer: Tokenizer, n_tokens: int) -> list[int]:
    """n_tokens token ids of PASSAGE, repeated as often as it takes (deterministic)."""
    if n_tokens < 1:
        raise ValueError(f"--prompt-tokens must be positive, got {n_tokens}")
    ids = tokenizer.encode(PASSAGE)
    if not ids:
        raise ValueError("the tokenizer makes no tokens of the prompt passage")
    return (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def latency_stats(token_times: list[list[float]]) -> dict[str, float | int]:
    """TTFT and ITL percentiles over sequences, from each one's token times (seconds since
    its request): TTFT is a sequence's first time, ITL every gap between its next ones."""
    ttft = [t[0] for t in token_times if t]
    itl = [b - a for t in token_times for a, b in zip(t, t[1:])]
    return {"ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "ttft_count": len(ttft), "itl_count": len(itl)}
