"""Per-node chunks of a checkpoint: what a node needs of the weights, and no more.

`mdi split` writes DIR/node0 (the starter's), DIR/node1, ... ahead of time; a
node started with `--chunk DIR/nodeK` loads its part from its own disk, so no
weights cross the network when a run starts. A chunk directory holds
config.json ({"format": "mdi-chunk", "model", "start", "stop", ...}) and
model.safetensors with exactly the stage's tensors (the finisher's includes
lm_head.weight, a copy of the tied embedding). Chunks are always in our names
and layout, whatever the checkpoint's kind (ours, Hugging Face, GGUF). A
quantized checkpoint's chunks hold its stage's stored parts (quant_parts.py)
as they are, and say its mode as the checkpoint does ("quantize": {"mode",
"dtype"}): a node loading one builds the stage one device builds.

Layer ranges are anything with `.start` and `.stop` (ring.partition.Shard).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors.torch import save_file

from ..model import GPT, GPTConfig
from . import st_io
from ..model.dtypes import DTYPES
from .format import (STORED_MODES, TIED_SOURCES, WEIGHTS, CheckpointError, expected_shapes,
                     read_stage_file, stored_shapes)
from .hf import HFCheckpoint
from .sources import Checkpoint, open_checkpoint

CHUNK_FORMAT = "mdi-chunk"


class Span(Protocol):
    """Blocks [start, stop) of a model (ring.partition.Shard is one)."""
    start: int
    stop: int


def shard_tensors(ckpt: str | Path | Checkpoint, shard: Span) -> dict[str, torch.Tensor]:
    """The tensors of one stage, in our names, read without loading the rest."""
    info = open_checkpoint(ckpt)
    if isinstance(info, HFCheckpoint):
        return {name: hf_tensor(info, name)
                for name in expected_shapes(info.config, shard.start, shard.stop)}
    out = {}
    try:
        with st_io.open_file(info.weights_path) as f:
            entries, data_start = st_io.read_header(f, info.quantized is not None)
            for name, src in stage_sources(entries, info.config, shard, info.weights_path,
                                           info.quantized):
                # a fresh read per name: the tied head must not share the embedding's memory
                out[name] = st_io.read_tensor(f, entries[src], data_start)
    except (st_io.SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{info.weights_path} is corrupt or unreadable: {e}") from None
    return out


def hf_tensor(info: HFCheckpoint, name: str) -> torch.Tensor:
    """Our tensor `name` from a Hugging Face source, freshly read (never shared)."""
    t = info.get(name)
    if t is None:
        info.dtype_of(name)  # raises, naming the missing Hugging Face tensor
        raise CheckpointError(f"{info.source.origin}: missing tensor {name!r}")
    return t.contiguous()


def stage_sources(entries, config: GPTConfig, shard: Span, where, stored: str | None = None
                  ) -> list[tuple[str, str]]:
    """(stage tensor name, name stored in the file) for each tensor of a stage;
    stored: the mode a quantized checkpoint's file holds (its layers' parts)."""
    want = (stored_shapes(config, shard.start, shard.stop, stored, set(entries)) if stored
            else expected_shapes(config, shard.start, shard.stop))
    out = []
    for name in want:
        tied = name in TIED_SOURCES and config.tie_embeddings
        src = name if name in entries else (TIED_SOURCES[name] if tied else None)
        if src is None or src not in entries:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
        out.append((name, src))
    return out


def write_chunks(ckpt: str | Path | Checkpoint, shards: Sequence[Span], out_dir: str | Path
                 ) -> list[Path]:
    """Write out_dir/node0, node1, ...: one chunk per layer range (see ring.split
    for the even split by node count)."""
    info = open_checkpoint(ckpt)
    quantized = getattr(info, "quantized", None)
    out = Path(out_dir)
    paths = []
    for i, shard in enumerate(shards):
        d = out / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(shard_tensors(info, shard), str(d / WEIGHTS), metadata={"format": CHUNK_FORMAT})
        meta = {"format": CHUNK_FORMAT, "version": 1, "model": info.config.to_dict(),
                "start": shard.start, "stop": shard.stop, "node": i, "n_nodes": len(shards),
                "source": str(info.path.resolve())}
        if quantized:
            meta["quantize"] = {"mode": quantized, "dtype": info.float_dtype}
        (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if i == 0:
            _copy_tokenizer(info, d)
        paths.append(d)
    return paths


def _copy_tokenizer(info: Checkpoint, d: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    if isinstance(info, HFCheckpoint):
        src = info.source
        texts = [src.tokenizer_json, src.tokenizer_json and json.dumps(src.tokenizer_config),
                 src.tokenizer_json and json.dumps(src.generation_config)]
    else:
        texts = [(info.path / n).read_text() if (info.path / n).is_file() else None for n in names]
    for name, text in zip(names, texts):
        if text:
            (d / name).write_text(text)


def read_chunk_info(chunk_dir: str | Path) -> dict:
    d = Path(chunk_dir)
    try:
        meta = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d} is not a chunk directory: no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHUNK_FORMAT:
        raise CheckpointError(f"{d} is not an mdi chunk (format field)")
    try:
        config = GPTConfig.from_dict(meta["model"])
        start, stop = meta["start"], meta["stop"]
        for v in (start, stop):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"start and stop must be integers, got {type(v).__name__} {v!r}")
        if not 0 <= start < stop <= config.n_layer:
            raise ValueError(f"layer range [{start}, {stop}) is not a non-empty part of "
                             f"0..{config.n_layer}")
        quant = meta.get("quantize")
        if quant is not None and (not isinstance(quant, dict) or quant.get("mode") not in STORED_MODES
                                  or quant.get("dtype") not in DTYPES):
            raise ValueError(f"the quantize field must be {{\"mode\": one of "
                             f"{', '.join(STORED_MODES)}, \"dtype\": one of {', '.join(DTYPES)}}}, "
                             f"got {quant!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    if not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} has no {WEIGHTS}")
    out = {"start": meta["start"], "stop": meta["stop"], "model": config.to_dict()}
    if quant is not None:  # only then: a float chunk's report stays as it was
        out["quantize"] = quant["mode"]
    return out


def load_chunk(chunk_dir: str | Path, config: GPTConfig, start: int, stop: int,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: str | None = None) -> GPT:
    """A chunk's stage; quantize="int8": each weight quantized as it is read. A
    quantized chunk gives its own mode's stage (another `quantize` is an error)."""
    stored = read_chunk_info(chunk_dir).get("quantize")
    return read_stage_file(Path(chunk_dir) / WEIGHTS, config, start, stop, device, dtype, quantize,
                           stored)
