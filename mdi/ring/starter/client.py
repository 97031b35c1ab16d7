"""The starter's control-plane client: everything the starter asks the nodes over
HTTP, and the forming of the ring's data links.

A ring forms in one order (RingClient.form): every node's health (its local
chunk, if any), which links can be Unix sockets (local_link.py), listening for
the finisher's link back, /init and the weights for each node, /connect from
the finisher backwards, the data link to the first node, then the finisher's
link back, each with the mutual handshake of auth.py. The fixed-batch
`--resend-context` loop (resend.py) and the engine over the ring
(ring_engine.py) both form their rings here.

When a run fails, `diagnose` names the node behind it (a node that does not
answer a health check within a short timeout, else the nodes' own reasons from
/status), and `release` tells the nodes that still answer to drop the run, so
the ring is idle again for the next starter.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Iterator, TypeVar

import httpx
from tqdm import tqdm

from ...checkpoint import Checkpoint
from ...checkpoint.stream import shard_stream
from ...model.dtypes import DTYPES
from ...generate.sampling import SamplingConfig
from ...model.config import GPTConfig
from ...net.peer_http import node_client
from ...results import HopStats
from ..cluster.nodes_config import NodeSpec, NodesConfig
from ..plan.partition import Shard
from ..plan.placement import Placement, place_layers
from ..protocol.aio import bounded
from ..protocol.auth import AuthError, answer, challenge
from ..protocol.local_link import link_scope, listen_local, local_links, new_name, open_link, open_streams
from ..protocol.wire import WireError
from .options import NodeFailure, RunOptions, plan_shards
from .stream_cache import StreamCache

log = logging.getLogger(__name__)
T = TypeVar("T")
Groups = list[range]  # slots (or samples) of each lane, as /init's "groups"


@dataclass
class FormedRing:
    """The starter's ends of a formed ring: the link to the first node (`writer`),
    the finisher's link back (`reader`, `back`), the servers that took it, and the
    Unix socket each process of the ring is reached on (None: TCP)."""
    run_id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    back: asyncio.StreamWriter
    servers: list[asyncio.base_events.Server]
    local: list[str | None]

    def close(self) -> None:
        self.writer.close()
        self.back.close()
        self.close_servers()

    def close_servers(self) -> None:
        for server in self.servers:
            server.close()


class RingClient:
    """The control plane of one ring: `nodes` (the starter first), the cluster
    token, the opened checkpoint the nodes' stages stream from, the run's options."""

    def __init__(self, nodes: NodesConfig, token: str, ckpt: Checkpoint,
                 opts: RunOptions | None = None, streams: StreamCache | None = None) -> None:
        self.nodes = nodes
        self.token = token
        self.ckpt = ckpt
        self.opts = opts or RunOptions()
        self.local_name = new_name()  # the starter's Unix socket, when one is used
        # the secondaries' weights streams, kept for a spare (stream_cache.py): replay only
        self.streams = streams if streams is not None else \
            StreamCache(device=self.opts.device) if self.opts.recovery == "replay" else None
        self.uploaded: dict[str, tuple[float, bool]] = {}  # node -> (seconds, from the cache)
        if self.streams is not None and len(nodes.ring) == 1:
            self.streams.clear()  # the starter alone: its memory is the whole model's now

    def with_nodes(self, nodes: NodesConfig) -> "RingClient":
        """The same run over another ring (recovery); the kept streams go along."""
        return RingClient(nodes, self.token, self.ckpt, self.opts, self.streams)

    @property
    def probe_timeout(self) -> float:
        """A health check's patience when a node is suspected."""
        return max(0.5, min(self.opts.timeout, 2.0))

    def http(self) -> httpx.AsyncClient:
        """A client that carries the cluster token (the caller closes it)."""
        return node_client(self.opts.timeout, self.token)

    # ---- planning ----------------------------------------------------------------
    async def place(self, config: GPTConfig, n_samples: int, batch: int,
                    context: int | None = None, fresh: bool = False
                    ) -> tuple[list[Shard], Placement | None]:
        """The run's split (placement.py) and the placement that chose it (None for a
        ring of one): logged, and refused if it cannot fit, before any weights move.
        context: the positions a sequence typically holds (where the probes time
        blocks), when the run knows it. fresh (a live re-plan, replan.py): every node
        timed again and the layers planned on those times (--partition auto)."""
        if len(self.nodes.ring) == 1:
            return plan_shards(self.nodes, config.n_layer), None
        async with node_client(self.opts.timeout) as http:
            for spec in self.nodes.secondaries:  # a node that is not up is named here
                await self.await_health(http, spec)
        o = self.opts
        placement = await place_layers(
            self.nodes, config, self.token, "auto" if fresh else o.partition, n_samples, batch,
            o.dtype, o.device, o.timeout, o.connect_retries, max_context=o.max_context,
            quantize=o.quantize, context=context, kv_dtype=o.kv_dtype, fresh=fresh)
        log.info("%s", placement.describe())
        return placement.shards, placement

    # ---- forming the ring ------------------------------------------------------------
    async def form(self, http: httpx.AsyncClient, run_id: int, config: GPTConfig,
                   shards: list[Shard], groups: Groups, sampling: SamplingConfig | None = None,
                   sequences: bool = False, placement: Placement | None = None,
                   extras: list[dict] | None = None) -> FormedRing:
        """Configure every node for run `run_id` and open the data links (see the
        module doc). On any error nothing stays open and the nodes are told to drop
        the run; the error (NodeFailure naming the node, AuthError, ...) is raised."""
        ring = self.nodes.ring
        healths = [await self.await_health(http, n) for n in ring[1:]]
        local = await self.local_links(http, placement)
        inbound: asyncio.Queue = asyncio.Queue(maxsize=1)
        servers = await self.listen(run_id, inbound, local[0])
        writer = None
        try:
            await self.configure(http, run_id, config, shards, groups, sampling, healths,
                                 sequences=sequences, sockets=local, extras=extras)
            for spec in reversed(ring[1:]):
                await self.post(http, spec, "/connect", {"run_id": run_id})
            _, writer = await self.open_first(ring[1], run_id, local[1])
            reader, back = await self.wait(inbound.get(), ring[-1], "connecting back to the starter")
        except BaseException:
            if writer is not None:
                writer.close()
            for server in servers:
                server.close()
            await self.release(http, run_id)
            raise
        return FormedRing(run_id, reader, writer, back, servers, local)

    async def await_health(self, http: httpx.AsyncClient, spec: NodeSpec) -> dict:
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

    async def post(self, http: httpx.AsyncClient, spec: NodeSpec, path: str, body: dict) -> dict:
        """POST `body` to a node: its JSON answer, or an error naming the node."""
        try:
            r = await http.post(spec.url + path, json=body)
        except httpx.HTTPError as e:
            raise NodeFailure(f"{spec.describe()} did not answer {path}: {e or type(e).__name__}",
                              node=spec) from None
        return _check(r, spec, path)

    async def configure(self, http: httpx.AsyncClient, run_id: int, config: GPTConfig,
                        shards: list[Shard], groups: Groups, sampling: SamplingConfig | None,
                        healths: list[dict], sequences: bool = False,
                        sockets: list[str | None] | None = None,
                        extras: list[dict] | None = None) -> None:
        """Configure every secondary (/init, then its weights unless its local chunk
        holds them); sequences: an engine run (groups are lanes of slots, sampling
        travels per sequence in ADMIT frames); sockets: the Unix socket each process
        of the ring is reached on (local_links), None for TCP; extras: more fields of
        each secondary's /init (a recovery by replay: resume, replayed, kept weights)."""
        ring = self.nodes.ring
        sockets = sockets or [None] * len(ring)
        for i, (spec, shard, health) in enumerate(zip(ring[1:], shards[1:], healths), start=1):
            nxt = (i + 1) % len(ring)
            peer = {"addr": ring[nxt].addr, "port": ring[nxt].port_in}
            if sockets[nxt]:
                peer["local"] = sockets[nxt]
            chunk = health.get("chunk")
            local = bool(chunk and (chunk["start"], chunk["stop"]) == (shard.start, shard.stop)
                         and chunk["model"] == config.to_dict()
                         and chunk.get("quantize") in (None, self.opts.quantize))
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
            if self.opts.kv_dtype is not None:  # else the caches store the compute dtype
                body["kv_dtype"] = self.opts.kv_dtype
            if sequences and self.opts.recovery == "replay":
                body["recovery"] = "replay"
            body.update(extras[i - 1] if extras else {})
            await self.post(http, spec, "/init", body)
            if body["weights"] == "upload":
                await self.upload(http, spec, run_id, shard)
            log.info("%s: layers [%d, %d), weights %s", spec.describe(), shard.start, shard.stop,
                     {"local": "from its local chunk", "kept": "kept (resumed)"}.get(
                         body["weights"], "uploaded"))
        if self.streams is not None:  # the ranges this ring no longer has; all, with no spare
            self.streams.keep_only({(s.start, s.stop, self.opts.quantize, self.opts.dtype)
                                    for s in shards[1:]} if self.nodes.spares else set())

    async def upload(self, http: httpx.AsyncClient, spec: NodeSpec, run_id: int,
                     shard: Shard) -> None:
        """Stream a node its stage's weights, one tensor in memory at a time (or, for a
        spare taking a range, as kept when the ring formed: stream_cache.py)."""
        t0 = time.perf_counter()
        key = (shard.start, shard.stop, self.opts.quantize, self.opts.dtype)
        kept = self.streams.get(key) if self.streams is not None else None
        if kept is not None:
            total, chunks = kept
        else:
            total, chunks = shard_stream(self.ckpt, shard, self.opts.quantize,
                                         DTYPES[self.opts.dtype])
            if self.streams is not None and self.nodes.spares:
                chunks = self.streams.tee(key, total, chunks)
        # bytes sent, on a terminal (a large stage over a slow link takes minutes)
        bar = tqdm(total=total, unit="B", unit_scale=True, leave=False, disable=None,
                   desc=f"weights to {spec.name}")
        try:
            with bar:
                r = await http.put(f"{spec.url}/weights/{run_id}", content=_aiter(chunks, bar),
                                   timeout=max(self.opts.timeout, 60.0),
                                   headers={"content-type": "application/octet-stream",
                                            "content-length": str(total)})
        except httpx.HTTPError as e:
            raise NodeFailure(f"{spec.describe()} did not take its weights: "
                              f"{e or type(e).__name__}", node=spec) from None
        _check(r, spec, "/weights")
        self.uploaded[spec.name] = (round(time.perf_counter() - t0, 3), kept is not None)

    async def local_links(self, http: httpx.AsyncClient, placement: Placement | None
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

    async def listen(self, run_id: int, inbound: asyncio.Queue, local: str | None
                     ) -> list[asyncio.base_events.Server]:
        """Listen for the finisher's link back: on the starter's data port, and on its
        Unix socket `local` when the finisher shares this machine. A link that passes
        the handshake is put on `inbound` as (reader, writer)."""
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

    async def _accept_finisher(self, reader, writer, run_id: int, inbound: asyncio.Queue) -> None:
        peer = writer.get_extra_info("peername")
        try:
            await challenge(reader, writer, self.token, run_id, self.opts.timeout)
            inbound.put_nowait((reader, writer))
        except (AuthError, WireError, EOFError, asyncio.TimeoutError, OSError, asyncio.QueueFull) as e:
            log.warning("refused data connection from %s: %s", peer, e or type(e).__name__)
            writer.close()

    async def open_first(self, spec: NodeSpec, run_id: int, local: str | None = None
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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

    async def wait(self, aw: Awaitable[T], spec: NodeSpec, what: str) -> T:
        """`aw` within the run's timeout, else NodeFailure: `spec` timed out `what`."""
        try:
            return await bounded(aw, self.opts.timeout)
        except asyncio.TimeoutError:
            raise NodeFailure(f"{spec.describe()} timed out {what}", node=spec) from None

    # ---- after a run, or a failure -----------------------------------------------
    async def diagnose(self, http: httpx.AsyncClient, run_id: int
                       ) -> tuple[NodeSpec | None, str | None, tuple[str, ...]]:
        """Name the node behind a failure: first one that does not answer its health
        check within a short timeout (dead or frozen), else the ones that dropped the
        run, with their reasons. Also returns the names of all silent nodes."""
        specs = self.nodes.secondaries
        timeout = self.probe_timeout
        answers = await asyncio.gather(*(_alive(http, s, timeout) for s in specs))
        silent = tuple(spec.name for spec, ok in zip(specs, answers) if not ok)
        for spec, ok in zip(specs, answers):
            if not ok:
                return spec, f"{spec.describe()} (data port {spec.port_in}) stopped answering", silent
        dropped = []
        for spec in specs:
            last = await self._last_run(http, spec, timeout)
            if last.get("run_id") == run_id and last.get("reason") not in (None, "run complete"):
                dropped.append((spec, f"{spec.describe()} dropped the run ({last['reason']})"))
        if dropped:
            return dropped[0][0], "; ".join(text for _, text in dropped), silent
        return None, None, silent

    async def release(self, http: httpx.AsyncClient, run_id: int, skip: tuple[str, ...] = ()
                      ) -> None:
        """After a failure: ask every node that answers to drop this run (best effort;
        nodes in `skip` did not answer a health check just now)."""
        timeout = self.probe_timeout

        async def stop(spec: NodeSpec) -> None:
            try:
                await http.post(spec.url + "/stop", json={"run_id": run_id}, timeout=timeout)
            except httpx.HTTPError:
                pass

        await asyncio.gather(*(stop(s) for s in self.nodes.secondaries if s.name not in skip))

    async def collect_hops(self, http: httpx.AsyncClient, run_id: int, ring_no: int = 0,
                           timeout: float | None = None, skip: tuple[str, ...] = ()
                           ) -> list[HopStats]:
        """Each node's hop (bytes, frames and their times) for run `run_id`, from /status;
        ring_no: which of the run's rings it was (a recovery or re-plan forms another);
        nodes in `skip` (lost) are not asked."""
        ring = self.nodes.ring
        hops = []
        for i, spec in enumerate(ring[1:], start=1):
            nxt = ring[(i + 1) % len(ring)]
            last = {} if spec.name in skip else await self._last_run(http, spec, timeout)
            if last.get("run_id") != run_id and spec.name not in skip:
                log.warning("%s reported no statistics for this run", spec.describe())
                last = {}
            hops.append(HopStats(spec.name, nxt.name, last.get("decode_bytes_out", 0),
                                 last.get("decode_tokens_out", 0), last.get("prefill_bytes_out", 0),
                                 last.get("frames_timed", 0), last.get("wait_s", 0.0),
                                 last.get("compute_s", 0.0), last.get("other_s", 0.0),
                                 last.get("other_cpu_s", 0.0), last.get("send_s", 0.0),
                                 last.get("link", ""), ring_no))
        return hops

    async def answering(self, specs: list[NodeSpec]) -> list[NodeSpec]:
        """The nodes of `specs` that answer a health check now, in order."""
        if not specs:
            return []
        async with node_client(self.probe_timeout) as http:
            answers = await asyncio.gather(*(_alive(http, s, self.probe_timeout) for s in specs))
        for spec, up in zip(specs, answers):
            if not up:
                log.warning("%s does not answer; left out of the new ring", spec.describe())
        return [s for s, up in zip(specs, answers) if up]

    @staticmethod
    async def _last_run(http: httpx.AsyncClient, spec: NodeSpec, timeout: float | None) -> dict:
        """The node's /status `last_run` ({} when it does not say)."""
        try:
            kw = {} if timeout is None else {"timeout": timeout}
            r = await http.get(spec.url + "/status", **kw)
            return (r.json().get("last_run") or {}) if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}


async def _alive(http: httpx.AsyncClient, spec: NodeSpec, timeout: float) -> bool:
    try:
        return (await http.get(spec.url + "/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        return False


async def _aiter(chunks: Iterator[bytes], bar: tqdm) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk))


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
