"""Where a run's layers go: the nodes' capabilities, their measured speeds, the planner.

`place_layers` is the starter's one call before any weights move:

- per-node `layers` in the nodes file win (mode "manual");
- `--partition even`: near-equal shares (mode "even");
- `--partition auto`: every node (the starter too) is timed on the run's shape
  (POST /probe, one node at a time so that nodes sharing a machine do not slow
  each other's timing) and `planner.plan_layers` picks the split with the
  least slowest stage under every node's memory budget (mode "auto"),
  leaving out nodes the ring is clearly faster without (planner.py; they
  stay spares when the run has spares, else idle: `Placement.nodes`; only
  with `--partition auto` given, not when the default turns to auto);
- no `--partition`: auto when the nodes report different devices, CPUs
  (affinity, cgroup quota, threads) or memory caps, or when the even split
  does not fit their memory; even otherwise. Timing identical nodes would
  only add noise (and a second or two) to every run.

Every mode checks the split against the nodes' memory budgets (GET
/capabilities: free memory, capped by `mdi node --max-memory`) and refuses one
that does not fit with a PlanError naming the numbers, before any upload.
Communication time is not modelled: a token's activation is a few KB.
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

import httpx

from ...model import GPTConfig
from ...net.peer_http import node_client
from ..protocol.auth import AuthError
from .capability import ProbeCache, Speed, node_capabilities, stage_memory
from .fused_check import FUSED_DTYPES, check_ring, local_state
from .limits import free_memory
from ..cluster.nodes_config import NodesConfig, NodeSpec
from .partition import Shard, even_split, manual_split
from .planner import NodeCost, Plan, PlanError, plan_layers, plan_memory

log = logging.getLogger(__name__)
PARTITIONS = ("auto", "even")
PROBE_TIMEOUT_S = 120.0          # a node timing GPT-2-sized stages under a CPU cap
BUSY_RETRIES = 5                 # a /probe refused with 409, asked again over ~2.5 s
BUSY_DELAY_S = 0.1               # the first wait before asking again (then doubled, <= 1 s)
_LOCAL_PROBES = ProbeCache()     # the starter's own timings, kept for later runs of this process


@dataclass
class Placement:
    mode: str                    # "auto" | "even" | "manual"
    reason: str
    shards: list[Shard]
    plan: Plan
    parallel: int = 0            # stages that can compute at once (compute_units); 0: unknown
    caps: list[dict] = field(default_factory=list)  # /capabilities in ring order, the starter first
    nodes: NodesConfig | None = None  # the ring planned: the nodes file's, less nodes left out

    @property
    def left_out(self) -> set[str]:
        """Names of the nodes the plan gave no layers (not part of the ring)."""
        return {x.name for x in self.plan.left_out}

    def to_json(self) -> dict:
        d = {"partition": self.mode, "reason": self.reason, "nodes": self.plan.to_dicts()}
        if self.parallel:
            d["parallel_stages"] = self.parallel
        if not math.isnan(self.plan.bottleneck_ms):
            d["bottleneck_ms"] = round(self.plan.bottleneck_ms, 3)
        if self.caps:  # the ring's processes in order, the starter first (fused_check.py)
            d["fused_kernels"] = [v if isinstance(v := c.get("fused_kernels"), bool) else None
                                  for c in self.caps]
        return d

    def describe(self) -> str:
        return f"partition {self.mode} ({self.reason}):\n{self.plan.describe()}"


async def place_layers(nodes: NodesConfig, config: GPTConfig, token: str, partition: str | None,
                       n_samples: int, batch: int, dtype: str = "float32",
                       device: str = "cpu", timeout: float = 10.0, retries: int = 5,
                       max_context: int | None = None, quantize: str | None = None,
                       context: int | None = None, kv_dtype: str | None = None,
                       fresh: bool = False) -> Placement:
    """Decide the run's split (see the module doc); PlanError when it cannot fit.

    n_samples: KV cache rows per node (the whole run); batch: rows of one group;
    max_context, quantize, kv_dtype: the run's --max-context, --quantize and
    --kv-dtype (memory follows them);
    context: the positions a sequence typically holds, where the run knows it
    (the probes time blocks there; None: a quarter of the cache); fresh: every
    node is timed again, no probe from a cache (a live re-plan)."""
    if partition not in (None, *PARTITIONS):
        raise ValueError(f"--partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    ring = nodes.ring
    n_layer = config.n_layer
    manual = [n.layers for n in ring]
    shards = None
    if any(m is not None for m in manual):  # checked before any node is asked
        if any(m is None for m in manual):
            raise ValueError("give 'layers' for every node or for none")
        shards = manual_split(n_layer, manual)  # type: ignore[arg-type]
    even = even_split(n_layer, len(ring))
    await asyncio.to_thread(local_state, device)  # stage 0's kernels, loaded (built) now
    async with node_client(timeout, token) as http:
        caps = [node_capabilities(device)] + [await _capabilities(http, s, timeout, retries)
                                              for s in ring[1:]]
        placement = await _place(http, ring, caps, config, partition, shards, even, n_samples,
                                 batch, dtype, device, max_context, quantize, context, kv_dtype,
                                 fresh)
    gone = placement.left_out
    for x in placement.plan.left_out:
        log.info("%s is left out of the ring: %s", x.name, x.reason())
    caps = [c for s, c in zip(ring, caps) if s.name not in gone]  # the ring's, in its order
    placement.parallel = compute_units(caps)
    placement.caps = caps
    # not a live re-plan's ring (compared when it formed), nor float16 (no kernels for it)
    if not fresh and dtype in FUSED_DTYPES:
        check_ring([s.name for s in ring if s.name not in gone], caps)
    placement.nodes = nodes.leaving_out(gone, keep=fresh)  # fresh: a live re-plan
    return placement


async def _place(http, ring, caps, config, partition, shards, even, n_samples, batch, dtype,
                 device, max_context, quantize, context, kv_dtype=None, fresh=False) -> Placement:
    mem = stage_memory(config, n_samples, dtype, max_context, quantize, kv_dtype)
    if shards is not None:
        return _fixed("manual", "layers from the nodes file", shards, ring, caps, mem)
    if partition == "even":
        return _fixed("even", "--partition even", even, ring, caps, mem)
    if partition is None:
        differ = _differences(ring, caps)
        if not differ:
            try:
                return _fixed("even", "the nodes report the same device, CPUs and memory cap",
                              even, ring, caps, mem)
            except PlanError as e:
                differ = f"the even split does not fit: {e}"
        reason = f"default: {differ}"
    else:
        reason = "--partition auto"
    speeds = await _speeds(http, ring, config, batch, dtype, device, context, fresh)
    # only when asked for: the default turns to auto for the nodes' differences, and
    # keeps every node of the nodes file as before
    plan = plan_layers(config.n_layer, _costs(ring, caps, mem, speeds),
                       leave_out=partition == "auto",
                       lanes=lambda keep: ring_lanes([caps[i] for i in keep]))
    return Placement("auto", reason, plan.shards, plan)


def ring_lanes(caps: list[dict]) -> int:
    """The lanes a ring of these nodes runs by default: one per node, no more than
    can compute at once (as starter/options.lane_count; --micro-batches aside)."""
    return min(len(caps), compute_units(caps)) or len(caps)


def compute_units(caps: list[dict]) -> int:
    """How many stages of the ring can compute at the same time: the nodes of one
    machine (the same host_id) share its cores, as many at once as their CPU sets
    hold together; a node on a GPU, or one that does not say where it runs, counts
    alone. More lanes than this only take turns on the same cores."""
    units = 0
    hosts: dict[str, tuple[set, list]] = {}
    for cap in caps:
        host = cap.get("host_id")
        if not host or not str(cap.get("device", "cpu")).startswith("cpu"):
            units += 1
            continue
        cores, members = hosts.setdefault(host, (set(), []))
        cores.update(cap.get("cpu_set") or ())
        members.append(cap)
    for cores, members in hosts.values():
        units += min(len(members), len(cores)) if cores else len(members)
    return units


def _fixed(mode: str, reason: str, shards: list[Shard], ring: list[NodeSpec], caps: list[dict],
           mem) -> Placement:
    costs = _costs(ring, caps, mem, None)
    return Placement(mode, reason, shards, plan_memory(shards[-1].n_layer, shards, costs))


def _costs(ring: list[NodeSpec], caps: list[dict], mem, speeds: list[Speed] | None
           ) -> list[NodeCost]:
    out = []
    last = len(ring) - 1
    for i, (spec, cap) in enumerate(zip(ring, caps)):
        speed = speeds[i] if speeds else Speed(math.nan, math.nan, math.nan, math.nan)
        extra = (speed.embed_ms if i == 0 else 0.0) + (speed.head_ms if i == last else 0.0)
        fixed = (mem.embed_bytes if i == 0 else 0) + (mem.head_bytes if i == last else 0)
        out.append(NodeCost(spec.name, speed.block_ms, extra, mem.block_bytes, fixed,
                            cap.get("budget_bytes"), frame_ms=speed.frame_ms,
                            end_ms=speed.head_ms if i < last else 0.0,
                            end_bytes=mem.head_bytes if i < last else 0))
    return out


def _differences(ring: list[NodeSpec], caps: list[dict]) -> str:
    """Why the nodes are not alike ('' when they are)."""
    for what, key in (("devices", lambda c: c.get("device_name")),
                      ("CPUs", lambda c: min(c.get("cpus") or 0, c.get("torch_threads") or 0)),
                      ("memory caps", lambda c: c.get("max_memory_bytes"))):
        known = [(s, key(c)) for s, c in zip(ring, caps) if c]  # {}: a node that reports nothing
        if len({v for _, v in known}) > 1:
            return f"the nodes differ in {what} (" + ", ".join(
                f"{s.name}: {v}" for s, v in known) + ")"
    return ""


async def _capabilities(http: httpx.AsyncClient, spec: NodeSpec, timeout: float, retries: int
                        ) -> dict:
    delay, last = 0.2, ""
    for attempt in range(1, max(1, retries) + 1):
        try:
            r = await http.get(spec.url + "/capabilities", timeout=min(timeout, 5.0))
            if r.status_code == 200:
                return r.json()
            if r.status_code == 404:  # a node from before /capabilities: nothing known
                log.warning("%s reports no capabilities; its memory is not checked", spec.describe())
                return {}
            if r.status_code == 401:
                raise AuthError(f"{spec.describe()} refused the cluster token (/capabilities)")
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e) or type(e).__name__
        if attempt < retries:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
    raise ConnectionError(f"{spec.describe()} did not report its capabilities: {last}")


async def _speeds(http: httpx.AsyncClient, ring: list[NodeSpec], config: GPTConfig, batch: int,
                  dtype: str, device: str, context: int | None = None, fresh: bool = False
                  ) -> list[Speed]:
    """Time every node on the run's shape, one after the other (the starter locally)."""
    local, _ = await asyncio.to_thread(_LOCAL_PROBES.get, config, batch, dtype, device, context,
                                       fresh)
    out = [local]
    body = {"model": config.to_dict(), "batch": batch, "dtype": dtype}
    if fresh:  # only then: a node from before `fresh` refuses unknown fields
        body["fresh"] = True
    if context is not None:
        body["context"] = context
    for spec in ring[1:]:
        out.append(await _probe(http, spec, {**body, "device": spec.device}))
    for spec, s in zip(ring, out):
        log.info("%s: %.3f ms per block per step (+%.3f per frame, +%.3f embeddings, "
                 "+%.3f head)", spec.name, s.block_ms, s.frame_ms, s.embed_ms, s.head_ms)
    return out


async def _probe(http: httpx.AsyncClient, spec: NodeSpec, body: dict) -> Speed:
    """One node's /probe. A 409 (the node serves a run's ring, and would pause it) is
    asked again for a moment: a ring a re-plan just released may not have seen its
    links close yet; one that stays busy is an error with the node's words."""
    delay = BUSY_DELAY_S
    for attempt in range(BUSY_RETRIES + 1):
        try:
            r = await http.post(spec.url + "/probe", json=body, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise ConnectionError(f"{spec.describe()} did not answer /probe: "
                                  f"{e or type(e).__name__}") from None
        if r.status_code != 409 or attempt == BUSY_RETRIES:
            break
        await asyncio.sleep(delay)
        delay = min(2 * delay, 1.0)
    if r.status_code != 200:
        raise RuntimeError(f"{spec.describe()} refused /probe (HTTP {r.status_code}): "
                           f"{r.text[:300]}")
    return _speed_of(r.json(), spec)


def _speed_of(d: dict, spec: NodeSpec) -> Speed:
    """A node's /probe answer as a Speed (a node from before frame_ms: 0 per frame);
    a missing or non-numeric field is an error naming it."""
    try:
        return Speed(*(float(d[k]) for k in ("block_ms", "embed_ms", "head_ms")),
                     frame_ms=float(d.get("frame_ms", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise RuntimeError(f"{spec.describe()} answered /probe without a valid speed "
                           f"({type(e).__name__}: {e}): {str(d)[:200]}") from None


def check_fits_alone(config: GPTConfig, n_samples: int, dtype: str = "float32",
                     max_context: int | None = None, quantize: str | None = None,
                     device: str = "cpu", held: int = 0, who: str = "one device",
                     kv_dtype: str | None = None) -> None:
    """PlanError with the numbers when the whole model and every sequence's cache
    cannot fit what this process may still take (held: what it holds now and
    will give back). A lower bound: the runtime itself is not counted, so a run
    refused here would surely have been killed for memory part way."""
    mem = stage_memory(config, n_samples, dtype, max_context, quantize, kv_dtype)
    need = mem.embed_bytes + mem.head_bytes + config.n_layer * mem.block_bytes
    budget = free_memory(device)
    if need > budget.free + held:
        raise PlanError(f"{who} would need {need / 2**20:.0f} MiB for the whole model and its "
                        f"caches ({config.n_layer} layers, {n_samples} sequence(s)"
                        + (f", {quantize}" if quantize else "") + f"); it has "
                        f"{(budget.free + held) / 2**20:.0f} MiB ({budget.where}): run it on "
                        "more nodes (--nodes) or with a smaller --quantize")
