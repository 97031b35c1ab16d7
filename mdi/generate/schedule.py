"""What each sample's cache needs at each step: the context-overflow policy.

Shared, unchanged, by single-device and distributed generation, so both feed
the model exactly the same (tokens, positions) and produce the same text.

A sample's context is tokens[window:]. Its cache holds all of the context but
the newest token; a step decodes the newest token at position
len(context) - 1. When the context would exceed the positions a run keeps
(`GPT.context`: min(block_size, --max-context)), the window jumps so that only
the newest context // 2 tokens remain, the cache row is dropped and re-filled
(a prefill from position 0), then decoding goes on.

Chunked prefill (plan_chunk): a long prefill is written a chunk at a time,
positions cached..cached+n-1, over several steps; the sample decodes only in
the step whose chunk completes its context. Each chunk attends to the chunks
already in the cache (causal), so the cache ends as a one-piece prefill's.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleState:
    tokens: list[int]             # prompt followed by generated tokens
    n_prompt: int
    window: int = 0               # index in tokens of position 0
    cached: int = 0               # tokens of the context currently in the cache
    generated: list[int] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, prompt: list[int]) -> "SampleState":
        if not prompt:
            raise ValueError("a prompt must have at least one token")
        return cls(tokens=list(prompt), n_prompt=len(prompt))


@dataclass(frozen=True)
class StepPlan:
    """For one sample: an optional prefill, then one decode (none while a chunked
    prefill is still filling the cache)."""
    prefill: list[int]            # tokens to write at positions start..start+len-1 ([] for none)
    token: int | None             # token to decode (None: this step only prefills)
    position: int                 # its position (the decode's; the prefill's end when none)
    start: int = 0                # the prefill's first position

    @property
    def decodes(self) -> bool:
        return self.token is not None


def plan_step(s: SampleState, context: int) -> StepPlan:
    """Decide this step for one sample and update its cache bookkeeping;
    context: the positions the run keeps (GPT.context)."""
    if len(s.tokens) - s.window > context:
        s.window = len(s.tokens) - max(1, context // 2)
        s.cached = 0
    context = s.tokens[s.window:]
    prefill = context[s.cached:-1]
    start = s.cached
    s.cached = len(context)  # after this step the cache holds the whole context
    return StepPlan(prefill=prefill, token=context[-1], position=len(context) - 1, start=start)


def plan_chunk(s: SampleState, context: int, budget: int) -> StepPlan:
    """plan_step with at most `budget` prefill tokens this step (budget <= 0: no
    limit). A sample whose prefill does not fit writes `budget` tokens and does not
    decode (token None); the step that writes its last chunk decodes as plan_step."""
    if len(s.tokens) - s.window > context:
        s.window = len(s.tokens) - max(1, context // 2)
        s.cached = 0
    pending = len(s.tokens) - s.window - 1 - s.cached   # prefill tokens still to write
    if budget <= 0 or pending <= budget:
        return plan_step(s, context)
    start = s.cached
    prefill = s.tokens[s.window + start:s.window + start + budget]
    s.cached = start + budget
    return StepPlan(prefill=prefill, token=None, position=s.cached, start=start)


def needs_prefill(s: SampleState, context: int) -> bool:
    """Does the sample's next step write to its cache beyond the one decoded token
    (a prompt, a chunk still to come, or a re-prefill after a context overflow)?"""
    return len(s.tokens) - s.window > context or len(s.tokens) - s.window - 1 > s.cached


def accept(s: SampleState, token: int) -> None:
    s.tokens.append(token)
    s.generated.append(token)


def make_groups(n_samples: int, n_groups: int) -> list[range]:
    """Split samples 0..n-1 into n_groups contiguous, near-equal micro-batches."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if n_groups <= 0:
        raise ValueError(f"the number of micro-batches must be positive, got {n_groups}")
    n_groups = min(n_groups, n_samples)
    base, extra = divmod(n_samples, n_groups)
    groups, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups
