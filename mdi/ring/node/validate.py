"""What a node checks in an /init or /probe body before it touches any state.

Everything here needs no node state: the model config, the layer range and
role, the lanes or sample groups, the device, and the fixed batch's sampling
settings. A refusal is an InitError naming the field (a 400 on the control
plane); the node's state does not change. The memory check, which needs the
node's free memory and current run, is `check_memory` (a probe's:
`check_probe_memory`).
"""
from __future__ import annotations

import logging
import math

import torch

from ...engine.replay import ActivationLog
from ...generate.sampling import SamplingConfig
from ...model import GPTConfig
from ...model.cache import context_length
from ...model.dtypes import DTYPES, KV_DTYPES
from ..plan import limits as mem
from ..plan.capability import PROBE_STAGES
from ..protocol.wire import DTYPE_CODES, Limits
from .control_messages import InitRequest

log = logging.getLogger(__name__)
MAX_SAMPLES = 1 << 16  # per run; each one costs a KV-cache row on every node
MAX_MODEL_INT = 2**31 - 1  # any integer of a model config (the wire carries uint32 fields)
DEVICE_TYPES = ("cpu", "cuda", "mps")


class InitError(ValueError):
    """A configuration the node refuses; its state does not change."""


class NodeBusy(RuntimeError):
    """A request the node refuses for what it is doing now (HTTP 409), not for what
    the request says: asked again once that is over, it is served."""


def validate_init(req: InitRequest) -> tuple[GPTConfig, Limits, SamplingConfig | None]:
    """Every field of an /init body that needs no node state: the model, the run's
    frame limits and a fixed batch's sampling settings; InitError names the field."""
    config = validate_model(req.model)
    if not req.start < req.stop <= config.n_layer or req.start == 0:
        raise InitError(f"start/stop: layer range [{req.start}, {req.stop}) is not a secondary "
                        f"node's part of a {config.n_layer}-layer model")
    if (req.stop == config.n_layer) != (req.role == "finisher"):
        raise InitError(f"role: a {req.role} cannot hold layers [{req.start}, {req.stop}) "
                        f"of {config.n_layer}")
    if req.role == "finisher" and req.sampling is None and not req.sequences:
        raise InitError("sampling: the finisher needs sampling settings")
    sampling = sampling_of(req)  # now, not after the weights' upload
    expect = 0
    for i, g in enumerate(req.groups):
        if len(g) != 2 or g[0] != expect or g[1] <= g[0]:
            raise InitError(f"groups[{i}]: groups must be contiguous, non-empty sample ranges")
        expect = g[1]
    n_samples = expect
    if n_samples > MAX_SAMPLES:
        raise InitError(f"groups: {n_samples} samples, at most {MAX_SAMPLES} per run")
    limits = Limits(req.run_id, config.n_embd, context_length(config.block_size, req.max_context),
                    n_samples,
                    DTYPE_CODES[DTYPES[req.dtype]], max(b - a for a, b in req.groups),
                    sequences=req.sequences)
    check_recovery(req, limits)
    return config, limits, sampling


def check_recovery(req: InitRequest, limits: Limits) -> None:
    """A resume (survivor, or a node whose layers moved) or replayed slots
    (replacement) fit the run: an engine run (that keeps its log, for a replay),
    slots inside the run, positions inside the context, each slot listed once; a
    resume takes no weights, a replacement's do come."""
    if (req.resume is not None or req.replayed) and not req.sequences:
        raise InitError("resume/replayed: only an engine run resumes")
    if (req.replayed or (req.resume is not None and req.resume.replay)) \
            and req.recovery != "replay":
        raise InitError("resume/replayed: only an engine run with recovery 'replay' replays")
    if (req.resume is not None) != (req.weights == "kept"):
        raise InitError("weights: 'kept' goes with a resume, and a resume with 'kept'")
    if req.resume is not None and req.replayed:
        raise InitError("replayed: a resumed run holds its slots; only a replacement is replayed")
    pairs = [(s, n) for s, n in req.resume.slots] if req.resume is not None else \
        [(r.slot, r.positions) for r in req.replayed]
    field = "resume.slots" if req.resume is not None else "replayed"
    seen = set()
    for i, (slot, n) in enumerate(pairs):
        if slot >= limits.n_samples or slot in seen:
            raise InitError(f"{field}[{i}]: slot {slot} is outside the run's {limits.n_samples} "
                            "or listed twice")
        if not 1 <= n <= limits.block_size:
            raise InitError(f"{field}[{i}]: {n} positions, the context is {limits.block_size}")
        seen.add(slot)
    for i, r in enumerate(req.replayed):
        try:
            SamplingConfig(r.temperature, r.top_k, r.seed, r.top_p)
        except ValueError as e:
            raise InitError(f"replayed[{i}]: {e}") from None


