"""Perplexity of a model on a text, with a sliding window.

The strided method of Hugging Face's "Perplexity of fixed-length models"
guide: windows of `window` tokens start every `stride` tokens; each window
scores only the tokens the previous window did not (its last `end - prev_end`
targets), so with stride < window every scored token but those of the first
window sees at least `window - stride` tokens of context. With window >= the
text's length it is one forward over the whole text. Every token but the first
is scored exactly once, except with stride == window, where each window's first
token has no context inside its window and is not scored.

The model is any callable from token ids (1, T) to logits (1, T, vocab): our
`GPT` (single-device, whole model), or something else to compare with.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids (1, T) -> logits (1, T, V)


@dataclass(frozen=True)
class Perplexity:
    nll_sum: float      # summed negative log-likelihood (nats) of the scored tokens
    n_scored: int       # tokens scored
    n_tokens: int       # tokens in the text
    n_windows: int      # forward passes
    window: int
    stride: int

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return self.nll_sum / self.n_scored

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {**asdict(self), "nll": self.nll, "ppl": self.ppl}


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_targets) of each forward over a text of n tokens; pure, for tests."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if n < 2:
        raise ValueError(f"the text must have at least 2 tokens, got {n}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        # the window's last (end - prev_end) tokens are new; its first token is never a target
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, ids: Sequence[int] | torch.Tensor, window: int,
               stride: int | None = None, device: str | torch.device = "cpu",
               on_window: Callable[[int, int], None] | None = None) -> Perplexity:
    """Sliding-window perplexity of ids under logits_fn (stride defaults to window // 2).

    Log-probabilities are taken in float32 whatever the model's dtype, and the
    sum is kept in float64. `on_window(i, n_windows)` reports progress.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    stride = max(1, window // 2) if stride is None else stride
    plan = windows(ids.numel(), window, stride)
    total, scored = 0.0, 0
    for i, (begin, end, k) in enumerate(plan):
        x = ids[begin:end].to(device)
        logits = logits_fn(x[None])[0]  # (T, V)
        # logits[t] predicts x[t + 1]; score the last k targets
        logp = F.log_softmax(logits[-k - 1:-1].float(), dim=-1)  # (k, V)
        nll = -logp.gather(1, x[-k:, None]).squeeze(1)           # (k,)
        total += nll.double().sum().item()
        scored += k
        if on_window is not None:
            on_window(i + 1, len(plan))
    return Perplexity(total, scored, ids.numel(), len(plan), window, stride)
