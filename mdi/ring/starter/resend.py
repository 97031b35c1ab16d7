"""`--resend-context`: the original system's fixed-batch loop, kept to compare
against. No KV cache anywhere: every step sends one sample's whole context
through the starter's stage and around the ring as a CONTEXT frame; the
finisher samples and a TOKENS frame comes back.

Recurrent pipelining: every group's first step is sent before any answer is
awaited; afterwards, each TOKENS frame that comes back lets the starter advance
that group by one step and send it again, while the other groups are being
computed further down the ring. With G groups and N nodes, G >= N keeps every
node busy.

Faults: every wait on the ring is bounded by RunOptions.timeout (seconds of
silence). When a node dies, freezes or drops the run, the client names it
(RingClient.diagnose), NodeFailure carries the tokens produced so far, and the
nodes that still answer are told to drop the run.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import httpx
import torch

from ...generate.local import generate_timed
from ...generate.sampling import SamplingConfig
from ...generate.schedule import SampleState, accept, plan_step
from ...generate.step import forward_context
from ...model import GPT
from ...model.dtypes import DTYPES
from ...results import Failure, GenerationResult, HopStats, Texts
from ..cluster.nodes_config import NodeSpec
from ..plan.partition import Shard
from ..plan.placement import Placement
from ..protocol.aio import bounded
from ..protocol.local_link import link_kind
from ..protocol.wire import DTYPE_CODES, Frame, Kind, Limits, WireError, read_frame, write_frame
from .client import FormedRing, RingClient
from .options import NodeFailure, failure

OnStep = Callable[[int], None]


def run_single(stage: GPT, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
               n_groups: int, on_step: OnStep | None, texts: Texts | None) -> GenerationResult:
    """One node: the ring is the starter alone, which is `mdi sample`."""
    result = generate_timed(stage, prompts, n_tokens, sampling, n_groups, on_step, texts)
    result.hops = []  # a ring of one: no hop
    return result


async def run_resend(client: RingClient, stage: GPT, shards: list[Shard],
                     placement: Placement | None, prompts: list[list[int]], n_tokens: int,
                     sampling: SamplingConfig, groups: list[range], texts: Texts | None,
                     on_step: OnStep | None) -> GenerationResult:
    """Form the ring for a fixed batch (the finisher samples with `sampling`) and
    run it; on failure the nodes that answer drop the run."""
    config = stage.config
    run_id = random.randrange(1, 2**32)
    limits = Limits(run_id, config.n_embd, config.block_size, len(prompts),
                    DTYPE_CODES[DTYPES[client.opts.dtype]], max(len(g) for g in groups))
    async with client.http() as http:
        ring = await client.form(http, run_id, config, shards, groups, sampling,
                                 placement=placement)
        try:
            loop = ResendLoop(client, http, ring, limits, stage, groups, on_step)
            return await loop.run(prompts, n_tokens, texts)
        except Exception as e:
            ring.close()
            await client.release(http, run_id, getattr(e, "silent", ()))
            raise
        finally:
            ring.close()


class ResendLoop:
    """One fixed batch over a formed ring, one sample per group and frame."""

    def __init__(self, client: RingClient, http: httpx.AsyncClient, ring: FormedRing,
                 limits: Limits, stage: GPT, groups: list[range], on_step: OnStep | None) -> None:
        self.client, self.http, self.ring, self.limits = client, http, ring, limits
        self.stage, self.groups, self.on_step = stage, groups, on_step
        self.first: NodeSpec = client.nodes.ring[1]
        self.timeout = client.opts.timeout
        self.hop = HopStats("starter", self.first.name, link=link_kind(ring.writer))
        self.states: list[SampleState] = []
        self.steps = [0] * len(groups)       # steps each group has taken
        self.step_done: list[int] = []       # groups that finished each step
        self.times: list[float] = []         # when each step was complete for every group
        self.in_flight: list[int] = []       # groups sent, in order

    async def run(self, prompts: list[list[int]], n_tokens: int, texts: Texts | None
                  ) -> GenerationResult:
        self.states = [SampleState.from_prompt(p) for p in prompts]
        self.step_done = [0] * n_tokens
        run_id = self.limits.run_id
        t0 = time.perf_counter()
        try:
            for gi in range(len(self.groups)):
                await self._send_step(gi)
            while self.in_flight:
                await self._answer(self.in_flight.pop(0), n_tokens, t0)
            elapsed = time.perf_counter() - t0
            await self._write(Frame(Kind.STOP, run_id))
            stop = await self._next_frame()
            if stop.kind != Kind.STOP:
                raise WireError(f"expected STOP back from the finisher, got {stop.kind.name}")
        except (NodeFailure, WireError, EOFError, OSError) as e:
            elapsed = time.perf_counter() - t0
            node, culprit, silent = await self.client.diagnose(self.http, run_id)
            if node is None and isinstance(e, NodeFailure):
                node = e.node
            message = f"{culprit}: {e}" if culprit else str(e)
            partial = self._result(min(self.steps) if self.steps else 0, elapsed, [self.hop],
                                   texts, failure(message, node))
            raise NodeFailure(message, partial, node, silent) from None
        hops = [self.hop] + await self.client.collect_hops(self.http, run_id)
        return self._result(n_tokens, elapsed, hops, texts)

    async def _send_step(self, gi: int) -> None:
        """One sample's whole context through stage 0 (no cache: --resend-context)."""
        s = self.groups[gi].start
        state = self.states[s]
        plan_step(state, self.stage.context)  # moves the window on overflow
        t = time.perf_counter()
        with torch.inference_mode():
            h = forward_context(self.stage, state.tokens[state.window:])
        self.hop.compute_s += time.perf_counter() - t
        self.hop.decode_bytes += await self._write(Frame(Kind.CONTEXT, self.limits.run_id, s, 0, h))
        self.hop.decode_tokens += 1
        self.in_flight.append(gi)

    async def _answer(self, gi: int, n_tokens: int, t0: float) -> None:
        """Take group gi's TOKENS, and send its next step unless it is done."""
        hop = self.hop
        t_wait = time.perf_counter()
        frame = await self._next_frame()
        t_busy = time.perf_counter()
        compute_before = hop.compute_s
        hop.wait_s += t_busy - t_wait
        g = self.groups[gi]
        if frame.kind != Kind.TOKENS or frame.sample != g.start or frame.tensor.shape[0] != len(g):
            raise WireError(f"expected TOKENS for samples {g.start}..{g.stop - 1}, got "
                            f"{frame.kind.name} for sample {frame.sample}")
        for s, tok in zip(g, frame.tensor.tolist()):
            if not 0 <= tok < self.stage.config.vocab_size:
                raise WireError(f"token id {tok} outside the vocabulary")
            accept(self.states[s], tok)
        step = self.steps[gi]
        self.steps[gi] += 1
        self.step_done[step] += 1
        if self.step_done[step] == len(self.groups):
            self.times.append(time.perf_counter() - t0)
            if self.on_step:
                self.on_step(step)
        if self.steps[gi] < n_tokens:
            await self._send_step(gi)
        hop.frames += 1  # one frame back in, one step out: the starter's hop
        hop.other_s += time.perf_counter() - t_busy - (hop.compute_s - compute_before)

    async def _next_frame(self) -> Frame:
        try:
            return await bounded(read_frame(self.ring.reader, self.limits), self.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"no answer from the ring for {self.timeout:g} s") from None
        except EOFError:
            raise NodeFailure("the finisher closed its link to the starter") from None

    async def _write(self, frame: Frame) -> int:
        """Send a frame to the first secondary; a peer that takes nothing for `timeout` is gone."""
        spec = self.first
        try:
            return await bounded(write_frame(self.ring.writer, frame), self.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"{spec.name} at {spec.addr}:{spec.port_in} took no data for "
                              f"{self.timeout:g} s", node=spec) from None
        except OSError as e:
            raise NodeFailure(f"the data link to {spec.name} at {spec.addr}:{spec.port_in} failed: "
                              f"{e or type(e).__name__}", node=spec) from None

    def _result(self, n_tokens: int, elapsed: float, hops: list[HopStats], texts: Texts | None,
                fail: Failure | None = None) -> GenerationResult:
        config, n_nodes = self.stage.config, len(self.client.nodes.ring)
        return GenerationResult.build(
            [s.generated for s in self.states], texts, n_tokens=n_tokens, gen_time_s=elapsed,
            step_times=self.times, n_layers=config.n_layer, block_size=config.block_size,
            mode="distributed", n_nodes=n_nodes, hops=hops, failure=fail)
