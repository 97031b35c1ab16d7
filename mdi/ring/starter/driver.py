"""The starter's fixed-batch driver: what `mdi run` and `mdi starter` call.

Starter.run plans the ring (RingClient.place), runs every prompt as a sequence
of a RingEngine (engine/batch.py:run_sequences: all admitted at the first step
with the run's token budget; sample i draws from the stream sample_seed(seed,
i)) and builds the result (batch_result, with the hops, the plan and the
recoveries). `--resend-context` takes the original system's loop instead
(resend.py).

Faults: when the ring fails and cannot recover, NodeFailure names the node and
carries the tokens produced so far (`partial`), with the run's split as `plan`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...checkpoint import Checkpoint, open_checkpoint
from ...engine.api import EngineFailure, Event
from ...engine.batch import batch_params, batch_result, run_sequences
from ...engine.sequence import Sequence
from ...generate.sampling import SamplingConfig
from ...generate.schedule import make_groups
from ...generate.stops import Stops
from ...results import Failure, GenerationResult, Texts
from ..cluster.nodes_config import NodesConfig
from ..plan.placement import Placement
from ..protocol import aio
from .client import RingClient
from .options import NodeFailure, RunOptions, failure, first_stage, typical_context, with_mode
from .resend import run_resend, run_single
from .ring_engine import RingEngine


@dataclass
class Starter:
    """nodes/token: the ring and the cluster token; ckpt: the checkpoint, opened
    here once (or already opened) and passed down as the object."""
    nodes: NodesConfig
    token: str
    ckpt: str | Path | Checkpoint
    opts: RunOptions = field(default_factory=RunOptions)
    on_step: Callable[[int], None] | None = None     # progress callback (step index)
    on_event: Callable[[int, Event], None] | None = None  # (sample, event) as tokens come

    placement: Placement | None = field(default=None, init=False)  # the last run's split
    checkpoint: Checkpoint = field(init=False, repr=False)          # ckpt, opened
    client: RingClient = field(init=False, repr=False)              # the control plane

    def __post_init__(self) -> None:
        self.checkpoint = open_checkpoint(self.ckpt)
        self.opts = with_mode(self.opts, self.checkpoint)
        self.client = RingClient(self.nodes, self.token, self.checkpoint, self.opts)

    def run(self, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
            texts: Texts | None = None, stops: Stops = Stops()) -> GenerationResult:
        """Generate; the result's `tokens` hold each sample's new token ids, and with
        texts its `samples` the text. A sample ends early at one of `stops`.
        NodeFailure carries the partial result; both carry the run's split as `plan`."""
        if self.opts.resend_context and (stops.ids or stops.strings):
            raise ValueError("stop ids and strings need the KV-cache ring, not --resend-context")
        self.placement = None
        run = self._run_resend(prompts, n_tokens, sampling, texts) if self.opts.resend_context \
            else self._run_ring(prompts, n_tokens, sampling, texts, stops)
        try:
            result = aio.run(run)
        except NodeFailure as e:
            if e.partial is not None and self.placement is not None:
                e.partial.plan = self.placement.to_json()
            raise
        if self.placement is not None:
            result.plan = self.placement.to_json()
        return result

    async def _run_ring(self, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
                        texts: Texts | None, stops: Stops) -> GenerationResult:
        """The batch as sequences of a RingEngine; the ring is formed first, so its
        own errors (NodeFailure naming the node, AuthError, ...) come as they are."""
        n = len(prompts)
        lanes = make_groups(n, self.opts.n_groups or len(self.nodes.ring))
        shards, self.placement = await self.client.place(
            self.checkpoint.config, n, max(len(g) for g in lanes),  # probes time one lane's batch
            typical_context(prompts, n_tokens))
        nodes = self._ring_of(self.placement)
        engine = RingEngine(nodes, self.token, self.checkpoint,
                            texts.tokenizer if texts is not None else None, max_seqs=n,
                            max_queue=n, opts=self.opts, lanes=self.opts.n_groups,
                            shards=shards, placement=self.placement)
        if len(nodes.ring) > 1:
            await engine.form()
        progress = _Progress(n, n_tokens, self.on_step, self.on_event)
        seqs: list[Sequence] = []
        t0 = time.perf_counter()
        try:
            seqs, t0, elapsed = await run_sequences(
                engine, prompts, batch_params(n, n_tokens, sampling, stops), progress, seqs)
        except EngineFailure as e:
            cause = e.__cause__
            message, node = str(cause or e), getattr(cause, "spec", None)
            partial = self._result(engine, seqs, t0, time.perf_counter() - t0, progress.done,
                                   texts, failure(message, node))
            raise NodeFailure(message, partial, node) from None
        finally:
            if engine.recoveries:  # the run ended on another ring
                self.placement = engine.placement
        return self._result(engine, seqs, t0, elapsed, n_tokens, texts)

    def _result(self, engine: RingEngine, seqs: list[Sequence], t0: float, elapsed: float,
                n_tokens: int, texts: Texts | None, fail: Failure | None = None
                ) -> GenerationResult:
        """The batch's result; a failed run's (`fail`) counts the steps every sample
        completed, and its hops are unknown."""
        c, n_nodes = engine.config, len(engine.nodes.ring)
        result = batch_result(seqs, t0, elapsed, n_tokens, c.n_layer, c.block_size, texts,
                              mode="distributed" if n_nodes > 1 else "single", n_nodes=n_nodes,
                              hops=[] if fail else engine.hops, failure=fail)
        if fail:
            result.step_times = result.step_times[:n_tokens]
        result.recoveries = engine.recoveries
        return result

    async def _run_resend(self, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
                          texts: Texts | None) -> GenerationResult:
        """--resend-context: the original system's loop, one sample per frame, no cache."""
        groups = make_groups(len(prompts), len(prompts))
        shards, self.placement = await self.client.place(self.checkpoint.config, len(prompts),
                                                         max(len(g) for g in groups))
        stage = first_stage(self.checkpoint, shards[0].stop, self.opts)
        nodes = self._ring_of(self.placement)
        if len(nodes.ring) == 1:
            return run_single(stage, prompts, n_tokens, sampling, len(groups), self.on_step, texts)
        return await run_resend(self.client.with_nodes(nodes), stage, shards, self.placement,
                                prompts, n_tokens, sampling, groups, texts, self.on_step)

    def _ring_of(self, placement: Placement | None) -> NodesConfig:
        """The ring a placement planned: the nodes file's, less the nodes it left out."""
        return placement.nodes if placement is not None and placement.nodes is not None \
            else self.nodes


class _Progress:
    """Passes each (sample, event) on, and calls on_step(k) once step k is complete
    for every sample (a sample that ended early holds back no step)."""

    def __init__(self, n_samples: int, n_tokens: int, on_step: Callable[[int], None] | None,
                 on_event: Callable[[int, Event], None] | None) -> None:
        self.counts = [0] * n_samples
        self.n_tokens = n_tokens
        self.on_step, self.on_event = on_step, on_event
        self.done = 0  # steps complete for every sample

    def __call__(self, i: int, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(i, ev)
        if ev.token is None:
            self.counts[i] = max(self.counts[i], self.n_tokens)
        else:
            self.counts[i] += 1
        while min(self.counts) > self.done:
            if self.on_step:
                self.on_step(self.done)
            self.done += 1
