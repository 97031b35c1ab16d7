"""The first stage's step times as running means, and the prefill chunks they give.

An engine with a prefill share (mdi serve --prefill-share, unless
--batch-invariant) cuts a prompt's chunk, while other sequences decode, to about
`share` decode steps' time, never below MIN_SHARED_CHUNK tokens: a long prompt
then slows the streams around it instead of stopping them for a whole chunk
(SmolLM2 on 2 nodes: ~0.9 s gaps with chunks of 256; docs/benchmarks.md,
section 11). Not with --batch-invariant: chunk boundaries that follow the
machine's timing could change a sequence's numbers in their last bits.
"""
from __future__ import annotations

import logging

from ..generate.schedule import needs_prefill
from .sequence import Lane

log = logging.getLogger(__name__)
# Decode steps of the first stage whose running mean time is below this run on the
# event loop itself. Handing a step to the worker thread and back (two wake-ups,
# the GIL changing hands) cost 0.3-1 ms per step here: the bundled model's
# LocalEngine made 722 tokens/s inline and 554 through the worker (3 sequences,
# one lane). The loop is held at most this long by a step; prefills always go
# to the worker.
INLINE_BELOW_S = 0.02
# Prefill tokens a lane step carries at most (--prefill-chunk; 0: a whole prompt
# in one piece). A longer prompt crosses the pipeline in chunks over successive
# steps: stage k computes chunk i while stage k+1 computes chunk i-1, and the
# sequences already decoding in the lane wait one chunk per step, not the whole
# prompt. The value is measured: docs/benchmarks.md, "Chunked prefill".
DEFAULT_PREFILL_CHUNK = 256
# Prefill tokens one forward packs at most when several slots of a step have a chunk
# (slots.py: one Prefills per pack, model/packed.py). Short prompts gain the most, the
# weights being read once for all of them: SmolLM2-135M, one thread, 8 prompts of 16
# tokens packed in 0.5x the time of one forward each, of 64 tokens 0.76x, but 4 of 255
# in 1.04-1.08x (its elementwise steps 4x slower on tensors 4x larger than a lone
# prompt's); so long chunks go in packs of about this many tokens, each its own frame.
PACK_TOKENS = 512
DEFAULT_PREFILL_SHARE = 2.0
MIN_SHARED_CHUNK = 16
KEEP = 0.8  # weight of the running mean against a new time


class StepTimes:
    """Running means of a decode step (s) and of a prefill token beyond a step's decode
    rows (s), both measured on the first stage."""

    def __init__(self) -> None:
        self.decode: float | None = None
        self.prefill_token: float | None = None
        self.steps = 0          # steps computed (decode, prefill or both), and their seconds:
        self.busy_s = 0.0       # the first stage's per-step time for a live re-plan's windows
        self.prefill_steps = 0  # steps with a prefill chunk (such windows are not compared)

    def stepped(self, took: float, prefill: bool) -> None:
        self.steps += 1
        self.busy_s += took
        self.prefill_steps += prefill

    def decoded(self, took: float) -> None:
        self.decode = took if self.decode is None else KEEP * self.decode + (1 - KEEP) * took

    def prefilled(self, took: float, tokens: int, with_decode_rows: bool) -> None:
        rows = self.decode if with_decode_rows and self.decode is not None else 0.0
        per = max(took - rows, 0.1 * took) / tokens
        pt = self.prefill_token
        self.prefill_token = per if pt is None else KEEP * pt + (1 - KEEP) * per

    def shared_budget(self, chunk: int, share: float) -> int:
        """A step's prefill tokens while other sequences decode: about `share` decode
        steps' worth, between min(MIN_SHARED_CHUNK, chunk) and chunk."""
        floor = min(MIN_SHARED_CHUNK, chunk)
        if self.decode is None or not self.prefill_token:
            return floor
        budget = max(floor, min(chunk, int(share * self.decode / self.prefill_token)))
        log.debug("prefill budget %d tokens: decode step %.1f ms, prefill %.3f ms a token",
                  budget, self.decode * 1e3, self.prefill_token * 1e3)
        return budget


def prefill_budget(chunk: int, share: float, times: StepTimes, lane: Lane,
                   lanes: list[Lane], context: int) -> int:
    """A lane step's prefill tokens: `chunk`, or with a `share` while other sequences
    decode, about that many decode steps' worth (StepTimes.shared_budget). The
    engine's sequences are looked at only when this lane has a prompt to write."""
    if not (chunk and share > 0) or not any(
            needs_prefill(seq.state, context) for seq in lane.seqs.values()) or not any(
            not needs_prefill(seq.state, context)
            for other in lanes for seq in other.seqs.values() if not seq.done):
        return chunk
    return times.shared_budget(chunk, share)
