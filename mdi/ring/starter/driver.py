"""The starter: configures the ring, runs the first stage, owns the prompts and
the text, and pipelines the samples' groups (micro-batches) around the ring.

Recurrent pipelining: every group's first step is sent before any answer is
awaited; afterwards, each TOKENS frame that comes back lets the starter advance
that group by one step and send it again, while the other groups are being
computed further down the ring. With G groups and N nodes, G >= N keeps every
node busy.

Faults: every wait on the ring is bounded by RunOptions.timeout (seconds of
silence). When a node dies, freezes or drops the run, the starter names it
(health checks with a short timeout, then the nodes' own reasons), raises
NodeFailure carrying the tokens produced so far, and tells the nodes that
still answer to drop the run, so the ring is idle again for the next starter.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import httpx
import torch

from ...checkpoint import load_stage, open_checkpoint
from ...engine.api import EngineFailure, Event
from ...generate.local import generate_timed
from ...generate.sampling import SamplingConfig
from ...generate.schedule import SampleState, accept, make_groups, plan_step
from ...generate.step import forward_context
from ...generate.stops import Stops
from ...model import GPT
from ...checkpoint.stream import shard_stream
from ...model.dtypes import DTYPES
from ...model.quant import configure_stage
from ...results import FailedNode, Failure, GenerationResult, HopStats, Texts
from ..protocol import aio
from ..protocol.aio import bounded
from ..protocol.auth import AuthError, answer, challenge
from ..protocol.local_link import (link_kind, link_scope, listen_local, local_links, new_name, open_link,
                         open_streams)
from ..cluster.nodes_config import NodeSpec, NodesConfig
from ..plan.partition import Shard, even_split, manual_split
from ..plan.placement import Placement, place_layers
from ..protocol.wire import DTYPE_CODES, Frame, Kind, Limits, WireError, read_frame, write_frame

log = logging.getLogger(__name__)
EXIT_NODE_FAILURE = 3


class NodeFailure(RuntimeError):
    """A node stopped answering; carries the tokens produced so far and, when
    known, the node that failed."""
    exit_code = EXIT_NODE_FAILURE

    def __init__(self, message: str, partial: GenerationResult | None = None,
                 node: NodeSpec | None = None, silent: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.partial = partial
        self.node = node
        self.silent = silent  # names of nodes that did not answer a health check


@dataclass
class RunOptions:
    device: str = "cpu"
    dtype: str = "float32"
    timeout: float = 10.0             # seconds of silence before a node counts as gone
    connect_retries: int = 5          # health checks at configure time, with backoff
    n_groups: int | None = None       # micro-batches; default min(n_samples, n_nodes)
    resend_context: bool = False      # no KV cache: the whole context crosses every hop
    quantize: str | None = None       # "int8": every node quantizes its own stage at load
    batch_invariant: bool = False     # per-row compute on every node (exact across groupings)
    max_context: int | None = None    # positions a run keeps (None: model/cache.py's default cap)
    partition: str | None = None      # "auto" | "even"; None: auto when nodes differ (placement.py)
    recover: bool = True              # on a node's failure: re-plan over the rest and resume


def lane_count(n_nodes: int, asked: int | None, parallel: int) -> int:
    """Lanes (micro-batches) of a run: --micro-batches when given, else one per node,
    but no more than the stages that can compute at once (placement.compute_units;
    0: unknown): lanes beyond that take turns on the same cores, each with a smaller
    batch and more switches (measured on the bundled model, 3 nodes on 2 cores:
    3 lanes 346 tokens/s, 2 lanes 451)."""
    if asked is not None:
        return asked
    return min(n_nodes, parallel) if parallel > 0 else n_nodes


def typical_context(prompts: list[list[int]], n_tokens: int) -> int:
    """The positions a run's sequences hold halfway through: where the probes time a
    block (attention reads the filled part of the cache, the head does not)."""
    return max(1, max(len(p) for p in prompts) + n_tokens // 2)


def plan_shards(nodes: NodesConfig, n_layer: int) -> list[Shard]:
    ring = nodes.ring
    manual = [n.layers for n in ring]
    if all(m is None for m in manual):
        return even_split(n_layer, len(ring))
    if any(m is None for m in manual):
        raise ValueError("give 'layers' for every node or for none")
    return manual_split(n_layer, manual)  # type: ignore[arg-type]


@dataclass
class Starter:
    nodes: NodesConfig
    token: str
    ckpt: str
    opts: RunOptions = field(default_factory=RunOptions)
    on_step: Callable[[int], None] | None = None     # progress callback (step index)
    on_event: Callable[[int, Event], None] | None = None  # (sample, event) as tokens come

    placement: Placement | None = field(default=None, init=False)  # the last run's split
    local_name: str = field(default_factory=new_name, init=False)  # its Unix socket, when used

    def run(self, prompts: list[list[int]], n_tokens: int, sampling: SamplingConfig,
            texts: Texts | None = None, stops: Stops = Stops()) -> GenerationResult:
        """Generate; the result's `tokens` hold each sample's new token ids, and with
        texts its `samples` the text. A sample ends early at one of `stops`.
        NodeFailure carries the partial result; both carry the run's split as `plan`."""
        if self.opts.resend_context and (stops.ids or stops.strings):
            raise ValueError("stop ids and strings need the KV-cache ring, not --resend-context")
        try:
            result = aio.run(self._run(prompts, n_tokens, sampling, texts, stops))
        except NodeFailure as e:
            if e.partial is not None and self.placement is not None:
                e.partial.plan = self.placement.to_json()
            raise
        if self.placement is not None:
            result.plan = self.placement.to_json()
        return result

    async def _place(self, config, n_samples: int, batch: int, context: int | None = None
                     ) -> list[Shard]:
        """The run's split (placement.py): printed, and refused if it cannot fit,
        before any weights move. context: the positions a sequence typically holds
        (where the probes time blocks), when the run knows it."""
        self.placement = None
        if len(self.nodes.ring) == 1:
            return plan_shards(self.nodes, config.n_layer)
        async with httpx.AsyncClient(timeout=self.opts.timeout) as http:
            for spec in self.nodes.secondaries:  # a node that is not up is named here
                await self._await_health(http, spec)
        self.placement = await place_layers(
            self.nodes, config, self.token, self.opts.partition, n_samples, batch,
            self.opts.dtype, self.opts.device, self.opts.timeout, self.opts.connect_retries,
            max_context=self.opts.max_context, quantize=self.opts.quantize, context=context)
        log.info("%s", self.placement.describe())
        return self.placement.shards

    # ------------------------------------------------------------------------
    async def _run(self, prompts, n_tokens, sampling, texts, stops) -> GenerationResult:
        if not self.opts.resend_context:
            return await self._run_engine(prompts, n_tokens, sampling, texts, stops)
        # --resend-context: the original system's loop, one sample per frame, no cache
        ring = self.nodes.ring
        config = open_checkpoint(self.ckpt).config
        groups = make_groups(len(prompts), len(prompts))
        shards = await self._place(config, len(prompts), max(len(g) for g in groups))
        stage, _ = load_stage(self.ckpt, 0, shards[0].stop, device=self.opts.device,
                              dtype=DTYPES[self.opts.dtype], quantize=self.opts.quantize,
                              max_context=self.opts.max_context)
        configure_stage(stage, self.opts.quantize, self.opts.batch_invariant)
        if len(ring) == 1:
            return self._run_single(stage, prompts, n_tokens, sampling, groups, texts)
        run_id = random.randrange(1, 2**32)
        limits = Limits(run_id, config.n_embd, config.block_size, len(prompts),
                        DTYPE_CODES[DTYPES[self.opts.dtype]], max(len(g) for g in groups))
        async with httpx.AsyncClient(timeout=self.opts.timeout,
                                     headers={"Authorization": f"Bearer {self.token}"}) as http:
            healths = [await self._await_health(http, n) for n in ring[1:]]
            local = await self._local_links(http, self.placement)
            inbound: asyncio.Queue = asyncio.Queue(maxsize=1)
            servers = await self._listen(run_id, inbound, local[0])
            links: list[asyncio.StreamWriter] = []
            try:
                await self._configure(http, run_id, config, shards, groups, sampling, healths,
                                      sockets=local)
                for spec in reversed(ring[1:]):
                    await self._post(http, spec, "/connect", {"run_id": run_id})
                _, writer = await self._open_first(ring[1], run_id, local[1])
                links.append(writer)
                reader, back = await self._wait(inbound.get(), ring[-1], "connecting back to the starter")
                links.append(back)
                return await self._pipeline(stage, prompts, n_tokens, sampling, groups, limits,
                                            writer, reader, http, texts)
            except Exception as e:
                for w in links:
                    w.close()
                await self._release(http, run_id, getattr(e, "silent", ()))
                raise
            finally:
                for w in links:
                    w.close()
                for server in servers:
                    server.close()

    async def _run_engine(self, prompts, n_tokens, sampling, texts, stops) -> GenerationResult:
        """The fixed batch as sequences of the engine (ring_engine.py): every prompt
        admitted at the first step with the run's token budget; sample i draws from
        the stream sample_seed(seed, i), as the fixed-batch nodes did."""
        from ...engine.batch import batch_params
        from .ring_engine import RingEngine

        lanes = make_groups(len(prompts), self.opts.n_groups or len(self.nodes.ring))
        shards = await self._place(open_checkpoint(self.ckpt).config, len(prompts),
                                   max(len(g) for g in lanes),  # probes time one lane's batch
                                   typical_context(prompts, n_tokens))
        engine = RingEngine(self.nodes, self.token, self.ckpt, max_seqs=len(prompts),
                            max_queue=len(prompts), opts=self.opts, lanes=self.opts.n_groups,
                            shards=shards, placement=self.placement)
        config = engine.config
        if len(self.nodes.ring) > 1:
            await engine.form()  # the starter's own errors (NodeFailure naming the node, ...)
        counts, times = [0] * len(prompts), []
        seqs: list = []

        def on_event(i: int, ev: Event) -> None:
            if self.on_event is not None:
                self.on_event(i, ev)
            if ev.token is None:  # a sample that ended early holds back no step
                counts[i] = max(counts[i], n_tokens)
            else:
                counts[i] += 1
            while min(counts) > len(times):  # step len(times) is complete for every sample
                times.append(time.perf_counter() - t0)
                if self.on_step:
                    self.on_step(len(times) - 1)

        async def drain(i: int, seq) -> None:
            async for ev in seq.events():
                on_event(i, ev)

        t0 = time.perf_counter()
        try:
            await engine.start()
            seqs = [engine.submit(p, q) for p, q in
                    zip(prompts, batch_params(len(prompts), n_tokens, sampling, stops))]
            await asyncio.gather(*(drain(i, s) for i, s in enumerate(seqs)))
            elapsed = time.perf_counter() - t0
        except EngineFailure as e:
            elapsed = time.perf_counter() - t0
            cause = e.__cause__
            message, node = str(cause or e), getattr(cause, "spec", None)
            failed = None if node is None else FailedNode(node.role, node.index, node.addr,
                                                          node.port, node.port_in)
            partial = self._result(config, seqs, min(counts), elapsed, times, [], texts,
                                   Failure(message, failed))
            partial.recoveries = engine.recoveries
            raise NodeFailure(message, partial, node) from None
        finally:
            await engine.close()
            if engine.recoveries:  # the run ended on another ring
                self.placement = engine.placement
        result = self._result(config, seqs, n_tokens, elapsed, times, engine.hops, texts)
        result.recoveries = engine.recoveries
        return result

    def _run_single(self, stage, prompts, n_tokens, sampling, groups, texts) -> GenerationResult:
        """One node: the ring is the starter alone, which is `mdi sample`."""
        result = generate_timed(stage, prompts, n_tokens, sampling, len(groups), self.on_step,
                                texts)
        result.hops = []  # a ring of one: no hop
        return result

    # ---- configuration ----------------------------------------------------
    async def _await_health(self, http: httpx.AsyncClient, spec: NodeSpec) -> dict:
        """Health-check a node, retrying with backoff (0.2 s, doubling, at most 2 s)."""
        delay, last = 0.2, None
        tries = max(1, self.opts.connect_retries)
        for attempt in range(1, tries + 1):
            try:
                r = await http.get(spec.url + "/health", timeout=min(self.opts.timeout, 5.0))
                if r.status_code == 200:
                    return r.json()
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = str(e) or type(e).__name__
            if attempt == tries:
                break
            log.info("%s is not up yet (%s); retrying in %.1f s", spec.describe(), last, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise NodeFailure(f"{spec.describe()} did not come up after {tries} tries: {last}",
                          node=spec)

    async def _post(self, http: httpx.AsyncClient, spec: NodeSpec, path: str, body: dict) -> dict:
        try:
            r = await http.post(spec.url + path, json=body)
        except httpx.HTTPError as e:
            raise NodeFailure(f"{spec.describe()} did not answer {path}: {e or type(e).__name__}",
                              node=spec) from None
        return _check(r, spec, path)

    async def _configure(self, http, run_id, config, shards, groups, sampling, healths,
                         sequences: bool = False, sockets: list[str | None] | None = None) -> None:
        """Configure every secondary; sequences: an engine run (groups are lanes of
        slots, sampling travels per sequence in ADMIT frames); sockets: the Unix socket
        each process of the ring is reached on (_local_links), None for TCP."""
        ring = self.nodes.ring
        sockets = sockets or [None] * len(ring)
        for i, (spec, shard, health) in enumerate(zip(ring[1:], shards[1:], healths), start=1):
            nxt = ring[(i + 1) % len(ring)]
            peer = {"addr": nxt.addr, "port": nxt.port_in}
            if sockets[(i + 1) % len(ring)]:
                peer["local"] = sockets[(i + 1) % len(ring)]
            chunk = health.get("chunk")
            local = bool(chunk and (chunk["start"], chunk["stop"]) == (shard.start, shard.stop)
                         and chunk["model"] == config.to_dict())
            body = {"run_id": run_id, "role": "finisher" if shard.is_last else "intermediate",
                    "start": shard.start, "stop": shard.stop, "model": config.to_dict(),
                    "dtype": self.opts.dtype, "device": spec.device,
                    "groups": [[g.start, g.stop] for g in groups],
                    "next": peer, "prev_addr": ring[i - 1].addr,
                    "sampling": sampling.to_dict() if shard.is_last and sampling else None,
                    "weights": "local" if local else "upload",
                    "quantize": self.opts.quantize, "batch_invariant": self.opts.batch_invariant}
            if sequences:
                body["sequences"] = True
            if sockets[i]:  # only then: a node that reports no link scope never sees the field
                body["prev_local"] = True
            if self.opts.max_context is not None:  # else the node's default cap: the same
                body["max_context"] = self.opts.max_context
            await self._post(http, spec, "/init", body)
            if not local:
                total, chunks = shard_stream(self.ckpt, shard)  # one tensor in memory at a time
                try:
                    r = await http.put(f"{spec.url}/weights/{run_id}", content=_aiter(chunks),
                                       timeout=max(self.opts.timeout, 60.0),
                                       headers={"content-type": "application/octet-stream",
                                                "content-length": str(total)})
                except httpx.HTTPError as e:
                    raise NodeFailure(f"{spec.describe()} did not take its weights: "
                                      f"{e or type(e).__name__}", node=spec) from None
                _check(r, spec, "/weights")
            log.info("%s: layers [%d, %d), weights %s", spec.describe(), shard.start, shard.stop,
                     "from its local chunk" if local else "uploaded")

    async def _local_links(self, http: httpx.AsyncClient, placement: Placement | None
                           ) -> list[str | None]:
        """The Unix socket each process of the ring is reached on, None for TCP
        (local_link.py): the nodes' /capabilities (those the placement read, else
        asked now) against the starter's own scope. A node that does not say links
        over TCP."""
        ring = self.nodes.ring
        caps = list(placement.caps) if placement is not None else []
        if len(caps) != len(ring):
            caps = [{}]
            for spec in ring[1:]:
                try:
                    r = await http.get(spec.url + "/capabilities")
                    caps.append(r.json() if r.status_code == 200 else {})
                except (httpx.HTTPError, ValueError):
                    caps.append({})
        return local_links([{"link_scope": link_scope()}] + caps[1:], self.local_name)

    async def _listen(self, run_id: int, inbound: asyncio.Queue, local: str | None
                      ) -> list[asyncio.base_events.Server]:
        """Listen for the finisher's link back: on the starter's data port, and on its
        Unix socket `local` when the finisher shares this machine."""
        spec = self.nodes.ring[0]

        def accept(r, w):
            return self._accept_finisher(r, w, run_id, inbound)

        try:
            servers = [await asyncio.start_server(accept, spec.addr, spec.port_in)]
        except OSError as e:
            raise OSError(f"the starter cannot listen for the finisher on {spec.addr}:"
                          f"{spec.port_in}: {e.strerror or e}") from None
        if local is not None:
            try:
                servers.append(await asyncio.start_unix_server(accept, sock=listen_local(local)))
            except OSError as e:
                for s in servers:
                    s.close()
                raise OSError(f"the starter cannot listen on its local socket {local}: "
                              f"{e.strerror or e}") from None
        return servers

    async def _open_first(self, spec: NodeSpec, run_id: int, local: str | None = None):
        """The data link to the first node: its Unix socket `local` when given (TCP
        if that cannot be reached), else TCP."""
        try:
            sock = await bounded(open_link(local, spec.addr, spec.port_in), self.opts.timeout)
            reader, writer = await open_streams(sock)
            await answer(reader, writer, self.token, run_id, self.opts.timeout)
        except (OSError, asyncio.TimeoutError, WireError, EOFError, AuthError) as e:
            raise NodeFailure(f"cannot open the data link to {spec.name} at "
                              f"{spec.addr}:{spec.port_in}: {e or type(e).__name__}",
                              node=spec) from None
        return reader, writer

    async def _accept_finisher(self, reader, writer, run_id: int, inbound: asyncio.Queue) -> None:
        peer = writer.get_extra_info("peername")
        try:
            await challenge(reader, writer, self.token, run_id, self.opts.timeout)
            inbound.put_nowait((reader, writer))
        except (AuthError, WireError, EOFError, asyncio.TimeoutError, OSError, asyncio.QueueFull) as e:
            log.warning("refused data connection from %s: %s", peer, e or type(e).__name__)
            writer.close()

    async def _wait(self, aw, spec: NodeSpec, what: str):
        try:
            return await bounded(aw, self.opts.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"{spec.describe()} timed out {what}", node=spec) from None

    # ---- generation --------------------------------------------------------
    async def _pipeline(self, stage: GPT, prompts, n_tokens, sampling, groups, limits,
                        writer, reader, http, texts: Texts | None) -> GenerationResult:
        """--resend-context: every step sends one sample's whole context (CONTEXT
        frames); the finisher samples and TOKENS come back."""
        config = stage.config
        run_id = limits.run_id
        first = self.nodes.ring[1]

        async def send(frame: Frame) -> int:
            return await self._write(writer, frame, first)

        states = [SampleState.from_prompt(p) for p in prompts]
        hop = HopStats("starter", self.nodes.ring[1].name, link=link_kind(writer))
        steps = [0] * len(groups)
        step_done = [0] * n_tokens
        times: list[float] = []
        in_flight: list[int] = []

        async def send_step(gi: int) -> None:
            """One sample's whole context through stage 0 (no cache: --resend-context)."""
            s = groups[gi].start
            plan_step(states[s], stage.context)  # moves the window on overflow
            context = states[s].tokens[states[s].window:]
            t = time.perf_counter()
            with torch.inference_mode():
                h = forward_context(stage, context)
            hop.compute_s += time.perf_counter() - t
            hop.decode_bytes += await send(Frame(Kind.CONTEXT, run_id, s, 0, h))
            hop.decode_tokens += 1
            in_flight.append(gi)

        t0 = time.perf_counter()
        try:
            for gi in range(len(groups)):
                await send_step(gi)
            while in_flight:
                gi = in_flight.pop(0)
                t_wait = time.perf_counter()
                frame = await self._next_frame(reader, limits)
                t_busy = time.perf_counter()
                compute_before = hop.compute_s
                hop.wait_s += t_busy - t_wait
                g = groups[gi]
                if frame.kind != Kind.TOKENS or frame.sample != g.start or frame.tensor.shape[0] != len(g):
                    raise WireError(f"expected TOKENS for samples {g.start}..{g.stop - 1}, got "
                                    f"{frame.kind.name} for sample {frame.sample}")
                for s, tok in zip(g, frame.tensor.tolist()):
                    if not 0 <= tok < config.vocab_size:
                        raise WireError(f"token id {tok} outside the vocabulary")
                    accept(states[s], tok)
                step = steps[gi]
                steps[gi] += 1
                step_done[step] += 1
                if step_done[step] == len(groups):
                    times.append(time.perf_counter() - t0)
                    if self.on_step:
                        self.on_step(step)
                if steps[gi] < n_tokens:
                    await send_step(gi)
                hop.frames += 1  # one frame back in, one step out: the starter's hop
                hop.other_s += time.perf_counter() - t_busy - (hop.compute_s - compute_before)
            elapsed = time.perf_counter() - t0
            await send(Frame(Kind.STOP, run_id))
            stop = await self._next_frame(reader, limits)
            if stop.kind != Kind.STOP:
                raise WireError(f"expected STOP back from the finisher, got {stop.kind.name}")
        except (NodeFailure, WireError, EOFError, OSError) as e:
            elapsed = time.perf_counter() - t0
            node, culprit, silent = await self._diagnose(http, run_id)
            if node is None and isinstance(e, NodeFailure):
                node = e.node
            message = f"{culprit}: {e}" if culprit else str(e)
            failed = None if node is None else FailedNode(node.role, node.index, node.addr,
                                                          node.port, node.port_in)
            partial = self._result(config, states, min(steps) if steps else 0, elapsed, times,
                                   [hop], texts, Failure(message, failed))
            raise NodeFailure(message, partial, node, silent) from None
        hops = [hop] + await self._collect_hops(http, run_id)
        return self._result(config, states, n_tokens, elapsed, times, hops, texts)

    async def _next_frame(self, reader, limits) -> Frame:
        try:
            return await bounded(read_frame(reader, limits), self.opts.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"no answer from the ring for {self.opts.timeout:g} s") from None
        except EOFError:
            raise NodeFailure("the finisher closed its link to the starter") from None

    async def _write(self, writer: asyncio.StreamWriter, frame: Frame, spec: NodeSpec) -> int:
        """Send a frame to the first secondary; a peer that takes nothing for `timeout` is gone."""
        try:
            return await bounded(write_frame(writer, frame), self.opts.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"{spec.name} at {spec.addr}:{spec.port_in} took no data for "
                              f"{self.opts.timeout:g} s", node=spec) from None
        except OSError as e:
            raise NodeFailure(f"the data link to {spec.name} at {spec.addr}:{spec.port_in} failed: "
                              f"{e or type(e).__name__}", node=spec) from None

    def _probe_timeout(self) -> float:
        return max(0.5, min(self.opts.timeout, 2.0))

    async def _diagnose(self, http: httpx.AsyncClient, run_id: int
                        ) -> tuple[NodeSpec | None, str | None, tuple[str, ...]]:
        """Name the node behind a failure: first one that does not answer its health
        check within a short timeout (dead or frozen), else the ones that dropped the
        run, with their reasons. Also returns the names of all silent nodes."""
        specs = self.nodes.secondaries
        timeout = self._probe_timeout()

        async def alive(spec: NodeSpec) -> bool:
            try:
                r = await http.get(spec.url + "/health", timeout=timeout)
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        answers = await asyncio.gather(*(alive(s) for s in specs))
        silent = tuple(spec.name for spec, ok in zip(specs, answers) if not ok)
        for spec, ok in zip(specs, answers):
            if not ok:
                return spec, f"{spec.describe()} (data port {spec.port_in}) stopped answering", silent
        dropped = []
        for spec in specs:
            try:
                r = await http.get(spec.url + "/status", timeout=timeout)
                last = (r.json().get("last_run") or {}) if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if last.get("run_id") == run_id and last.get("reason") not in (None, "run complete"):
                dropped.append((spec, f"{spec.describe()} dropped the run ({last['reason']})"))
        if dropped:
            return dropped[0][0], "; ".join(text for _, text in dropped), silent
        return None, None, silent

    async def _release(self, http: httpx.AsyncClient, run_id: int, skip: tuple[str, ...] = ()
                       ) -> None:
        """After a failure: ask every node that answers to drop this run (best effort;
        nodes in `skip` did not answer a health check just now)."""
        timeout = self._probe_timeout()

        async def stop(spec: NodeSpec) -> None:
            try:
                await http.post(spec.url + "/stop", json={"run_id": run_id}, timeout=timeout)
            except httpx.HTTPError:
                pass

        await asyncio.gather(*(stop(s) for s in self.nodes.secondaries if s.name not in skip))

    async def _collect_hops(self, http: httpx.AsyncClient, run_id: int) -> list[HopStats]:
        ring = self.nodes.ring
        hops = []
        for i, spec in enumerate(ring[1:], start=1):
            nxt = ring[(i + 1) % len(ring)]
            try:
                r = await http.get(spec.url + "/status")
                last = r.json().get("last_run") or {} if r.status_code == 200 else {}
            except httpx.HTTPError:
                last = {}
            if last.get("run_id") != run_id:
                log.warning("%s reported no statistics for this run", spec.describe())
                last = {}
            hops.append(HopStats(spec.name, nxt.name, last.get("decode_bytes_out", 0),
                                 last.get("decode_tokens_out", 0), last.get("prefill_bytes_out", 0),
                                 last.get("frames_timed", 0), last.get("wait_s", 0.0),
                                 last.get("compute_s", 0.0), last.get("other_s", 0.0),
                                 last.get("other_cpu_s", 0.0), last.get("send_s", 0.0),
                                 last.get("link", "")))
        return hops

    def _result(self, config, states, n_tokens, elapsed, times, hops, texts,
                failure: Failure | None = None) -> GenerationResult:
        n_nodes = len(self.nodes.ring)
        return GenerationResult.build(
            [s.generated for s in states], texts, n_tokens=n_tokens, gen_time_s=elapsed,
            step_times=times, n_layers=config.n_layer, block_size=config.block_size,
            mode="distributed" if n_nodes > 1 else "single", n_nodes=n_nodes, hops=hops,
            failure=failure)


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _check(r: httpx.Response, spec: NodeSpec, path: str) -> dict:
    if r.status_code == 200:
        return r.json()
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    if r.status_code == 401:
        raise AuthError(f"{spec.describe()} refused the cluster token ({path})")
    err = RuntimeError(f"{spec.describe()} refused {path} (HTTP {r.status_code}): {detail}")
    err.node = spec  # type: ignore[attr-defined]
    raise err
