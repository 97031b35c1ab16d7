"""Tensors derived from a weight (its transposed view, a float32 copy), kept on the
module that holds it until the weight changes: made once, not on every step."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class _Kept:
    """A tensor derived from a weight, kept on its module (not state); copies and
    pickles of the module start empty (a copy would be a second copy of the weight)."""

    def __init__(self, weight=None, key: tuple = (), value=None) -> None:
        self.weight, self.key, self.value = weight, key, value

    def __deepcopy__(self, memo: dict) -> "_Kept":
        return _Kept()

    def __reduce__(self) -> tuple:
        return (_Kept, ())


def kept(module: nn.Module, name: str, w: torch.Tensor,
         make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """make(w), kept on `module` as `name` while w is the same tensor over the same
    memory, dtype and in-place version (`.to()` swaps a parameter's data in place)."""
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot change
        version = -1
    key = (w.data_ptr(), w.dtype, version)
    held = module.__dict__.get(name)
    if held is None or held.weight is not w or held.key != key:
        held = module.__dict__[name] = _Kept(w, key, make(w))
    return held.value
