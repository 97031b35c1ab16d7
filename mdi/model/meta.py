"""Stages without storage: shapes, sizes and skeletons that loaders fill by name.

Modules built under `torch.device("meta")` still run their initialisers, and on
the meta device `normal_`/`uniform_` go through Python reference code whose
first call imports torch._dynamo: 1.1 s of every process that sized or loaded
a stage (mdi sample, run, serve, a node's first /init). `on_meta()` builds on
the meta device and skips the initialisers there, which leave a meta tensor as
it was anyway. The skip is a torch function mode, so it holds for the thread
that entered it only; tensors on real devices are initialised as usual.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_INITS = frozenset({
    torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_,
    torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
    torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    torch.nn.init.ones_, torch.nn.init.zeros_, torch.nn.init.constant_,
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
})


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITS:  # torch.nn.init passes the tensor by keyword
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device, without running their initialisers."""
    with torch.device("meta"), _SkipMetaInit():
        yield
