"""What every part of the starter shares: a run's options, the failure it raises,
how many lanes a run gets, and the split of the layers when nothing is planned."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ...checkpoint import Checkpoint, load_stage
from ...checkpoint.sources import checkpoint_mode
from ...engine.replay import DEFAULT_RECOVERY, RECOVERY_CHOICES
from ...engine.scheduler import DEFAULT_PREFILL_CHUNK
from ...model import GPT
from ...model.dtypes import DTYPES, KV_DTYPES
from ...results import FailedNode, Failure, GenerationResult
from ..cluster.nodes_config import NodeSpec, NodesConfig
from ..plan.partition import Shard, even_split, manual_split
from .replan import ReplanPolicy

if TYPE_CHECKING:
    from ..plan.placement import Placement

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
    quantize: str | None = None       # "int8": every node quantizes its own stage at load (a
                                      # quantized checkpoint's mode: with_mode)
    batch_invariant: bool = False     # per-row compute on every node (exact across groupings)
    max_context: int | None = None    # positions a run keeps (None: model/cache.py's default cap)
    kv_dtype: str | None = None       # what every node's KV caches store (None: dtype)
    partition: str | None = None      # "auto" | "even"; None: auto when nodes differ (placement.py)
    recover: bool = True              # on a node's failure: re-plan over the rest and resume
    recovery: str = DEFAULT_RECOVERY  # how: "replay" (a spare takes the lost range, rebuilt
                                      # from its upstream's log) or "reprefill" (all anew)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prefill tokens per lane step (0: one piece)
    batch_prefill: bool = True        # a step's prefill chunks as one frame (False: one each)
    replan: bool = True               # a stage that drifts from the plan: plan again (replan.py)
    replan_policy: ReplanPolicy = field(default_factory=ReplanPolicy)  # when (tests: sooner)

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERY_CHOICES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERY_CHOICES)}, "
                             f"got {self.recovery!r}")


def failure(message: str, node: NodeSpec | None) -> Failure:
    """The `failure` of a partial result: what went wrong and the node to blame."""
    failed = None if node is None else FailedNode(node.role, node.index, node.addr, node.port,
                                                  node.port_in)
    return Failure(message, failed)


def with_mode(opts: RunOptions, ck: Checkpoint) -> RunOptions:
    """opts with the run's --quantize mode: a quantized checkpoint's own, which the
    nodes are told at /init (an explicit other one: CheckpointError naming both, as
    on one device)."""
    return replace(opts, quantize=checkpoint_mode(ck, opts.quantize))


def first_stage(ck: Checkpoint, stop: int, opts: RunOptions, start: int = 0) -> GPT:
    """The starter's stage, blocks [start, stop) (0: its first stage; more: blocks a
    live re-plan moves to it), loaded with the run's choices."""
    stage, _ = load_stage(ck, start, stop, device=opts.device, dtype=DTYPES[opts.dtype],
                          quantize=opts.quantize, batch_invariant=opts.batch_invariant,
                          max_context=opts.max_context,
                          kv_dtype=KV_DTYPES[opts.kv_dtype] if opts.kv_dtype else None)
    return stage


def lane_count(n_nodes: int, asked: int | None, parallel: int) -> int:
    """Lanes (micro-batches) of a run: --micro-batches when given, else one per node,
    but no more than the stages that can compute at once (placement.compute_units;
    0: unknown): lanes beyond that take turns on the same cores, each with a smaller
    batch and more switches (measured on the bundled model, 3 nodes on 2 cores:
    3 lanes 346 tokens/s, 2 lanes 451)."""
    if asked is not None:
        return asked
    return min(n_nodes, parallel) if parallel > 0 else n_nodes


def default_lanes(n_nodes: int, placement: Placement | None) -> int:
    """One lane per node, but no more than the nodes can compute at once
    (lane_count; unknown before the ring is planned)."""
    parallel = placement.parallel if placement is not None else 0
    lanes = lane_count(n_nodes, None, parallel)
    if lanes < n_nodes:
        log.info("%d nodes share the cores of %d: %d lanes", n_nodes, parallel, lanes)
    return lanes


def typical_context(prompts: list[list[int]], n_tokens: int) -> int:
    """The positions a run's sequences hold halfway through: where the probes time a
    block (attention reads the filled part of the cache, the head does not)."""
    return max(1, max(len(p) for p in prompts) + n_tokens // 2)


def plan_shards(nodes: NodesConfig, n_layer: int) -> list[Shard]:
    """The nodes file's `layers` for every node, or an even split when none gives them."""
    ring = nodes.ring
    manual = [n.layers for n in ring]
    if all(m is None for m in manual):
        return even_split(n_layer, len(ring))
    if any(m is None for m in manual):
        raise ValueError("give 'layers' for every node or for none")
    return manual_split(n_layer, manual)  # type: ignore[arg-type]
