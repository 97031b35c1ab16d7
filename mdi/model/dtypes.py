"""The one table of compute dtypes by name (CLI flags, /init bodies, configs)."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a compute dtype in DTYPES (ValueError for any other)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")

# what a KV cache may store (--kv-dtype): the float dtypes, or int8 with a scale per
# (position, head) (model/cache_int8.py)
KV_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int8": torch.int8}
