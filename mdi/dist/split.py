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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save, save_file

from ..checkpoint.format import (EMBEDDING, TIED_HEAD, WEIGHTS, CheckpointError, build_stage,
                                 expected_shapes, read_info)
from ..model import GPT, GPTConfig
from .partition import Shard, even_split

CHUNK_FORMAT = "mdi-chunk"


def shard_tensors(ckpt: str | Path, shard: Shard) -> dict[str, torch.Tensor]:
    """The tensors of one stage, read from a checkpoint without loading the rest."""
    info = read_info(ckpt)
    want = expected_shapes(info.config, shard.start, shard.stop)
    out = {}
    try:
        with safe_open(str(info.weights_path), framework="pt") as f:
            keys = set(f.keys())
            for name in want:
                src = name if name in keys else (EMBEDDING if name == TIED_HEAD else None)
                if src is None or src not in keys:
                    raise CheckpointError(f"{info.weights_path}: missing tensor {name!r}")
                # clone: the tied head must not share memory with the embedding
                out[name] = f.get_tensor(src).clone()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{info.weights_path} is corrupt or unreadable: {e}") from None
    return out


def shard_bytes(ckpt: str | Path, shard: Shard) -> bytes:
    """One stage's weights as a safetensors stream (what the starter uploads)."""
    return st_save(shard_tensors(ckpt, shard))


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
    path = Path(chunk_dir) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            return build_stage(config, start, stop, lambda n: f.get_tensor(n) if n in keys else None,
                               device=device, dtype=dtype, where=str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from None
