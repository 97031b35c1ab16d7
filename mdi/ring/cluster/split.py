"""`mdi split`'s ring side: per-node chunks of a checkpoint by node count.

Chunk files themselves (format, reading, writing) are checkpoint knowledge and
live in mdi.checkpoint.chunks; this adds only the ring's even split.
"""
from __future__ import annotations

from pathlib import Path

from ...checkpoint import chunks
from ...checkpoint.sources import Checkpoint, open_checkpoint
from ..plan.partition import Shard, even_split


def write_chunks(ckpt: str | Path | Checkpoint, n_nodes: int, out_dir: str | Path,
                 shards: list[Shard] | None = None) -> list[Path]:
    """DIR/node0 .. node{n-1}: an even split over n_nodes unless shards are given."""
    info = open_checkpoint(ckpt)
    return chunks.write_chunks(info, shards or even_split(info.config.n_layer, n_nodes), out_dir)
