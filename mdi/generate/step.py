"""One step of a stage for a set of sequences: the only place that feeds a stage.

Single-device generation (generate/local.py), the starter (ring/starter.py) and
every secondary node (ring/node.py) call these, so all of them give the model
the same tensors (ids or activations, positions, cache rows) and produce the
same numbers.

A stage is a `GPT` over blocks [start, stop). The first stage takes token ids,
later stages take the previous stage's activations (B, T, n_embd). A stage with
the head returns logits of the last position only (B, vocab): that is all a
sampler needs; any other stage returns its activations for the next one.

Callers choose the autograd mode (all of them run under torch.inference_mode).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..model import GPT, KVCache
from ..model.packed import pack_rows

Inputs = Sequence[int] | torch.Tensor  # token ids (first stage) or activations (later stages)


def _device(stage: GPT) -> torch.device:
    return stage.first_param().device


def prefill(stage: GPT, cache: KVCache, row: int, x: Inputs, start: int = 0) -> torch.Tensor:
    """Write one sequence at positions start..start+T-1 into row `row` of cache
    (start > 0: a chunk after the ones already there, which it attends to).

    x: T token ids, or activations (1, T, n_embd). Returns the stage's
    activations (1, T, n_embd), also on the last stage: a prefill needs no logits.
    """
    dev = _device(stage)
    if not isinstance(x, torch.Tensor):
        x = torch.tensor([list(x)], dtype=torch.long, device=dev)  # (1, T)
    pos = torch.arange(start, start + x.shape[1], device=dev)[None]  # (1, T)
    return stage(x, pos, cache.rows(row, row + 1), logits=False)


def prefill_rows(stage: GPT, cache: KVCache, rows: Sequence[int], starts: Sequence[int],
                 lengths: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """Several sequences' prefills (the prompts that join a lane at one step) as one
    forward: sequence i writes row rows[i] at positions starts[i]..+lengths[i]-1.

    x: their tokens packed one sequence after another, ids (1, N) or activations
    (1, N, n_embd), N = sum(lengths). Returns the activations (1, N, n_embd), packed
    alike. With --batch-invariant (stage.batch_invariant) each sequence runs its own
    `prefill`, so its numbers are a lone prefill's; otherwise one forward over the
    packed row (model/packed.py), equal to those up to float rounding.
    """
    if len(rows) == 1 or stage.batch_invariant:
        outs, a = [], 0
        for row, start, n in zip(rows, starts, lengths):
            outs.append(prefill(stage, cache, row, x[:, a:a + n], start))
            a += n
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    lo = min(rows)  # the cache rows lo..hi-1 that hold the sequences, as one view
    view = cache.rows(lo, max(rows) + 1)
    packed = pack_rows([r - lo for r in rows], starts, lengths, _device(stage))
    return stage(x, None, view, logits=False, packed=packed)


def decode(stage: GPT, cache: KVCache, x: Inputs, positions: Sequence[int]) -> torch.Tensor:
    """One new token for every row of cache, row b at position positions[b].

    x: B token ids, or activations (B, 1, n_embd). Returns activations
    (B, 1, n_embd), or on the last stage the logits (B, vocab).
    """
    dev = _device(stage)
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(list(x), dtype=torch.long, device=dev)[:, None]  # (B, 1)
    compiled = getattr(stage, "compiled_decode", None)  # --compile (model/compiled.py)
    if compiled is not None:
        out = compiled(cache, x, list(positions))
    else:
        pos = torch.tensor(list(positions), dtype=torch.long, device=dev)[:, None]  # (B, 1)
        out = stage(x, pos, cache)
    return out[:, -1] if stage.has_head else out


def forward_context(stage: GPT, x: Inputs) -> torch.Tensor:
    """No cache (--resend-context): the whole context of one sequence, every step.

    x: T token ids, or activations (1, T, n_embd). Returns activations
    (1, T, n_embd), or on the last stage the logits of the last position (1, vocab).
    """
    if not isinstance(x, torch.Tensor):
        x = torch.tensor([list(x)], dtype=torch.long, device=_device(stage))
    if not stage.has_head:
        return stage(x)
    h = stage(x, logits=False)  # the head on the last position only, not on all T
    return stage.head(h[:, -1:], "packed" if stage.packed_linears else "dense")[:, -1]