def validate_model(model: dict) -> GPTConfig:
    """A model config from a request (/init, /probe); InitError names the field."""
    for key, value in model.items():  # before GPTConfig: no huge or non-finite numbers
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_MODEL_INT:
            raise InitError(f"model.{clip(key)}: {clip(str(value))} is larger than {MAX_MODEL_INT}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InitError(f"model.{clip(key)}: {value} is not a finite number")
    try:
        return GPTConfig.from_dict(model)
    except (ValueError, TypeError) as e:
        raise InitError(f"model: {e}") from None


def sampling_of(req: InitRequest) -> SamplingConfig | None:
    """A fixed batch's sampling settings (the finisher's), checked once, at /init:
    the run keeps this object (an engine run's come with each ADMIT frame)."""
    if req.sampling is None:
        return None
    try:
        return SamplingConfig(req.sampling.temperature, req.sampling.top_k, req.sampling.seed)
    except ValueError as e:
        raise InitError(f"sampling: {e}") from None


def validate_device(device: str) -> str:
    """A device this process can use (cpu, cuda[:N], mps); InitError naming it otherwise.

    torch answers an unusable device with many kinds of error (AssertionError on a
    build without CUDA, ModuleNotFoundError for backends without their module), so
    the type is checked against a short list first, then the device is tried.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InitError(f"device: {clip(device)!r} is not a device: {clip(str(e))}") from None
    if dev.type not in DEVICE_TYPES:
        raise InitError(f"device: {clip(device)!r}: this node runs on {', '.join(DEVICE_TYPES)}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InitError(f"device: {device!r}: this node has no CUDA device")
        if dev.index is not None and dev.index >= n:
            raise InitError(f"device: {device!r}: this node has {n} CUDA device(s), 0..{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InitError(f"device: {device!r}: MPS is not available on this node")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # noqa: BLE001 - any failure here means "not usable", a 400
        raise InitError(f"device: {device!r} is not usable here: {type(e).__name__}: "
                        f"{clip(str(e))}") from None
    return device


def check_quantize(mode: str | None, device: str) -> None:
    """int4 stages run on torch's CPU int4 kernel: InitError (quantize) elsewhere."""
    if mode is not None and mode.startswith("int4") and torch.device(device).type != "cpu":
        raise InitError(f"quantize: {mode} runs on CPU only (torch's int4 kernel is a CPU "
                        f"one), this run's device is {device}; use int8 there")


def check_probe_memory(config: GPTConfig, batch: int, dtype: str, device: str) -> None:
    """InitError when this node cannot hold what a /probe of the shape times at once:
    four small stages, each with its cache (the first, a middle one with one and with
    two blocks, the last: capability.probe_speed). --max-memory caps runs, not a probe."""
    c4 = GPTConfig.from_dict({**config.to_dict(), "n_layer": 4})
    dt = DTYPES[dtype]
    need = sum(mem.stage_weight_bytes(c4, a, b, dt) + mem.kv_cache_bytes(c4, b - a, batch, dt)
               for a, b in PROBE_STAGES)
    have, where = mem.available(device, None)
    if need > have:
        raise InitError(f"memory: timing this model needs {mem.format_size(need)} on {device} "
                        f"(four small stages of its shape), this node has "
                        f"{mem.format_size(have)} ({where})")


def check_memory(req: InitRequest, config: GPTConfig, limits: Limits, device: str,
                 max_memory: int | None, held: int) -> tuple[int, bool]:
    """Bytes the run takes (weights + KV caches, and what packing large float32
    weights adds when that fits too: limits.packed_copy_bytes) and whether to pack;
    InitError when the node has less than weights + KV caches. held: what the
    current run holds (a new /init drops it)."""
    dtype = DTYPES[req.dtype]
    weights = mem.stage_weight_bytes(config, req.start, req.stop, dtype, req.quantize)
    kv = mem.kv_cache_bytes(config, req.stop - req.start, limits.n_samples,
                            KV_DTYPES[req.kv_dtype or req.dtype], limits.block_size)
    if req.recovery == "replay" and req.role != "finisher":  # the log of what goes downstream
        kv += ActivationLog.max_bytes(limits.n_samples, limits.block_size, config.n_embd,
                                      torch.empty(0, dtype=dtype).element_size())
    have, where = mem.available(device, max_memory, held)
    if weights + kv > have:
        raise InitError(
            f"memory: the run needs {mem.format_size(weights + kv)} on {device} (weights "
            f"{mem.format_size(weights)} for layers [{req.start}, {req.stop}) in "
            f"{req.quantize or req.dtype}, "
            f"KV caches {mem.format_size(kv)} in {req.kv_dtype or req.dtype} for "
            f"{limits.n_samples} samples of "
            f"{limits.block_size} positions), this node has {mem.format_size(have)} "
            f"({where}); ask for fewer samples, a smaller --max-context or fewer layers")
    extra = mem.packed_copy_bytes(config, req.start, req.stop, dtype, req.quantize, device)
    if weights + kv + extra <= have:
        return weights + kv + extra, True
    log.info("memory: no room for the %s that packing the weights takes (%s free): this run "
             "computes on the plain layers, slower", mem.format_size(extra),
             mem.format_size(have - weights - kv))
    return weights + kv, False


def clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."
