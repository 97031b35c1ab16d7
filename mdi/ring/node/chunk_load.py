"""A run's stage on a node: built from the starter's weights stream as it
arrives, or loaded from the pre-split chunk this node was started with (--chunk).

Both run on the node's compute thread (compute_thread.py) and end in
model/quant.py:configure_stage with the run's options. The stream is parsed as it
arrives and each tensor put in place at once (int8: quantized at once), so the
node never holds the received tensors and the built stage both.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import torch

from ...checkpoint.format import CheckpointError, StageBuilder
from ...checkpoint.malloc import mapped_allocations
from ...checkpoint.stream import WeightsStreamError, iter_stream
from ...model import GPT, GPTConfig
from ...model.dtypes import DTYPES, KV_DTYPES
from ...model.quant import configure_stage
from .data_plane import NodeRun
from .validate import InitError


def load_chunk_info(chunk_dir: str | Path) -> dict:
    from ...checkpoint.chunks import read_chunk_info

    return read_chunk_info(chunk_dir)


def load_chunk_stage(chunk_dir: Path, config: GPTConfig, start: int, stop: int, device: str,
                     dtype: torch.dtype, quantize: str | None = None) -> GPT:
    from ...checkpoint.chunks import load_chunk

    return load_chunk(chunk_dir, config, start, stop, device, dtype, quantize)


async def stage_from_chunk(run: NodeRun, chunk: dict | None, chunk_dir: Path | None,
                           executor: Executor,
                           before: Callable[[], Awaitable[None]] | None = None) -> GPT:
    """The run's stage from this node's chunk (/init with weights "local"); before():
    awaited once the request is checked, before the load (runtime.py drops the old run)."""
    req, config = run.req, run.config
    if chunk is None or chunk_dir is None:
        raise InitError("weights: 'local' asked, but this node was started without --chunk")
    if (chunk["start"], chunk["stop"]) != (req.start, req.stop) \
            or chunk["model"] != config.to_dict():
        raise InitError(f"weights: this node's chunk holds layers {chunk['start']}.."
                        f"{chunk['stop']} of another model or split")
    if before is not None:
        await before()
    loop = asyncio.get_running_loop()
    try:
        stage = await loop.run_in_executor(executor, load_chunk_stage, chunk_dir, config,
                                           req.start, req.stop, run.device, DTYPES[req.dtype],
                                           req.quantize)
        return await loop.run_in_executor(executor, configure_stage, stage, req.quantize,
                                          req.batch_invariant, req.max_context, run.pack, None,
                                          kv_dtype_of(req))
    except CheckpointError as e:
        raise InitError(f"weights: this node's chunk cannot be loaded: {e}") from None


async def stage_from_stream(run: NodeRun, body: bytes | AsyncIterator[bytes],
                            executor: Executor, span: tuple[int, int] | None = None) -> GPT:
    """The run's stage from a safetensors stream (PUT /weights), built as it arrives;
    span: other layers than the run's (the blocks a live re-plan moves here)."""
    req = run.req
    start, stop = span or (req.start, req.stop)
    chunks = _one_chunk(body) if isinstance(body, (bytes, bytearray)) else body
    try:
        build = StageBuilder(run.config, start, stop, run.device, DTYPES[req.dtype],
                             req.quantize)
        loop = asyncio.get_running_loop()
        with mapped_allocations():
            async for name, t in iter_stream(chunks, build.stream_want,
                                             f"layers [{start}, {stop})"):
                await loop.run_in_executor(executor, build.put, name, t)
                del t
        return await loop.run_in_executor(executor, configure_stage, build.finish(),
                                          req.quantize, req.batch_invariant, req.max_context,
                                          run.pack, None, kv_dtype_of(req))
    except WeightsStreamError as e:
        raise InitError(f"weights: {e}") from None
    except CheckpointError as e:
        raise InitError(str(e)) from None


def kv_dtype_of(req) -> torch.dtype | None:
    """The run's --kv-dtype (None: the caches store the compute dtype)."""
    return KV_DTYPES[req.kv_dtype] if req.kv_dtype else None


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield bytes(body)
