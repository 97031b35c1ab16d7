"""Which engine `mdi serve` drives: the local single-device engine, or the ring.

`engine_factory` returns a factory, not an engine: the server calls it at start
and again after an EngineFailure, so for the ring that call is where the ring is
re-formed (re-plan over the live nodes and spares, reload ranges).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

from ..engine.api import Engine
from ..tokenizer import Tokenizer
from .app import EngineFactory

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

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {self.nodes}")
        if self.max_seqs < 1:
            raise ValueError(f"--max-seqs must be at least 1, got {self.max_seqs}")
        if self.queue is not None and self.queue < 0:
            raise ValueError(f"--queue must be >= 0, got {self.queue}")

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.nodes_config is not None


def engine_factory(opts: BackendOptions) -> tuple[EngineFactory, Tokenizer]:
    """(factory, tokenizer) for the options; the model is loaded once, here."""
    if opts.distributed:
        return ring_engine_factory(opts)
    return local_engine_factory(opts)


def local_engine_factory(opts: BackendOptions) -> tuple[EngineFactory, Tokenizer]:
    from ..checkpoint import load_model
    from ..model.dtypes import DTYPES
    try:
        from ..engine.local import LocalEngine
    except ImportError as e:
        raise ValueError(f"the local engine is not in this build ({e})") from None

    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {opts.dtype!r}")
    model, info = load_model(opts.ckpt, device=opts.device, dtype=DTYPES[opts.dtype])
    tok = info.tokenizer()
    kwargs: dict = {"max_seqs": opts.max_seqs, "max_queue": opts.queue}
    if opts.batch_invariant:
        if "batch_invariant" not in inspect.signature(LocalEngine).parameters:
            raise ValueError("--batch-invariant: this build's local engine does not offer it yet")
        kwargs["batch_invariant"] = True

    def build() -> Engine:
        return LocalEngine(model, tok, **kwargs)
    log.info("local engine on %s: %s, %d sequence slot(s)", opts.device, Path(opts.ckpt).name,
             opts.max_seqs)
    return build, tok


def ring_engine_factory(opts: BackendOptions) -> tuple[EngineFactory, Tokenizer]:
    """INTEGRATION HOOK: the ring engine (`--nodes N` local nodes, or `--nodes-config F`).

    Return (factory, tokenizer) where each factory() call forms the ring (start or
    reach the nodes, plan, load ranges) and returns an Engine (mdi/engine/api.py)
    whose failures raise EngineFailure(node=...). The server closes a failed
    engine and calls factory() again, so re-forming the ring lives here.
    """
    raise ValueError("the ring engine (--nodes > 1 or --nodes-config) is not wired in "
                     "yet; serve one device with --nodes 1")
