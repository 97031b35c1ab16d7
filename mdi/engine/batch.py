"""A fixed batch through the engine: what `mdi sample`, `run` and `starter` do.

Every prompt is submitted at once with the run's token budget, so all samples
are admitted at the first step and move in lockstep, exactly as the
fixed-batch loops did; sample i draws from the stream sample_seed(seed, i), so
the tokens equal the fixed-batch ones for the same seed.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ..generate.sampling import SamplingConfig
from ..generate.stops import Stops
from ..results import GenerationResult, Texts
from .api import Event, SeqParams
from .scheduler import PipelineEngine
from .sequence import Sequence

OnEvent = Callable[[int, Event], None]  # (sample index, event)


def batch_params(n_samples: int, n_tokens: int, sampling: SamplingConfig,
                 stops: Stops = Stops()) -> list[SeqParams]:
    """Sample i draws from sampling.for_sample(i): the stream sample_seed(seed, i)."""
    return [SeqParams(n_tokens, sampling=sampling.for_sample(i), stop=stops.strings,
                      stop_ids=stops.ids)
            for i in range(n_samples)]


async def run_sequences(engine: PipelineEngine, prompts: list[list[int]], params: list[SeqParams],
                        on_event: OnEvent | None = None, seqs: list[Sequence] | None = None
                        ) -> tuple[list[Sequence], float, float]:
    """Start the engine, run every prompt to its end, close it.
    Returns the sequences, the start time (perf_counter) and the elapsed seconds.
    seqs: a list to fill as the prompts are submitted, so a caller still holds
    the sequences (and their tokens so far) when the engine fails."""
    seqs = [] if seqs is None else seqs
    await engine.start()
    try:
        t0 = time.perf_counter()
        seqs.extend(engine.submit(p, q) for p, q in zip(prompts, params))

        async def drain(i: int, seq: Sequence) -> None:
            async for ev in seq.events():
                if on_event is not None:
                    on_event(i, ev)

        await asyncio.gather(*(drain(i, s) for i, s in enumerate(seqs)))
        elapsed = time.perf_counter() - t0
    finally:
        await engine.close()
    return seqs, t0, elapsed


def batch_result(seqs: list[Sequence], t0: float, elapsed: float, n_tokens: int,
                 n_layers: int, block_size: int, texts: Texts | None = None,
                 **fields: Any) -> GenerationResult:
    """GenerationResult of a fixed batch: step i ends when every sample that reaches
    token i has it (samples that stopped early count no more). fields: more of the
    result's (a ring's mode, hops, failure)."""
    steps = max((len(s.stats.token_times) for s in seqs), default=0)
    times = [max(s.stats.token_times[i] for s in seqs if len(s.stats.token_times) > i) - t0
             for i in range(steps)]
    return GenerationResult.build([list(s.generated) for s in seqs], texts, n_tokens=n_tokens,
                                  gen_time_s=elapsed, step_times=times, n_layers=n_layers,
                                  block_size=block_size,
                                  token_times=[[t - t0 for t in s.stats.token_times] for s in seqs],
                                  **fields)


def generate_local(engine_factory: Callable[[], PipelineEngine], prompts: list[list[int]],
                   n_tokens: int, sampling: SamplingConfig, on_event: OnEvent | None = None,
                   texts: Texts | None = None, stops: Stops = Stops()) -> GenerationResult:
    """Run a fixed batch on an engine made inside the event loop (sync entry point)."""
    async def main() -> GenerationResult:
        engine = engine_factory()
        # Nothing else on this loop, which runs on the caller's thread (the one that loaded
        # the model): a single device computes every step here, prefills too, so that one
        # thread runs all of the process's OpenMP work. Once a second thread has run a
        # parallel region, libgomp finds more of its threads than cores and stops spinning
        # between regions: every region sleeps and wakes its helper (SmolLM2 int4, one
        # sequence, quiet 2-core machine: 26-30 -> 46-47 tokens/s; docs/benchmarks.md)
        engine.compute_inline = engine.link is None
        seqs, t0, elapsed = await run_sequences(
            engine, prompts, batch_params(len(prompts), n_tokens, sampling, stops), on_event)
        c = engine.config
        return batch_result(seqs, t0, elapsed, n_tokens, c.n_layer, c.block_size, texts)

    return asyncio.run(main())
