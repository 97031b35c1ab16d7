"""A request's prompts as token ids, checked against the vocabulary and the context.

A prompt longer than the model's context (with the completion it asks for) is
refused with OpenAI's 400 `context_length_exceeded`, naming both numbers; it is
never cut silently (the engine's overflow policy would keep only its newest
half, and `usage` would bill the whole). A token-id list is measured before any
id is looked at, then checked in one vectorised pass.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import openai_schema as oa


def context_error(context: int, n_prompt: int, max_tokens: int | None, param: str) -> oa.ApiError:
    where = "messages" if param == "messages" else "prompt"
    if max_tokens is None:
        asked = (f"your {where} resulted in {n_prompt} tokens, which leaves no room for the "
                 "completion (at least 1 token)")
    else:
        asked = (f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the {where}, "
                 f"{max_tokens} for the completion)")
    return oa.ApiError(400, f"This model's maximum context length is {context} tokens. However, "
                            f"{asked}. Please reduce the length of the {where} or the completion.",
                       param=param, code="context_length_exceeded")


def budget(n_prompt: int, requested: int | None, default: int, context: int, param: str) -> int:
    """The completion's token budget: the one requested, if prompt + it fit the context;
    else the default, shortened to what the context leaves."""
    if n_prompt + (requested or 1) > context:
        raise context_error(context, n_prompt, requested, param)
    return requested if requested is not None else min(default, context - n_prompt)


def token_ids(value: list, vocab_size: int, context: int, param: str) -> list[int]:
    """A token-id list, checked: integers (not booleans, not floats), in the vocabulary,
    no more than the context."""
    if not value:
        raise oa.ApiError(400, f"{param} must not be empty", param=param)
    if len(value) >= context:  # measured first: no id of an over-long list is looked at
        raise context_error(context, len(value), None, param)
    kinds = set(map(type, value))
    if kinds != {int}:
        other = next(k for k in kinds if k is not int)
        raise oa.ApiError(400, f"invalid value for {param}: token ids must be integers, got "
                               f"{other.__name__}", param=param, code="invalid_value")
    try:
        ids = np.fromiter(value, dtype=np.int64, count=len(value))
    except OverflowError:
        ids = None
    bad = None if ids is None else np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if ids is None or bad.size:
        first = max(value, key=abs) if ids is None else int(ids[bad[0]])
        raise oa.ApiError(400, f"{param}: token id {first} is outside the vocabulary "
                               f"(size {vocab_size})", param=param)
    return value


def completion_prompts(value: Any, encode: Callable[[str, str], list[int]], vocab_size: int,
                       context: int) -> list[list[int]]:
    """The `prompt` of a completion request (a text, texts, token ids, lists of token ids)
    as token ids, each shorter than the context."""
    shape = ("prompt must be a string, a list of strings, a list of token ids or a list of "
             "lists of token ids")
    if isinstance(value, str):
        return [_fits(encode(value, "prompt"), context)]
    if not isinstance(value, list):
        raise oa.ApiError(400, f"invalid value for prompt: {shape}", param="prompt", code="invalid_value")
    if not value:
        raise oa.ApiError(400, "prompt must not be empty", param="prompt")
    if type(value[0]) is int or isinstance(value[0], (bool, float)):
        return [token_ids(value, vocab_size, context, "prompt")]
    if len(value) > oa.MAX_N:  # prompts x n is at most MAX_N: counted before any is read
        raise oa.ApiError(400, f"prompts x n must be at most {oa.MAX_N}", param="n")
    out = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            out.append(_fits(encode(p, f"prompt[{i}]"), context, f"prompt[{i}]"))
        elif isinstance(p, list):
            out.append(token_ids(p, vocab_size, context, f"prompt[{i}]"))
        else:
            raise oa.ApiError(400, f"invalid value for prompt[{i}]: {shape}", param="prompt",
                              code="invalid_value")
    return out


def _fits(ids: list[int], context: int, param: str = "prompt") -> list[int]:
    if len(ids) >= context:
        raise context_error(context, len(ids), None, param)
    return ids
