"""What a run costs a node in memory, and whether the node can take it.

A node accepts a run at /init only if the run's weights and KV caches fit what
the node has: its free memory (system RAM for CPU and MPS, the device's free
memory for CUDA), capped by `mdi node --max-memory` when given. The check runs
before anything is allocated, and the refusal names both numbers.

The sizes are pure functions of the model config: grouped-query attention
(`kv_heads`) shrinks the cache.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ...checkpoint.format import expected_shapes, quantized_skeleton
from ...model.cache import context_length
from ...model.meta import on_meta

QUANT_FLOATS = (".scale", ".scales_and_zeros")  # a quantized layer's own float tensors

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in a size such as "512MB", "2GB", "2GiB", "1.5G" or "1000000" (SI or binary units)."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 512MB, 2GB or 2GiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return n


def format_size(n: int) -> str:
    """A byte count for people: 3.27 GB (SI), with the exact count for small values."""
    for unit, k in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} bytes"


def kv_cache_bytes(config, n_layers: int, n_samples: int, dtype: torch.dtype,
                   max_context: int | None = None) -> int:
    """Bytes of the KV caches of n_samples over n_layers blocks.

    Each block keeps k and v of shape (samples, n_kv_head, context, head_size),
    as KVCache holds them once grown to the whole context (what a run's rows can reach); context is min(block_size, max_context), with
    max_context's default cap (model/cache.py:context_length) when None;
    int8 (--kv-dtype int8, model/cache_int8.py): 1 byte a number plus a float32
    scale per position and head.
    """
    n_kv_head, head_size = config.kv_heads, config.head_size
    vector = head_size * torch.empty(0, dtype=dtype).element_size()
    if dtype == torch.int8:
        vector += 4  # its scale
    context = context_length(config.block_size, max_context)
    return 2 * n_layers * n_samples * n_kv_head * context * vector


def stage_weight_bytes(config, start: int, stop: int, dtype: torch.dtype,
                       quantize: str | None = None) -> int:
    """Bytes of a stage's parameters [start, stop) in the run's dtype; with a
    --quantize mode what the quantized stage holds once loaded (it quantizes as
    the weights arrive, so the float weights are never all in memory): int8
    weights 1 byte each plus a float32 scale per row; int4 weights (model/int4.py)
    half a byte each plus a bfloat16 scale and zero per group.

    Built on the meta device from at most three one-block stages, never from the
    whole range (a hostile /init may ask for millions of layers): the first block
    (with the embeddings when start is 0), the last (with the final norm and
    head when it ends the model), and the blocks between, all alike.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()

    def nbytes(a: int) -> int:
        if not quantize:
            return sum(itemsize * math.prod(s) for s in expected_shapes(config, a, a + 1).values())
        total = 0
        for name, t in quantized_skeleton(config, a, a + 1, quantize).state_dict().items():
            quantized = not t.is_floating_point() or name.endswith(QUANT_FLOATS)
            total += (t.element_size() if quantized else itemsize) * t.numel()
        return total

    return _over_blocks(start, stop, nbytes)


def packed_copy_bytes(config, start: int, stop: int, dtype: torch.dtype,
                      quantize: str | None = None, device: str = "cpu") -> int:
    """What CPU float32 inference adds to a stage's plain weights by packing its large
    Linear weights into oneDNN's layout (model/layers.py:pack_linears): the packed
    copy replaces a plain weight, so only a weight shared with another module (a
    tied head beside its embedding) is held twice, plus, while packing, one weight
    at a time (the largest). 0 where nothing is packed (int8, other dtypes, GPUs).
    Same three one-block stages as stage_weight_bytes, on the meta device."""
    from torch import nn

    from ...model import GPT
    from ...model.layers import PACK_MIN_WEIGHTS, packing_available

    if quantize or dtype != torch.float32 or not device.startswith("cpu") or \
            not packing_available():
        return 0

    def packed(a: int) -> list[tuple[int, bool]]:
        """(bytes, shared) of each weight block a's stage packs."""
        with on_meta():
            stage = GPT(config, a, a + 1)
        uses: dict[int, int] = {}
        for _, p in stage.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        return [(4 * m.weight.numel(), uses[id(m.weight)] > 1) for m in stage.modules()
                if isinstance(m, nn.Linear) and m.weight.numel() >= PACK_MIN_WEIGHTS]

    shared = _over_blocks(start, stop, lambda a: sum(n for n, twice in packed(a) if twice))
    head = config.vocab_size * config.n_embd
    if start == 0 and stop == config.n_layer and config.tie_embeddings and head >= PACK_MIN_WEIGHTS:
        shared += 4 * head  # a whole model's tied head (one-block stages never hold both ends)
    blocks = {start, min(start + 1, stop - 1), stop - 1}
    return shared + max((n for a in blocks for n, _ in packed(a)), default=0)


def _over_blocks(start: int, stop: int, nbytes: Callable[[int], int]) -> int:
    """A stage's [start, stop) total from at most three one-block stages: the
    first (with the embeddings when start is 0), the last (with the head when it
    ends the model) and one between, which stands for all the middle ones."""
    n = nbytes(start)
    if stop - start >= 2:
        n += nbytes(stop - 1)
    if stop - start >= 3:
        n += (stop - start - 2) * nbytes(start + 1)
    return n


@dataclass(frozen=True)
class DeviceMemory:
    free: int       # bytes a new allocation may take now
    total: int
    where: str      # what `free` is, for messages ("free system memory", ...)


def free_memory(device: str) -> DeviceMemory:
    """The memory of a device: CUDA's mem_get_info, else the host's available RAM
    (CPU and MPS share it), or what this process's memory cgroup has left where
    that is less (a container, a capped node: cgroups.py)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(dev)
        return DeviceMemory(int(free), int(total), f"free memory of {device}")
    import psutil

    from .cgroups import cgroup_memory

    vm = psutil.virtual_memory()
    group = cgroup_memory()
    if group is not None and group.free < vm.available:
        return DeviceMemory(group.free, min(group.limit, int(vm.total)),
                            f"memory left under the {group.where} limit")
    return DeviceMemory(int(vm.available), int(vm.total), "free system memory")


def available(device: str, max_memory: int | None, held: int = 0) -> tuple[int, str]:
    """What a run may take: free memory plus what the current run holds (dropped when the
    new run is configured), at most max_memory."""
    memory = free_memory(device)
    free = memory.free + held
    if max_memory is not None and max_memory < free:
        return max_memory, "--max-memory"
    return free, memory.where
