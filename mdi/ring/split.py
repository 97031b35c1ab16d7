"""Per-node chunks of a checkpoint: what a node needs of the weights, and no more.

`mdi split` writes DIR/node0 (the starter's), DIR/node1, ... ahead of time; a
node started with `--chunk DIR/nodeK` loads its part from its own disk, so no
weights cross the network when a run starts. A chunk directory holds
config.json ({"format": "mdi-chunk", "model", "start", "stop", ...}) and
model.safetensors with exactly the stage's tensors (the finisher's includes
lm_head.weight, a copy of the tied embedding).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import st_io
from ..checkpoint.format import (EMBEDDING, TIED_HEAD, WEIGHTS, CheckpointError, expected_shapes,
                                 read_info, read_stage_file)
from ..model import GPT, GPTConfig
from .partition import Shard, even_split

CHUNK_FORMAT = "mdi-chunk"


def shard_tensors(ckpt: str | Path, shard: Shard) -> dict[str, torch.Tensor]:
    """The tensors of one stage, read from a checkpoint without loading the rest."""
    info = read_info(ckpt)
    out = {}
    try:
        with st_io.open_file(info.weights_path) as f:
            entries, data_start = st_io.read_header(f)
            for name, src in stage_sources(entries, info.config, shard, info.weights_path):
                # a fresh read per name: the tied head must not share the embedding's memory
                out[name] = st_io.read_tensor(f, entries[src], data_start)
    except (st_io.SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{info.weights_path} is corrupt or unreadable: {e}") from None
    return out


def stage_sources(entries, config: GPTConfig, shard: Shard, where) -> list[tuple[str, str]]:
    """(stage tensor name, name stored in the file) for each tensor of a stage."""
    out = []
    for name in expected_shapes(config, shard.start, shard.stop):
        src = name if name in entries else (EMBEDDING if name == TIED_HEAD else None)
        if src is None or src not in entries:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
        out.append((name, src))
    return out


def write_chunks(ckpt: str | Path, n_nodes: int, out_dir: str | Path,
                 shards: list[Shard] | None = None) -> list[Path]:
    info = read_info(ckpt)
    shards = shards or even_split(info.config.n_layer, n_nodes)
    out = Path(out_dir)
    paths = []
    for i, shard in enumerate(shards):
        d = out / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(shard_tensors(ckpt, shard), str(d / WEIGHTS), metadata={"format": CHUNK_FORMAT})
        meta = {"format": CHUNK_FORMAT, "version": 1, "model": info.config.to_dict(),
                "start": shard.start, "stop": shard.stop, "node": i, "n_nodes": len(shards),
                "source": str(Path(ckpt).resolve())}
        (d / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if i == 0 and (info.path / "tokenizer.json").is_file():
            (d / "tokenizer.json").write_text((info.path / "tokenizer.json").read_text())
        paths.append(d)
    return paths


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
        Shard(meta["start"], meta["stop"], config.n_layer)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    if not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} has no {WEIGHTS}")
    return {"start": meta["start"], "stop": meta["stop"], "model": config.to_dict()}


def load_chunk(chunk_dir: str | Path, config: GPTConfig, start: int, stop: int,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    return read_stage_file(Path(chunk_dir) / WEIGHTS, config, start, stop, device, dtype)
