"""What a lane step sends down the pipeline, and what comes back.

The engine (the first stage) sends, for each step of a lane, in this order:
Retire for the lane's sequences that finished, Admit for the ones that join,
their prefill chunks (a re-prefill after a context overflow too) as one Prefills
(in packs of at most PACK_TOKENS tokens; one Prefill when a pack holds a single
slot's), then one Decode with the lane's active slots. The last stage answers each Decode with Tokens.
Every stage handles the messages in the order sent (a FIFO link), so a slot's
state is the same on every node when its Decode arrives.

These are plain values: the in-memory link passes them as they are, the TCP
link encodes them as data-plane frames (docs/wire.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generate.sampling import SamplingConfig


@dataclass(frozen=True)
class Admit:
    """A sequence takes `slot`: every stage resets the slot; the last stage
    also takes its sampling parameters (a torch.Generator seeded with `seed`).

    The parameters were checked where they entered: the engine copies them from
    the sequence's SeqParams (with its stream seed), a node from an ADMIT frame
    its wire decoder checked (ring/protocol/wire.py). Stages do not check again."""
    slot: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig.trusted(self.temperature, self.top_k, self.seed, self.top_p)


@dataclass(frozen=True)
class Retire:
    """The sequence in `slot` ended: every stage frees the slot."""
    slot: int


@dataclass(frozen=True)
class Prefill:
    """Fill `slot`'s cache at positions start..start+T-1: x is ids (1, T) on the
    first stage, activations (1, T, C) after it. start 0 begins the slot's cache
    anew; start > 0 is the next chunk of a chunked prefill (the slot holds
    exactly positions 0..start-1)."""
    slot: int
    x: torch.Tensor
    start: int = 0


@dataclass(frozen=True)
class Prefills:
    """Several slots' prefill chunks of one lane step, computed as one forward and
    sent as one frame (model/packed.py): slot i fills positions starts[i]..
    starts[i]+lengths[i]-1, each start as a Prefill's. x holds their tokens packed
    one slot after another: ids (1, N) on the first stage, activations (1, N, C)
    after it, N = sum(lengths)."""
    lane: int
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    x: torch.Tensor


@dataclass(frozen=True)
class Replay:
    """After a loss (`--recovery replay`): the upstream survivor's log of what it
    sent for `slot`, positions start..start+T-1, activations (1, T, C). The
    replacement prefills its layers with it and sends nothing on: the stages
    after it already hold these positions."""
    slot: int
    x: torch.Tensor
    start: int = 0


@dataclass(frozen=True)
class Decode:
    """One token for each of `slots` (ascending, all of lane `lane`), each at
    its slot's own next position: x is ids (B, 1) or activations (B, 1, C)."""
    lane: int
    slots: tuple[int, ...]
    x: torch.Tensor
    position: int | None = None   # slots[0]'s position, when the sender checks it


@dataclass(frozen=True)
class Tokens:
    """The last stage's answer to a Decode: one sampled id per slot."""
    lane: int
    slots: tuple[int, ...]
    tokens: tuple[int, ...]


Message = Admit | Retire | Prefill | Prefills | Decode | Replay
