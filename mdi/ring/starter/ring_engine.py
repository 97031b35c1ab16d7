"""The engine over the ring: the starter runs the first stage and schedules
sequences; the nodes hold a KV slot per sequence (a *sequence run*, see
docs/wire.md).

RingEngine forms the ring at start() with the starter's configuration steps
(health, /init with `sequences: true` and the lanes as groups, weights,
/connect, the data links with their handshakes), then runs the scheduler of
engine/scheduler.py over a TcpLink. close() sends STOP around the ring; the
nodes end the run and wait for the next one. A node that fails is named (the
starter's diagnosis: health checks, then the nodes' own reasons) in the
EngineFailure every live sequence receives; the nodes that still answer are
told to drop the run, so a new RingEngine can form the ring again.

Recovery (RunOptions.recover, on by default): when a node fails mid-generation
the engine does not fail its sequences. It drops the node that failed and the
ones that do not answer a health check, re-plans the layers over the nodes
still alive plus the spares of the nodes file (as many as nodes were lost,
all of them if that does not fit), loads the new ranges (the first stage here
too, if its range moved), forms the ring again under a new run id, and the
scheduler resumes every live sequence by prefilling its tokens so far
(PipelineEngine._rewind): a greedy sequence's text is the uninterrupted one.
With no node left the starter runs the whole model alone. Only when no plan
fits does the engine fail as before, naming the node that failed first.
`recoveries` records each one (what failed, the new ring and plan, seconds).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

import httpx

from ...checkpoint import load_stage, open_checkpoint
from ...engine.api import EngineFailure
from ...engine.link import LinkClosed
from ...engine.messages import Decode, Message, Prefill, Tokens
from ...engine.scheduler import PipelineEngine
from ...engine.slots import SlotError, SlotStage
from ...model.dtypes import DTYPES
from ...tokenizer import Tokenizer
from ..protocol.aio import bounded
from ..cluster.nodes_config import NodeSpec, NodesConfig
from ..protocol.seq_frames import to_frame, to_message
from ...results import HopStats
from ..plan.partition import Shard
from ..plan.capability import node_capabilities, stage_memory
from ..plan.placement import Placement
from ..plan.planner import PlanError
from ..protocol.local_link import link_kind
from .driver import NodeFailure, RunOptions, Starter, lane_count, plan_shards
from ..protocol.wire import (DTYPE_CODES, Frame, Kind, Limits, WireError, encode_frame, read_frame,
                   write_frame)

log = logging.getLogger(__name__)
MAX_RECOVERIES_IN_WINDOW = 3     # more recoveries than this within the window: the ring keeps failing
RECOVERY_WINDOW_S = 60.0


def default_lanes(n_nodes: int, placement: Placement | None) -> int:
    """One lane per node, but no more than the nodes can compute at once
    (starter.lane_count; unknown before the ring is planned)."""
    parallel = placement.parallel if placement is not None else 0
    lanes = lane_count(n_nodes, None, parallel)
    if lanes < n_nodes:
        log.info("%d nodes share the cores of %d: %d lanes", n_nodes, parallel, lanes)
    return lanes


class TcpLink:
    """The engine's Link over the ring's data plane: frames to the first secondary,
    TOKENS / SEQ_TOKENS back from the finisher.

    Silence only counts while a Decode is unanswered: an idle server may wait
    for requests as long as it likes; a ring that does not answer a Decode
    within `timeout` seconds (from the Decode, or from the previous answer)
    has failed."""

    def __init__(self, starter: Starter, http: httpx.AsyncClient, limits: Limits,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 back: asyncio.StreamWriter, slots: SlotStage, timeout: float) -> None:
        self.starter = starter
        self.http = http
        self.limits = limits
        self.reader, self.writer, self.back = reader, writer, back
        self.slots = slots                   # the engine's first stage: the lanes
        self.timeout = timeout
        self.outstanding = 0                 # Decodes sent and not answered
        self.progress = time.monotonic()     # last Decode out while idle, or answer in
        self.failed: LinkClosed | None = None
        self.hop = HopStats("starter", starter.nodes.ring[1].name, link=link_kind(writer))

    @property
    def first(self) -> NodeSpec:
        return self.starter.nodes.ring[1]

    async def send(self, msg: Message) -> None:
        if self.failed is not None:
            raise self.failed
        frame = to_frame(msg, self.limits.run_id, self.slots)
        try:
            data = encode_frame(frame)
            n = len(data)
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size():  # the socket did not take it all
                await bounded(self.writer.drain(), self.timeout)
            else:  # no wait; raises if the link is gone
                await self.writer.drain()
        except asyncio.TimeoutError:
            raise await self._failure(f"{self.first.name} at {self.first.addr}:{self.first.port_in} "
                                      f"took no data for {self.timeout:g} s", self.first) from None
        except OSError as e:
            raise await self._failure(f"the data link to {self.first.name} at {self.first.addr}:"
                                      f"{self.first.port_in} failed: {e or type(e).__name__}",
                                      self.first) from None
        if isinstance(msg, Decode):
            self.hop.decode_bytes += n
            self.hop.decode_tokens += len(msg.slots)
            if self.outstanding == 0:
                self.progress = time.monotonic()
            self.outstanding += 1
        elif isinstance(msg, Prefill):
            self.hop.prefill_bytes += n

    async def recv(self) -> Tokens:
        while True:
            if self.failed is not None:
                raise self.failed
            wait = self.timeout
            if self.outstanding:
                wait = max(0.0, self.progress + self.timeout - time.monotonic())
            try:
                frame = await bounded(read_frame(self.reader, self.limits), wait)
            except asyncio.TimeoutError:
                if self.outstanding and time.monotonic() - self.progress >= self.timeout:
                    raise await self._failure(f"no answer from the ring for {self.timeout:g} s") \
                        from None
                continue
            except EOFError:
                raise await self._failure("the finisher closed its link to the starter") from None
            except (WireError, OSError) as e:
                raise await self._failure(f"bad data from the finisher: {e}") from None
            if frame.kind not in (Kind.TOKENS, Kind.SEQ_TOKENS) or not self.outstanding:
                raise await self._failure(f"unexpected {frame.kind.name} frame from the finisher")
            self.outstanding -= 1
            self.progress = time.monotonic()
            try:
                msg = to_message(frame, self.slots)
            except (WireError, SlotError) as e:
                raise await self._failure(f"bad data from the finisher: {e}") from None
            assert isinstance(msg, Tokens)
            return msg

    async def _failure(self, what: str, node: NodeSpec | None = None) -> LinkClosed:
        """Name the node behind a failure and release the run on the nodes that answer."""
        if self.failed is not None:
            return self.failed
        spec, culprit, silent = await self.starter._diagnose(self.http, self.limits.run_id)
        spec = spec or node
        await self.starter._release(self.http, self.limits.run_id, silent)
        self.failed = LinkClosed(f"{culprit}: {what}" if culprit else what,
                                 node=spec.describe() if spec else None)
        self.failed.spec = spec  # type: ignore[attr-defined]
        self.failed.silent = silent  # type: ignore[attr-defined]
        return self.failed

    def abandon(self) -> None:
        """Close the data links without STOP: the ring behind them failed."""
        self.writer.close()
        self.back.close()

    async def close(self) -> None:
        """STOP once around the ring; the nodes end the run and stay up."""
        try:
            if self.failed is None:
                await bounded(write_frame(self.writer, Frame(Kind.STOP, self.limits.run_id)),
                              self.timeout)
                while True:
                    f = await bounded(read_frame(self.reader, self.limits), self.timeout)
                    if f.kind == Kind.STOP:
                        break
        except (asyncio.TimeoutError, OSError, EOFError, WireError) as e:
            log.warning("the ring did not return STOP: %s", e or type(e).__name__)
            await self.starter._release(self.http, self.limits.run_id)
        finally:
            self.writer.close()
            self.back.close()


class RingEngine(PipelineEngine):
    """Continuous batching over a ring of nodes.

    nodes/token: the ring and the cluster token (as for `mdi starter`); ckpt: the
    checkpoint the starter loads its first stage from and streams the nodes'
    ranges of; max_seqs: sequences in flight (KV slots on every node), grouped
    into min(max_seqs, ring size) lanes; max_queue: waiting sequences before
    submit raises EngineBusy; opts: device, dtype and timeout of the run; lanes:
    micro-batches (default one per node, but no more than the nodes can compute
    at once, placement.compute_units, decided when the ring is planned here).
    batch_invariant: True/False overrides
    opts.batch_invariant (per-row compute on every stage, carried in /init: a
    sequence's tokens never depend on its step-mates); None keeps opts'. shards:
    a split already planned (Starter._place); None plans it when the ring forms
    (--partition, per-node layers, or auto when the nodes differ).
    """

    def __init__(self, nodes: NodesConfig, token: str, ckpt: str, tokenizer: Tokenizer | None = None,
                 max_seqs: int = 8, max_queue: int | None = None, opts: RunOptions | None = None,
                 retry_after: float = 1.0, lanes: int | None = None,
                 batch_invariant: bool | None = None, shards: list[Shard] | None = None,
                 placement: Placement | None = None) -> None:
        self.opts = opts or RunOptions()
        if batch_invariant is not None:
            self.opts = dataclasses.replace(self.opts, batch_invariant=batch_invariant)
        ck = open_checkpoint(ckpt)
        self._planned = shards is not None
        self._lanes_given = lanes is not None
        self.shards = shards or plan_shards(nodes, ck.config.n_layer)
        self.ck = ck
        stage = self._load_first(self.shards[0].stop)
        tokenizer = tokenizer or ck.tokenizer()
        super().__init__(stage, tokenizer.decode, max_seqs,
                         n_stages=lanes or default_lanes(len(nodes.ring), placement),
                         link=None, max_queue=max_queue, retry_after=retry_after)
        self.tokenizer = tokenizer
        self.nodes = nodes
        self.starter = Starter(nodes, token, ckpt, self.opts)
        self.run_id: int | None = None
        self._http: httpx.AsyncClient | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self.hops: list[HopStats] = []   # per hop, after close()
        self.placement = placement       # the ring's split (placement.py), once planned
        self.recoveries: list[dict] = []  # one per recovery: what failed, the new ring, seconds
        self._recovered_at: list[float] = []

    def _load_first(self, stop: int):
        stage, _ = load_stage(self.ck, 0, stop, device=self.opts.device,
                              dtype=DTYPES[self.opts.dtype], quantize=self.opts.quantize,
                              batch_invariant=self.opts.batch_invariant,
                              max_context=self.opts.max_context)
        return stage

    async def _plan(self) -> None:
        """Plan the current ring (Starter._place: printed, refused if it cannot fit);
        the first stage is loaded again when its range moved."""
        shards = await self.starter._place(self.config, self.max_seqs, max(self.sizes))
        self.placement = self.starter.placement
        lanes = default_lanes(len(self.nodes.ring), self.placement)
        if not self._lanes_given and lanes != len(self.sizes) and not self.running:
            self._relane(lanes)
        if shards[0].stop != self.shards[0].stop:  # off the loop: serve keeps answering /health
            stage = await asyncio.get_running_loop().run_in_executor(
                None, self._load_first, shards[0].stop)
            self.first = SlotStage(stage, self.sizes)
        self.shards = shards

    async def start(self) -> None:
        """Form the ring (unless form() did) and start scheduling; a node that fails
        to join raises EngineFailure naming it."""
        if len(self.nodes.ring) > 1 and self.link is None:
            try:
                await self.form()
            except NodeFailure as e:
                raise EngineFailure(str(e), node=e.node.describe() if e.node else None) from e
            except (RuntimeError, OSError, ValueError) as e:  # refused /init, token, port
                raise EngineFailure(str(e)) from e
        await super().start()

    async def close(self) -> None:
        """Cancel what still runs, STOP around the ring, collect the hops' statistics."""
        try:
            await super().close()
            link = self.link
            if isinstance(link, TcpLink) and link.failed is None and self._http is not None:
                assert self.run_id is not None
                self.hops = [link.hop] + await self.starter._collect_hops(self._http, self.run_id)
        finally:
            await self._close_transport()

    async def _close_transport(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def form(self) -> None:
        """Configure the nodes and open the data links; raises the starter's errors
        (NodeFailure naming the node, AuthError, ...) as they are, leaving nothing
        open (the nodes that took part are told to drop the run). Before start()."""
        try:
            if not self._planned:
                await self._plan()
                self._planned = True
            await self._form()
        except BaseException:
            await self._close_transport()
            raise

    async def _form(self) -> None:
        st, ring = self.starter, self.nodes.ring
        config = self.config
        run_id = random.randrange(1, 2**32)
        self.run_id = run_id
        lanes = [range(lane.slots.start, lane.slots.stop) for lane in self.lanes]
        limits = Limits(run_id, config.n_embd, config.block_size, self.first.n_slots,
                        DTYPE_CODES[DTYPES[self.opts.dtype]], max(self.sizes), sequences=True)
        self._http = http = httpx.AsyncClient(timeout=self.opts.timeout,
                                              headers={"Authorization": f"Bearer {st.token}"})
        healths = [await st._await_health(http, n) for n in ring[1:]]
        local = await st._local_links(http, self.placement)
        inbound: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._servers = await st._listen(run_id, inbound, local[0])
        writer = None
        try:
            await st._configure(http, run_id, config, self.shards, lanes, None, healths,
                                sequences=True, sockets=local)
            for spec in reversed(ring[1:]):
                await st._post(http, spec, "/connect", {"run_id": run_id})
            _, writer = await st._open_first(ring[1], run_id, local[1])
            reader, back = await st._wait(inbound.get(), ring[-1], "connecting back to the starter")
        except BaseException:
            if writer is not None:
                writer.close()
            await st._release(http, run_id)
            raise
        self.link = TcpLink(st, http, limits, reader, writer, back, self.first, self.opts.timeout)
        log.info("ring formed: %d node(s), %d lane(s) of %s slot(s), run %d, %d of %d link(s) "
                 "over local sockets", len(ring), len(self.sizes), "/".join(map(str, self.sizes)),
                 run_id, sum(1 for name in local if name), len(ring))

    # ---- recovery ------------------------------------------------------------------
    async def _recover(self, e: LinkClosed) -> bool:
        if not self.opts.recover:
            return False
        t0 = time.perf_counter()
        recent = [r for r in self._recovered_at if t0 - r < RECOVERY_WINDOW_S]
        if len(recent) >= MAX_RECOVERIES_IN_WINDOW:
            log.error("%d recoveries in %g s: the ring keeps failing; giving up",
                      len(recent), RECOVERY_WINDOW_S)
            return False
        self._recovered_at = recent + [t0]
        failed: NodeSpec | None = getattr(e, "spec", None)
        lost = set(getattr(e, "silent", ())) | ({failed.name} if failed else set())
        old = self.nodes
        link = self.link
        if isinstance(link, TcpLink):
            link.abandon()
        self.link = None
        await self._close_transport()
        pool = [s for s in old.secondaries if s.name not in lost]
        spares = [s for s in old.spares if s.name not in lost]
        n_lost = len(old.secondaries) - len(pool)
        log.warning("recovering from: %s", e)
        while True:
            pool, spares = await self._answering(pool), await self._answering(spares)
            try:
                await self._reform_fitting(pool, spares, n_lost)
                break
            except PlanError as err:
                log.error("no plan fits the %d node(s) left: %s", len(pool) + len(spares) + 1, err)
                return False
            except (NodeFailure, RuntimeError, OSError) as err:
                bad = getattr(err, "node", None)
                log.warning("the ring did not form again: %s", err)
                if not isinstance(bad, NodeSpec) or bad.name not in {s.name for s in pool + spares}:
                    return False
                pool = [s for s in pool if s.name != bad.name]  # once more, without it
                spares = [s for s in spares if s.name != bad.name]
                n_lost += 1
        record = {"failed": failed.describe() if failed else None, "error": str(e),
                  "ring": [n.name for n in self.nodes.ring],
                  "plan": self.placement.to_json() if self.placement is not None and
                  len(self.nodes.ring) > 1 else {"partition": "single", "reason": "no node left",
                                                 "nodes": [{"node": "starter", "layers":
                                                            [0, self.config.n_layer]}]},
                  "resumed": self.running, "recovery_s": round(time.perf_counter() - t0, 3)}
        self.recoveries.append(record)
        log.warning("recovered in %.2f s: ring %s; resuming %d sequence(s)", record["recovery_s"],
                    " -> ".join(record["ring"]), record["resumed"])
        return True

    async def _reform_fitting(self, pool: list[NodeSpec], spares: list[NodeSpec], n_lost: int
                              ) -> None:
        """The survivors and as many spares as nodes were lost; all the spares when
        that does not fit (PlanError when nothing fits)."""
        take = min(n_lost, len(spares))
        try:
            await self._reform(pool + spares[:take], spares[take:])
        except PlanError:
            if take == len(spares):
                raise
            await self._reform(pool + spares, [])

    async def _reform(self, secondaries: list[NodeSpec], spares: list[NodeSpec]) -> None:
        """Plan and form a ring of the starter and `secondaries`; with none, the
        starter alone runs the whole model."""
        nodes = self.nodes.reformed(secondaries, spares)
        self.nodes = nodes
        self.starter = Starter(nodes, self.starter.token, self.starter.ckpt, self.opts)
        self.placement = None
        if len(nodes.ring) == 1:
            self._check_fits_alone()
        await self._plan()
        if len(nodes.ring) > 1:
            await self.form()

    def _check_fits_alone(self) -> None:
        """The starter left alone must hold the whole model and every sequence's cache
        (what it holds now counts as room): PlanError with the numbers if not."""
        mem = stage_memory(self.config, self.max_seqs, self.opts.dtype, self.opts.max_context,
                           self.opts.quantize)
        need = mem.embed_bytes + mem.head_bytes + self.config.n_layer * mem.block_bytes
        held = sum(t.numel() * t.element_size() for t in self.first.stage.state_dict().values())
        budget = node_capabilities(self.opts.device)["budget_bytes"]
        if budget is not None and need > budget + held:
            raise PlanError(f"the starter alone would need {need / 2**20:.0f} MiB for the whole "
                            f"model and its caches; it has {(budget + held) / 2**20:.0f} MiB")

    async def _answering(self, specs: list[NodeSpec]) -> list[NodeSpec]:
        """The nodes of `specs` that answer a health check now, in order."""
        if not specs:
            return []
        timeout = self.starter._probe_timeout()
        async with httpx.AsyncClient(timeout=timeout) as http:
            async def ok(spec: NodeSpec) -> bool:
                try:
                    return (await http.get(spec.url + "/health")).status_code == 200
                except httpx.HTTPError:
                    return False
            answers = await asyncio.gather(*(ok(s) for s in specs))
        for spec, up in zip(specs, answers):
            if not up:
                log.warning("%s does not answer; left out of the new ring", spec.describe())
        return [s for s, up in zip(specs, answers) if up]
