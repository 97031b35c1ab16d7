"""The single-device engine: the whole model on one device, no link."""
from __future__ import annotations

from ..model import GPT
from ..tokenizer import Tokenizer
from .scheduler import DEFAULT_PREFILL_CHUNK, PipelineEngine


class LocalEngine(PipelineEngine):
    """Continuous batching on one device.

    model: the whole model (embeddings and head). tokenizer: for Event.text and
    stop strings. max_seqs: sequences decoded together (KV slots). max_queue:
    waiting sequences before submit raises EngineBusy (default 4 * max_seqs).
    lanes: micro-batches (1 by default; tokens do not depend on it).
    batch_invariant: True/False sets the model's `batch_invariant` (per-row
    compute: a sequence's tokens never depend on its step-mates); None (default)
    keeps what the loader configured (`configure_stage`). prefill_chunk: prefill
    tokens per step at most (0: a prompt in one piece; see scheduler.py).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_seqs: int = 8,
                 max_queue: int | None = None, lanes: int = 1, retry_after: float = 1.0,
                 batch_invariant: bool | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if not (model.has_embeddings and model.has_head):
            raise ValueError("single-device generation needs the whole model")
        if batch_invariant is not None:
            model.batch_invariant = batch_invariant
        super().__init__(model, tokenizer.decode, max_seqs, n_stages=lanes, link=None,
                         max_queue=max_queue, retry_after=retry_after,
                         prefill_chunk=prefill_chunk)
        self.tokenizer = tokenizer
