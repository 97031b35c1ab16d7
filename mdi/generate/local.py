"""Single-device generation with a KV cache: the baseline every distributed run
must reproduce token for token.

Samples are grouped into micro-batches (one group by default). A step of a
group prefills the samples that need it, one at a time, then decodes one token
for every sample in the group. Each sample draws from its own generator; with
the model's `batch_invariant` set (`--batch-invariant`) its numbers do not depend
on its step-mates either, so the tokens do not depend on the grouping.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..model import GPT
from ..results import GenerationResult, Texts
from .sampling import SamplingConfig, sample_generator, sample_rows
from .schedule import SampleState, accept, make_groups, plan_step
from .step import decode, prefill  # module globals: tests record the calls


@dataclass
class Step:
    """The tokens produced in one step, one per sample (index = sample id)."""
    index: int
    tokens: list[int]


class LocalGenerator:
    def __init__(self, model: GPT, prompts: list[list[int]], sampling: SamplingConfig,
                 n_groups: int = 1) -> None:
        if not (model.has_embeddings and model.has_head):
            raise ValueError("single-device generation needs the whole model")
        self.model = model
        self.sampling = sampling
        self.states = [SampleState.from_prompt(p) for p in prompts]
        self.groups = make_groups(len(prompts), n_groups)
        self.caches = [model.new_cache(len(g)) for g in self.groups]
        seed = secrets.randbits(63) if sampling.seed is None else sampling.seed  # None: random
        self.generators = [sample_generator(seed, i) for i in range(len(prompts))]

    @torch.inference_mode()
    def step(self) -> list[int]:
        out = [0] * len(self.states)
        for group, cache in zip(self.groups, self.caches):
            plans = [plan_step(self.states[s], self.model.context) for s in group]
            for row, plan in enumerate(plans):
                if plan.prefill:
                    prefill(self.model, cache, row, plan.prefill)
            logits = decode(self.model, cache, [p.token for p in plans], [p.position for p in plans])
            new = sample_rows(logits, self.sampling, [self.generators[s] for s in group])
            for s, tok in zip(group, new):
                accept(self.states[s], tok)
                out[s] = tok
        return out

    def generate(self, n_tokens: int) -> Iterator[Step]:
        for i in range(n_tokens):
            yield Step(i, self.step())


def generate(model: GPT, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
             n_groups: int = 1) -> list[list[int]]:
    """Generate n_tokens new tokens per prompt; returns the new tokens of each sample."""
    gen = LocalGenerator(model, prompts, sampling, n_groups)
    for _ in gen.generate(n_tokens):
        pass
    return [s.generated for s in gen.states]


def generate_timed(model: GPT, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
                   n_groups: int = 1, on_step: Callable[[int], None] | None = None,
                   texts: Texts | None = None) -> GenerationResult:
    """Generate and time every step: what `mdi sample` and the benchmarks report.
    With texts, the result also holds the prompts and the generated text."""
    gen = LocalGenerator(model, prompts, sampling, n_groups)
    t0, times = time.perf_counter(), []
    for step in gen.generate(n_tokens):
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(step.index)
    return GenerationResult.build([s.generated for s in gen.states], texts, n_tokens=n_tokens,
                                  gen_time_s=time.perf_counter() - t0, step_times=times,
                                  n_layers=model.config.n_layer,
                                  block_size=model.config.block_size)
