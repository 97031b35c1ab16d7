"""Which engine `mdi serve` drives: the local single-device engine, or the ring.

`open_backend` returns a factory, not an engine: the server calls it at start
and again after an EngineFailure, so for the ring that call is where the ring is
formed again. The Backend also owns what must outlive every engine it builds
(the node processes of `--nodes N`); close it (or use it as a context manager)
when the server stops.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.api import Engine
from ..engine.compute_thread import ComputeThread
from ..engine.step_times import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_SHARE
from ..engine.replay import DEFAULT_RECOVERY
from ..tokenizer import Tokenizer
from .holder import EngineFactory

log = logging.getLogger("mdi.serve")


@dataclass(frozen=True)
class BackendOptions:
    ckpt: str
    nodes: int = 1
    nodes_config: str | None = None
    max_seqs: int = 8
    queue: int | None = None          # None: the engine's default
    batch_invariant: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    token: str | None = None          # the ring's cluster token (--nodes-config); else --token-file / MDI_TOKEN
    token_file: str | None = None
    timeout: float = 10.0             # ring: seconds of silence before a node counts as gone
    threads: int | None = None        # ring with --nodes N: torch threads per node process
    quantize: str | None = None       # "int8": every stage quantized at load
    partition: str | None = None      # ring: "auto" | "even"; None: auto when the nodes differ
    recover: bool = True              # ring: a failed node is replaced (re-plan, resume)
    recovery: str = DEFAULT_RECOVERY  # ring: "replay" or "reprefill" (RunOptions.recovery)
    replan: bool = True               # ring: a drifting stage re-plans live (RunOptions.replan)
    replan_policy: Any = None         # ring: when (a ReplanPolicy; None: its defaults; tests)
    spares: int = 0                   # ring with --nodes N: local spare nodes
    max_context: int | None = None    # positions a sequence keeps (None: the default cap)
    kv_dtype: str | None = None       # what the KV caches store (None: dtype)
    compile: bool = False             # single device: decode through a compiled step
    stall_timeout: float = 30.0       # s a sequence's events may wait unread before it is cancelled
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prefill tokens per step (0: a prompt in one piece)
    prefill_share: float = DEFAULT_PREFILL_SHARE  # while others decode: steps a chunk may cost

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
        if self.max_seqs < 1:
            raise ValueError(f"--max-seqs must be at least 1, got {self.max_seqs}")
        if self.queue is not None and self.queue < 0:
            raise ValueError(f"--queue must be >= 0, got {self.queue}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout}")
        if self.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be 0 or positive, got {self.prefill_chunk}")
        if not 0 <= self.prefill_share < float("inf"):
            raise ValueError(f"--prefill-share must be 0 or a positive number, got "
                             f"{self.prefill_share}")
        if not self.stall_timeout > 0:
            raise ValueError(f"--stall-timeout must be positive, got {self.stall_timeout}")
        if self.compile and (self.distributed or self.batch_invariant):
            raise ValueError("--compile is single-device only (no --nodes, --nodes-config) and "
                             "not with --batch-invariant")
        if self.spares < 0 or (self.spares and (self.nodes < 2 or self.nodes_config)):
            raise ValueError(f"--spares must be 0, or positive with --nodes 2 or more (a nodes "
                             f"file lists its own spares), got {self.spares}")

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.nodes_config is not None


@dataclass
class Backend:
    factory: EngineFactory
    tokenizer: Tokenizer
    description: str
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    cluster: Any = None               # the LocalCluster of `--nodes N` (its node processes)

    def close(self) -> None:
        self.resources.close()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backend(opts: BackendOptions) -> Backend:
    """The backend for the options; the model (or the starter's stage) is loaded here, once."""
    from ..model.dtypes import DTYPES

    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {opts.dtype!r}")
    if opts.distributed:
        return ring_backend(opts)
    return local_backend(opts)


def _engine_kwargs(opts: BackendOptions) -> dict:
    """--batch-invariant is not among them: it is the stages' setting, applied once where
    they are loaded (configure_stage here, the ring's RunOptions for its loaders)."""
    return {"max_seqs": opts.max_seqs, "max_queue": opts.queue}


def _local_kwargs(opts: BackendOptions) -> dict:
    """The single-device engine's; the ring's prefill chunk travels in its RunOptions."""
    return {**_engine_kwargs(opts), "prefill_chunk": opts.prefill_chunk}


def local_backend(opts: BackendOptions) -> Backend:
    from ..checkpoint import LoadOptions, load_model
    from ..model.dtypes import DTYPES, KV_DTYPES
    try:
        from ..engine.local import LocalEngine
    except ImportError as e:
        raise ValueError(f"the local engine is not in this build ({e})") from None

    # One thread of the process runs all of its torch work: the load, each engine's KV
    # caches and every step (engine/compute_thread.py); the event loop only waits for it
    compute = ComputeThread("mdi-compute")
    stop = threading.Event()  # a Ctrl-C while --compile builds: no further package begun
    try:
        loaded = compute.call(load_model, opts.ckpt, LoadOptions(  # any --ckpt spec
            device=opts.device, dtype=DTYPES[opts.dtype], quantize=opts.quantize,
            batch_invariant=opts.batch_invariant, max_context=opts.max_context,
            kv_dtype=KV_DTYPES[opts.kv_dtype] if opts.kv_dtype else None, compile=opts.compile))
        if opts.compile:  # every package a step can run, before the server takes a request
            from ..engine.compiled_start import prepare_compiled

            # the engine below has one lane: one cache of max_seqs rows (its layout keys them)
            compute.call(prepare_compiled, loaded.model, opts.max_seqs, stop)
    except BaseException:
        stop.set()
        compute.close()
        raise
    model, tok = loaded.model, loaded.tokenizer
    kwargs = _local_kwargs(opts)

    async def build() -> Engine:
        engine = await compute.run(LocalEngine, model, tok, **kwargs)
        engine.compute_thread = compute
        engine.stall_timeout = opts.stall_timeout
        engine.prefill_share = 0.0 if opts.batch_invariant else opts.prefill_share
        return engine
    backend = Backend(build, tok, f"{Path(opts.ckpt).name} on {opts.device}, "
                                  f"{opts.max_seqs} sequence slot(s)")
    backend.resources.callback(compute.close)  # after the server, which closes the engines
    return backend


def ring_backend(opts: BackendOptions) -> Backend:
    """The ring: `--nodes N` starts N-1 local node processes (kept until close()),
    `--nodes-config F` uses the nodes of a running cluster. Every factory() call
    forms the ring anew (RingEngine.start configures the nodes), which is how the
    server re-forms it after a failure. Re-planning over the nodes still alive and
    the spares is the ring engine's to do."""
    try:
        from ..ring.starter.ring_engine import RingEngine
    except ImportError as e:
        raise ValueError(f"the ring engine is not in this build ({e}); serve one device with "
                         "--nodes 1") from None
    from ..checkpoint import open_checkpoint
    from ..ring.starter.options import RunOptions

    tok = open_checkpoint(opts.ckpt).tokenizer()
    backend = Backend(lambda: None, tok, "")  # type: ignore[arg-type, return-value]
    try:
        _form_ring(backend, opts, RingEngine, RunOptions)
    except BaseException:
        backend.close()  # the node processes started so far
        raise
    return backend


def _form_ring(backend: Backend, opts: BackendOptions, RingEngine: type, RunOptions: type) -> None:  # noqa: N803
    tok = backend.tokenizer
    if opts.nodes_config:
        from ..ring.protocol.auth import resolve_token
        from ..ring.cluster.nodes_config import load_nodes_config

        nodes = load_nodes_config(opts.nodes_config)
        token = resolve_token(opts.token, opts.token_file) if nodes.secondaries else ""
        where = f"the nodes of {opts.nodes_config}"
    else:
        from ..ring.cluster.local_cluster import LocalCluster

        cluster = backend.resources.enter_context(
            LocalCluster(opts.nodes, threads=opts.threads, node_timeout=opts.timeout,
                         spares=opts.spares, restart=opts.recover))
        nodes, token = cluster.nodes, cluster.token
        backend.cluster = cluster
        where = f"{opts.nodes} local nodes"
    run_opts = RunOptions(device=opts.device, dtype=opts.dtype, timeout=opts.timeout,
                          quantize=opts.quantize, batch_invariant=opts.batch_invariant,
                          partition=opts.partition, recover=opts.recover,
                          recovery=opts.recovery, replan=opts.replan,
                          **({"replan_policy": opts.replan_policy} if opts.replan_policy else {}),
                          max_context=opts.max_context, kv_dtype=opts.kv_dtype,
                          prefill_chunk=opts.prefill_chunk)
    kwargs = _engine_kwargs(opts)

    def build() -> Engine:
        engine = RingEngine(nodes, token, opts.ckpt, tok, opts=run_opts, **kwargs)
        engine.stall_timeout = opts.stall_timeout
        engine.prefill_share = 0.0 if opts.batch_invariant else opts.prefill_share
        return engine
    backend.factory = build
    backend.description = f"{Path(opts.ckpt).name} over a ring of {where}, {opts.max_seqs} sequence slot(s)"
