"""Control-plane request bodies: validated on receipt, errors name the field."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Peer(Strict):
    addr: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)


class SamplingSpec(Strict):
    temperature: float = Field(ge=0.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int


class InitRequest(Strict):
    run_id: int = Field(ge=0, lt=2**32)
    role: Literal["intermediate", "finisher"]
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    model: dict
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = None
    groups: list[list[int]] = Field(min_length=1, max_length=4096)  # [start, stop) pairs
    next: Peer
    prev_addr: str = Field(min_length=1, max_length=255)
    sampling: SamplingSpec | None = None
    weights: Literal["upload", "local"] = "upload"


class RunRef(Strict):
    run_id: int = Field(ge=0, lt=2**32)


class ProbeRequest(Strict):
    """Time this node on a run's shape (see capability.probe_speed)."""
    model: dict
    batch: int = Field(ge=1, le=4096)   # rows of one group (micro-batch)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str | None = None
