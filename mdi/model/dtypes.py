"""The one table of compute dtypes by name (CLI flags, /init bodies, configs)."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = tuple(DTYPES)


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called `name`; a clear error naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None
