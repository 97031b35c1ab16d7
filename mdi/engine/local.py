"""The single-device engine: the whole model on one device, no link."""
from __future__ import annotations

from ..model import GPT
from ..tokenizer import Tokenizer
from .scheduler import PipelineEngine


class LocalEngine(PipelineEngine):
    """Continuous batching on one device.

    model: the whole model (embeddings and head). tokenizer: for Event.text and
    stop strings. max_seqs: sequences decoded together (KV slots). max_queue:
    waiting sequences before submit raises EngineBusy (default 4 * max_seqs).
    lanes: micro-batches (1 by default; tokens do not depend on it).
    batch_invariant: accepted for the drivers' --batch-invariant; the model's cached
    forward is always batch-invariant (one GEMM per row), so a sequence's tokens
    never depend on its step-mates.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_seqs: int = 8,
                 max_queue: int | None = None, lanes: int = 1, retry_after: float = 1.0,
                 batch_invariant: bool = True) -> None:
        if not (model.has_embeddings and model.has_head):
            raise ValueError("single-device generation needs the whole model")
        super().__init__(model, tokenizer.decode, max_seqs, n_stages=lanes, link=None,
                         max_queue=max_queue, retry_after=retry_after)
        self.tokenizer = tokenizer
