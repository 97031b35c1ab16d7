"""Control-plane request bodies: validated on receipt, errors name the field.

Numbers are bounded here (no NaN or infinity, no integer past what the node
can use), so a hostile value is a 422 naming its field, never a 500 later.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...generate.sampling import SEED_LIMIT
from ..protocol.local_link import NAME_PATTERN

SampleId = Annotated[int, Field(ge=0, lt=2**32)]  # node.py refuses more than MAX_SAMPLES
MAX_LIST = 1 << 16  # slots listed in a resume (validate.MAX_SAMPLES)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Peer(Strict):
    addr: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    local: str | None = Field(default=None, pattern=NAME_PATTERN)  # its Unix socket (local_link.py)


class SamplingSpec(Strict):
    temperature: float = Field(ge=0.0)
    top_k: int | None = Field(default=None, ge=1, le=2**31 - 1)
    seed: int = Field(ge=0, lt=SEED_LIMIT)  # as SamplingConfig (and ADMIT) take it


class ResumeSpec(Strict):
    """A survivor of a lost node (--recovery replay): take over the kept run `run_id`
    (its stage, KV caches and log) instead of loading anything; each of `slots`
    ([slot, n]) goes on holding its first n positions, every other slot is freed.
    replay: this node is upstream of the replacement: it sends its log of those
    positions to the next node (REPLAY frames) before anything else."""
    run_id: int = Field(ge=0, lt=2**32)
    slots: list[Annotated[list[Annotated[int, Field(ge=1, le=2**31 - 1)] | SampleId],
                          Field(min_length=2, max_length=2)]] = \
        Field(default_factory=list, max_length=MAX_LIST)  # [slot, positions (>= 1)]
    replay: bool = False


class ReplayedSlot(Strict):
    """The replacement of a lost node: a slot admitted at /init, filled by the
    replay of `positions` positions from the previous node before anything else."""
    slot: SampleId
    positions: int = Field(ge=1, le=2**31 - 1)
    temperature: float = Field(ge=0.0)
    top_k: int | None = Field(default=None, ge=1, le=2**31 - 1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int = Field(ge=0, lt=SEED_LIMIT)


class InitRequest(Strict):
    run_id: int = Field(ge=0, lt=2**32)
    role: Literal["intermediate", "finisher"]
    start: int = Field(ge=0, le=2**31 - 1)
    stop: int = Field(ge=1, le=2**31 - 1)
    model: dict = Field(max_length=64)  # keys of a GPTConfig; checked by validate_init
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = Field(default=None, min_length=1, max_length=64)
    groups: list[list[SampleId]] = Field(min_length=1, max_length=4096)  # [start, stop) pairs
    next: Peer
    prev_addr: str = Field(min_length=1, max_length=255)
    prev_local: bool = False  # the previous node connects over this machine's Unix socket
    sampling: SamplingSpec | None = None
    weights: Literal["upload", "local", "kept"] = "upload"  # kept: a resumed run's own
    sequences: bool = False  # an engine run: groups are lanes of slots, sampling comes per ADMIT
    # model/quant.py:QUANT_MODES (tests check they agree); applied by the node as its stage loads
    quantize: Literal["int8", "int4", "int4-g64", "int4-g128"] | None = None
    batch_invariant: bool = False            # per-row compute (see GPT.batch_invariant)
    max_context: int | None = Field(default=None, ge=1, le=2**31 - 1)  # --max-context (None: default cap)
    kv_dtype: Literal["float32", "float16", "bfloat16", "int8"] | None = None  # --kv-dtype (None: dtype)
    # replay: keep the activations sent downstream per slot (a lost next node is rebuilt
    # from them) and keep the run (stage, caches) when a link fails, for a resume
    recovery: Literal["reprefill", "replay"] = "reprefill"
    resume: ResumeSpec | None = None
    replayed: list[ReplayedSlot] = Field(default_factory=list, max_length=MAX_LIST)


class MoveSpec(Strict):
    """Layers [start, stop) of the parked run `run_id` change node in a live re-plan
    (layer_move.py): /move/export reads their KV rows for `slots` ([slot, positions]),
    /move/expect arms the node that takes them."""
    run_id: int = Field(ge=0, lt=2**32)
    start: int = Field(ge=0, le=2**31 - 1)
    stop: int = Field(ge=1, le=2**31 - 1)
    slots: list[Annotated[list[Annotated[int, Field(ge=1, le=2**31 - 1)] | SampleId],
                          Field(min_length=2, max_length=2)]] = \
        Field(default_factory=list, max_length=MAX_LIST)  # [slot, positions (>= 1)]


class RunRef(Strict):
    run_id: int = Field(ge=0, lt=2**32)


class ProbeRequest(Strict):
    """Time this node on a run's shape (see capability.probe_speed)."""
    model: dict
    batch: int = Field(ge=1, le=4096)   # rows of one group (micro-batch)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = None
    context: int | None = Field(default=None, ge=1, le=2**31 - 1)  # positions held mid-generation
    fresh: bool = False                 # time it again, not from the cache (a live re-plan)
