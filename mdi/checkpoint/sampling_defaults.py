"""A model's own sampling settings: what `sample`, `run`, `chat` (and `serve`) use when
the user sets none, and what `mdi inspect` shows.

Where they come from, first found wins:
  - generation_config.json (a Hugging Face directory or hub name; our directory when
    `mdi convert` wrote one), with Hugging Face's meaning: without `do_sample: true`
    a model generates greedily (transformers' `generate` does), with it `temperature`
    (1.0), `top_k` (50) and `top_p` (1.0) apply, defaults in brackets;
  - a GGUF file's `general.sampling.temp/top_k/top_p` (mapped to those names by
    checkpoint/gguf.py): sampling with what the file gives;
  - nothing: a chat model (one with a chat template) decodes greedily, because a
    small instruct model answers wrongly when sampled: SmolLM2-135M-Instruct's first
    token for "What is the capital of France?" is "The" 15%, "L" 14%, "La" 10%, and
    at temperature 0.2, top-p 0.9, top-k 40 it said Paris in 7 answers of 16 (greedy:
    "The capital of France is Paris."). A plain language model (our nanoGPT-style
    checkpoints) samples with nanoGPT's sample.py settings, temperature 0.8 and top-k
    200, so that its samples differ.
`max_new_tokens` is the model's when it gives one (else None: the command's own default).
Repetition penalties are not supported by our sampler and are left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..tokenizer import Tokenizer
from .format import CheckpointError
from .hf import HFCheckpoint
from .sources import Checkpoint

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float                # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    source: str = ""                  # where they come from, for `mdi inspect` and logs

    def describe(self) -> str:
        parts = ["greedy (temperature 0)" if self.temperature == 0 else f"temperature {self.temperature:g}"]
        if self.temperature > 0:
            parts += [f"top-k {self.top_k}" if self.top_k else "no top-k",
                      f"top-p {self.top_p:g}" if self.top_p else "no top-p"]
        if self.max_new_tokens:
            parts.append(f"max new tokens {self.max_new_tokens}")
        return ", ".join(parts) + f" ({self.source})"


CHAT_MODEL = SamplingDefaults(0.0, source="none in the checkpoint; mdi's default for a chat model")
PLAIN_MODEL = SamplingDefaults(0.8, top_k=200,
                               source="none in the checkpoint; mdi's default for a model without "
                                      "a chat template (nanoGPT's)")


def generation_config(ck: Checkpoint) -> dict:
    """The checkpoint's generation_config.json as a dict ({} when it has none)."""
    if isinstance(ck, HFCheckpoint):
        return dict(ck.source.generation_config or {})
    path = ck.path / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def sampling_defaults(ck: Checkpoint, tokenizer: Tokenizer | None = None) -> SamplingDefaults:
    """The model's sampling settings (see the module docstring); tokenizer: the
    checkpoint's, when the caller has it (it says whether the model chats)."""
    gc = generation_config(ck)
    where = ("GGUF metadata" if str(ck.path).endswith(".gguf") else GENERATION_CONFIG)
    max_new = _positive_int(gc.get("max_new_tokens"))
    given = {k for k in ("temperature", "top_k", "top_p") if k in gc}
    if "do_sample" in gc or (given and where == GENERATION_CONFIG):
        if not gc.get("do_sample"):
            return SamplingDefaults(0.0, max_new_tokens=max_new, source=f"{where}: do_sample false")
        return _sampled(gc, max_new, where, top_k=50)
    if given:  # GGUF: sampling settings mean sampling
        return _sampled(gc, max_new, where, top_k=None)
    if tokenizer is None:
        try:
            tokenizer = ck.tokenizer()
        except (CheckpointError, ValueError):
            tokenizer = None
    chats = bool(getattr(tokenizer, "chat_template", None))
    base = CHAT_MODEL if chats else PLAIN_MODEL
    return SamplingDefaults(base.temperature, base.top_k, base.top_p, max_new, base.source)


def _sampled(gc: dict, max_new: int | None, where: str, top_k: int | None) -> SamplingDefaults:
    t = gc.get("temperature", 1.0)
    k = gc.get("top_k", top_k)
    p = gc.get("top_p")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
        raise CheckpointError(f"{where}: temperature must be a number >= 0, got {t!r}")
    return SamplingDefaults(float(t), _positive_int(k), _fraction(p), max_new, where)


def _positive_int(v: Any) -> int | None:
    """0 or absent: no limit (Hugging Face's top_k=0)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _fraction(v: Any) -> float | None:
    """top_p in (0, 1); 1.0 or absent: no nucleus cut."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 else None
