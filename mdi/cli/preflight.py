"""Checks that need no process, run before `--nodes N` starts one (run, chat, serve):
the node count against the model's layers, the local ring against the memory the
machine reports. Each failure is one UsageError line (exit 2) and nothing is spawned."""
from __future__ import annotations

import argparse

from ..checkpoint import Checkpoint
from ..checkpoint.sources import checkpoint_mode
from ..model.dtypes import DTYPES
from .common import UsageError


def check_local_nodes(args: argparse.Namespace, ck: Checkpoint) -> None:
    """--nodes/--spares against ck's layers and this machine's free memory."""
    from ..ring.cluster.local_cluster import check_local_ring
    from ..ring.plan.limits import free_memory, stage_weight_bytes

    c = ck.config
    nodes, spares = args.nodes, getattr(args, "spares", 0)
    try:
        check_local_ring(nodes, c.n_layer, spares)  # the counts first: no sizes needed
        if nodes > 1:
            weights = stage_weight_bytes(c, 0, c.n_layer, DTYPES[args.dtype],
                                         checkpoint_mode(ck, args.quantize))
            check_local_ring(nodes, c.n_layer, spares, weights, free_memory("cpu").free)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_fits_here(ck: Checkpoint, n_samples: int, dtype: str = "float32",
                    max_context: int | None = None, quantize: str | None = None,
                    device: str = "cpu", kv_dtype: str | None = None) -> None:
    """One device (this process) against the whole model and its caches, before
    a byte of weights is read: a UsageError with the numbers instead of an
    out-of-memory kill part way through the load (a container's or a capped
    node's memory limit counts: ring/plan/cgroups.py). A quantized checkpoint
    counts in its own mode."""
    from ..ring.plan.placement import check_fits_alone
    from ..ring.plan.planner import PlanError

    try:
        check_fits_alone(ck.config, n_samples, dtype, max_context,
                         checkpoint_mode(ck, quantize), device, who="this device",
                         kv_dtype=kv_dtype)
    except PlanError as e:
        raise UsageError(str(e)) from None
