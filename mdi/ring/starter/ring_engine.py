"""The engine over the ring: the starter runs the first stage and schedules
sequences; the nodes hold a KV slot per sequence (a *sequence run*, see
docs/wire.md).

RingEngine forms the ring at start() with its control-plane client
(client.py: RingClient.form: health, /init with `sequences: true` and the
lanes as groups, weights, /connect, the data links with their handshakes),
then runs the scheduler of engine/scheduler.py over a TcpLink (tcp_link.py).
close() sends STOP around the ring; the nodes end the run and wait for the
next one. A node that fails is named (RingClient.diagnose: health checks, then
the nodes' own reasons) in the
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

Nodes that a recovery lost are asked whether they are back (rejoin.py). With
RunOptions.replan a ring that drifts from its plan moves its boundary layers with
their KV rows (layer_shift.py) or, failing that, is planned and formed anew through
the same path (replan.py): `"recovery": "replan"`. `hops` cover every ring the run used.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

from ...checkpoint import Checkpoint, open_checkpoint
from ...engine.api import EngineFailure
from ...engine.compute_thread import ComputeThread, has_teams
from ...engine.link import LinkClosed, Reform
from ...engine.scheduler import PipelineEngine
from ...engine.slots import SlotStage
from ...net.peer_http import node_client
from ...model.dtypes import DTYPES
from ...results import HopStats
from ...tokenizer import Tokenizer
from ..cluster.nodes_config import NodeSpec, NodesConfig
from ..plan.partition import Shard
from ..plan.placement import Placement, check_fits_alone
from ..plan.planner import PlanError
from ..protocol.wire import DTYPE_CODES, Limits
from .client import RingClient
from .heal import heal
from .layer_shift import end_ring, try_shift
from .rejoin import REJOIN_POLL_S, Absent, Rejoin, idle
from .replan import Replan, moved_layers
from .replan_watch import watch
from .options import NodeFailure, RunOptions, default_lanes, first_stage, plan_shards, with_mode
from .tcp_link import TcpLink

log = logging.getLogger(__name__)
MAX_RECOVERIES_IN_WINDOW = 3     # more recoveries than this within the window: the ring keeps failing
RECOVERY_WINDOW_S = 60.0


class RingEngine(PipelineEngine):
    """Continuous batching over a ring of nodes.

    nodes/token: the ring and the cluster token (as for `mdi starter`); ckpt: the
    checkpoint (opened, or its spec, opened here once) the starter loads its
    first stage from and streams the nodes' ranges of; max_seqs: sequences in
    flight (KV slots on every node), grouped into min(max_seqs, ring size) lanes;
    max_queue: waiting sequences before submit raises EngineBusy; opts: device,
    dtype and timeout of the run; lanes: micro-batches (default one per node,
    but no more than the nodes can compute at once, placement.compute_units,
    decided when the ring is planned here). batch_invariant: True/False
    overrides opts.batch_invariant (per-row compute on every stage, carried in
    /init: a sequence's tokens never depend on its step-mates); None keeps
    opts'. shards: a split already planned (RingClient.place), with the
    `placement` that chose it; None plans it when the ring forms (--partition,
    per-node layers, or auto when the nodes differ).
    """

    def __init__(self, nodes: NodesConfig, token: str, ckpt: str | Path | Checkpoint,
                 tokenizer: Tokenizer | None = None, max_seqs: int = 8,
                 max_queue: int | None = None, opts: RunOptions | None = None,
                 retry_after: float = 1.0, lanes: int | None = None,
                 batch_invariant: bool | None = None, shards: list[Shard] | None = None,
                 placement: Placement | None = None) -> None:
        self.opts = opts or RunOptions()
        if batch_invariant is not None:
            self.opts = dataclasses.replace(self.opts, batch_invariant=batch_invariant)
        self.ck = open_checkpoint(ckpt)
        self.opts = with_mode(self.opts, self.ck)
        self._planned = shards is not None
        self._lanes_given = lanes is not None
        self.shards = shards or plan_shards(nodes, self.ck.config.n_layer)
        tokenizer = tokenizer or self.ck.tokenizer()
        self.client = RingClient(nodes, token, self.ck, self.opts)  # the control plane
        # One thread runs the starter's torch work: the load, the caches, every step and
        # re-load (engine/compute_thread.py). With one torch thread there is no OpenMP team
        # to keep spinning: a short decode then runs on the loop (no hand-off per step)
        compute = ComputeThread("mdi-stage0")
        try:
            stage = compute.call(first_stage, self.ck, self.shards[0].stop, self.opts)
            compute.call(super().__init__, stage, tokenizer.decode, max_seqs,
                         n_stages=lanes or default_lanes(len(nodes.ring), placement),
                         link=None, max_queue=max_queue, retry_after=retry_after,
                         prefill_chunk=self.opts.prefill_chunk)
        except BaseException:
            compute.close()
            raise
        self._executor.close()  # the engine's own worker (never started): this one instead
        self._executor, self.compute_thread = compute, compute if has_teams() else None
        self.batch_prefill = self.opts.batch_prefill
        self.tokenizer = tokenizer
        self.run_id: int | None = None
        self._http: Any = None  # node_client() while the ring runs
        self._servers: list[asyncio.base_events.Server] = []
        self.hops: list[HopStats] = []   # per hop, after close()
        self.placement = placement       # the ring's split (placement.py), once planned
        self.recoveries: list[dict] = []  # one per recovery: what failed, the new ring, seconds
        self._recovered_at: list[float] = []
        self._absent = Absent(RECOVERY_WINDOW_S)  # lost nodes, asked whether they are back
        self._formed_with = len(nodes.secondaries)  # the ring's secondaries once formed
        self._recovering = False
        self._watcher: asyncio.Task | None = None
        self._drift_watch: asyncio.Task | None = None
        self.replan_pending = False      # a Replan waits in the scheduler's inbox
        self._fresh = False              # the next plan probes every node again (a re-plan)
        self._ring_no = 0                # rings formed so far, less one (HopStats.ring)
        self._past_hops: list[HopStats] = []  # the hops of the rings before this one
        self._t0 = time.perf_counter()
        self._pause: list[tuple[float, dict]] = []  # recoveries' starts, until tokens flow

    @property
    def absent(self) -> dict[str, NodeSpec]:
        """Nodes a recovery lost, by name, asked whether they are back (rejoin.py)."""
        return self._absent.nodes

    @property
    def nodes(self) -> NodesConfig:
        """The ring as it is now (recovery forms another)."""
        return self.client.nodes

    async def _plan(self) -> None:
        """Plan the current ring (RingClient.place: logged, refused if it cannot fit);
        the first stage is loaded again when its range moved."""
        shards, self.placement = await self.client.place(self.config, self.max_seqs,
                                                         max(self.sizes), fresh=self._fresh)
        if self.placement is not None and self.placement.left_out:  # a ring without them
            assert self.placement.nodes is not None
            self.client = self.client.with_nodes(self.placement.nodes)
        lanes = default_lanes(len(self.nodes.ring), self.placement)
        if not self._lanes_given and lanes != len(self.sizes) and not self.running:
            self._relane(lanes)
        if shards[0].stop != self.shards[0].stop:  # off the loop: serve keeps answering /health
            self.first = await self._executor.run(
                lambda: SlotStage(first_stage(self.ck, shards[0].stop, self.opts), self.sizes))
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
        self._formed_with = len(self.nodes.secondaries)
        await super().start()
        if self.opts.recover and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_absent())
        fixed = self.opts.partition == "even" or any(n.layers is not None for n in self.nodes.ring)
        if self.opts.replan and not (self._drift_watch or fixed) and len(self.nodes.ring) > 1:
            self._drift_watch = asyncio.create_task(watch(self))  # (a split the user fixed stays)

    async def close(self) -> None:
        """Cancel what still runs, STOP around the ring, collect the hops' statistics."""
        for task in filter(None, (self._watcher, self._drift_watch)):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await super().close()
            link = self.link
            self.hops = list(self._past_hops)
            if isinstance(link, TcpLink) and link.failed is None and self._http is not None:
                assert self.run_id is not None
                link.hop.ring = self._ring_no
                self.hops += [link.hop] + await self.client.collect_hops(
                    self._http, self.run_id, self._ring_no)
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
        """Configure the nodes and open the data links; raises the client's errors
        (NodeFailure naming the node, AuthError, ...) as they are, leaving nothing
        open (the nodes that took part are told to drop the run). Before start()."""
        try:
            if not self._planned:
                await self._plan()
                self._planned = True
            if len(self.nodes.ring) > 1:  # else the plan left the starter alone: no ring
                await self._form()
        except BaseException:
            await self._close_transport()
            raise

    async def form_ring(self, extras: list[dict]) -> None:
        """Form the ring of self.client's nodes with more /init fields per secondary
        (heal.py), the links not planned (its nodes changed); nothing left open on error."""
        try:
            await self._form(extras, placement=None)
        except BaseException:
            await self._close_transport()
            raise

    async def _form(self, extras: list[dict] | None = None, placement: Any = "planned") -> None:
        config, ring = self.config, self.nodes.ring
        if self.opts.recovery == "replay":
            self.first.keep_log()  # what it sends: the first secondary's replay
        run_id = random.randrange(1, 2**32)
        self.run_id = run_id
        lanes = [range(lane.slots.start, lane.slots.stop) for lane in self.lanes]
        limits = Limits(run_id, config.n_embd, config.block_size, self.first.n_slots,
                        DTYPE_CODES[DTYPES[self.opts.dtype]], max(self.sizes), sequences=True)
        self._http = http = self.client.http()
        formed = await self.client.form(
            http, run_id, config, self.shards, lanes, sequences=True, extras=extras,
            placement=self.placement if placement == "planned" else placement)
        self._servers = formed.servers
        self.link = TcpLink(self.client, http, limits, formed, self.first, self.opts.timeout)
        log.info("ring formed: %d node(s), %d lane(s) of %s slot(s), run %d, %d of %d link(s) "
                 "over local sockets", len(ring), len(self.sizes), "/".join(map(str, self.sizes)),
                 run_id, sum(1 for name in formed.local if name), len(ring))

    # ---- recovery ------------------------------------------------------------------
    async def _recover(self, e: LinkClosed) -> bool:
        if not self.opts.recover and not isinstance(e, Replan):  # a re-plan is no failure
            return False
        old, old_run, old_client, link = self.nodes, self.run_id, self.client, self.link
        self._recovering = True
        try:
            if isinstance(e, (Rejoin, Replan)) and old_run is not None:  # the ring is whole: end it
                await end_ring(self, e, old_run)  # (held, for a re-plan that moves layers)
            ok = await self._recover_ring(e)
            if ok and isinstance(link, TcpLink) and old_run is not None:
                lost = (*getattr(e, "silent", ()), getattr(getattr(e, "spec", None), "name", ""))
                await self._keep_hops(old_client, link, old_run, lost)
            if not ok and isinstance(e, (Rejoin, Replan)):  # never fail the engine: as it was
                log.warning("the ring did not form %s; going on as before", e)
                if isinstance(e, Rejoin):
                    self._absent.lost_again({s.name for s in e.back}, force=True)
                self.client = self.client.with_nodes(old)
                ok = await self._recover_ring(Reform(f"{e}, but the ring did not form with them"))
            if not ok and self.opts.recovery == "replay" and old_run is not None:
                async with self.client.http() as http:  # the survivors kept it for a resume
                    await self.client.with_nodes(old).release(http, old_run)
            back = e.back if isinstance(e, Rejoin) else []
            left_out = self.placement.left_out if self.placement is not None else set()
            self._absent.mark([*old.secondaries, *old.spares, *back],
                              {s.name for s in (*self.nodes.secondaries, *self.nodes.spares)},
                              left_out)
            self._absent.came_back(back)
        finally:
            self._recovering = False
            self._absent.pending = False  # handled, or dropped with the inbox by _rewind
            self.replan_pending = False
        return ok

    async def _keep_hops(self, client: RingClient, link: TcpLink, run_id: int,
                         lost: tuple[str, ...]) -> None:
        """The hops of a ring the run leaves (what its nodes say, but the `lost`)."""
        link.hop.ring = self._ring_no
        async with client.http() as http:
            hops = await client.collect_hops(http, run_id, self._ring_no, client.probe_timeout,
                                             lost)
        self._past_hops += [link.hop] + hops
        self._ring_no += 1

    def _arrive(self, tokens) -> None:
        super()._arrive(tokens)
        for t0, record in self._pause:  # the first tokens since a recovery: the ring flows
            record["paused_s"] = round(time.perf_counter() - t0, 3)
        self._pause.clear()

    async def _watch_absent(self) -> None:
        """Ask the absent nodes whether they are back (rejoin.py)."""
        answers: dict[str, int] = {}  # name -> idle answers in a row
        async with node_client(self.client.probe_timeout) as http:
            while not self._closing and self.failure is None:
                await asyncio.sleep(REJOIN_POLL_S)
                if self._recovering or self._absent.pending or not self.absent:
                    answers.clear()
                    continue
                try:
                    specs = list(self.absent.values())
                    ups = await asyncio.gather(*(idle(http, s) for s in specs))
                    for spec, up in zip(specs, ups):
                        answers[spec.name] = answers.get(spec.name, 0) + 1 if up else 0
                    back = self._absent.due(answers)
                    if back and not (self._recovering or self._absent.pending or self._closing):
                        for s in back:
                            del answers[s.name]
                        self._take_back(back)
                except Exception as e:  # noqa: BLE001 - the watch goes on; the ring is not at stake
                    log.warning("asking the absent nodes whether they are back failed: %s", e,
                                exc_info=e)

    def _take_back(self, back: list[NodeSpec]) -> None:
        """Nodes that answer again: into the ring while it is short of nodes, else spares."""
        short = max(0, self._formed_with - len(self.nodes.secondaries))
        join, spare = back[:short], back[short:]
        if spare:
            for s in spare:
                del self.absent[s.name]
            nodes = self.nodes
            self.client = self.client.with_nodes(
                nodes.reformed(list(nodes.secondaries), [*nodes.spares, *spare]))
            log.warning("%s answer(s) again: spare(s) of the ring",
                        ", ".join(s.name for s in spare))
        if join:  # they stay absent until the ring holds them (a Rejoin can be dropped)
            log.warning("%s answer(s) again: forming the ring with them",
                        ", ".join(s.name for s in join))
            self._absent.pending = True
            self._inbox.put_nowait(Rejoin(join))

    async def _recover_ring(self, e: LinkClosed) -> bool:
        t0 = time.perf_counter()
        back = e.back if isinstance(e, Rejoin) else []
        replan = isinstance(e, Replan)
        failed: NodeSpec | None = getattr(e, "spec", None)
        lost = set(getattr(e, "silent", ())) | ({failed.name} if failed else set())
        was = list(zip([n.name for n in self.nodes.ring], self.shards))  # for `moved`
        if not back and not replan and not self._absent.lost_again(lost):
            recent = [r for r in self._recovered_at if t0 - r < RECOVERY_WINDOW_S]
            if len(recent) >= MAX_RECOVERIES_IN_WINDOW:
                log.error("%d recoveries in %g s: the ring keeps failing; giving up",
                          len(recent), RECOVERY_WINDOW_S)
                return False
            self._recovered_at = recent + [t0]
        old = self.nodes
        link = self.link
        if isinstance(link, TcpLink):
            link.abandon()
        self.link = None
        await self._close_transport()
        pool = [s for s in old.secondaries if s.name not in lost] + back
        spares = [s for s in old.spares if s.name not in lost]
        n_lost = max(0, len(old.secondaries) - len(pool))
        log.warning("%s: %s", "taking nodes back" if back else "recovering from", e)
        plan = None
        if self.opts.recovery == "replay" and isinstance(link, TcpLink) and not back and not replan:
            up = {s.name for s in await self.client.answering(pool + spares)}  # one round
            pool, spares = [s for s in pool if s.name in up], [s for s in spares if s.name in up]
            try:
                plan = await heal(self, old, link.limits.run_id, lost, pool, spares)
            except (NodeFailure, RuntimeError, OSError, ValueError) as err:
                log.warning("recovery by replay failed (%s); forming the ring anew", err)
                self._keep = {}
        if replan and isinstance(link, TcpLink):  # the boundary layers move, if they can
            plan = await try_shift(self, link.limits.run_id, e)
        while plan is None:
            pool, spares = await self.client.answering(pool), await self.client.answering(spares)
            try:
                self._fresh = replan  # every node timed again: the drift is in the times
                await self._reform_fitting(pool, spares, n_lost)
                plan = self._plan_json()
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
            finally:
                self._fresh = False
        how = "rejoin" if back else "replan" if replan else \
            "replay" if plan.get("partition") == "replay" else "reprefill"
        record = {"failed": failed.describe() if failed else None, "error": str(e),
                  "at_s": round(t0 - self._t0, 3), "why": str(e),
                  "ring": [n.name for n in self.nodes.ring], "plan": plan, "recovery": how,
                  "moved": moved_layers(was, list(zip([n.name for n in self.nodes.ring],
                                                      self.shards))),
                  "resumed": self.running, "recovery_s": round(time.perf_counter() - t0, 3),
                  "paused_s": None}
        if replan:
            record["drift"] = e.drift
        self._pause += [(t0, record)] if self.running else []  # (one before it may wait too)
        self.recoveries.append(record)
        log.warning("recovered in %.2f s: ring %s; resuming %d sequence(s)", record["recovery_s"],
                    " -> ".join(record["ring"]), record["resumed"])
        return True

    def _plan_json(self) -> dict:
        return self.placement.to_json() if self.placement is not None and len(self.nodes.ring) > 1 \
            else {"partition": "single", "reason": "no node left",
                  "nodes": [{"node": "starter", "layers": [0, self.config.n_layer]}]}

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
        self.client = self.client.with_nodes(nodes)
        self.placement = None
        if len(nodes.ring) == 1:
            self._check_fits_alone()
        await self._plan()
        if len(self.nodes.ring) > 1:  # the plan may leave nodes out
            await self.form()

    def _check_fits_alone(self) -> None:
        """The starter left alone must hold the whole model and every sequence's cache
        (what it holds now counts as room): PlanError with the numbers if not."""
        held = sum(t.numel() * t.element_size() for t in self.first.stage.state_dict().values())
        check_fits_alone(self.config, self.max_seqs, self.opts.dtype, self.opts.max_context,
                         self.opts.quantize, self.opts.device, held, who="the starter alone",
                         kv_dtype=self.opts.kv_dtype)
