"""A GGUF file runs at its own precision unless --quantize says otherwise."""
from __future__ import annotations

import argparse

import pytest

from mdi.checkpoint.gguf_precision import file_mode, gguf_path, mode_for
from mdi.cli.common import resolve_quantize

from conftest import REPO

BUNDLED = REPO / "models" / "shakespeare-char"


def shipped():
    from mdi.checkpoint.shipped import shipped_path

    try:
        return shipped_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("weights,want", [("Q4_1", "int4"), ("Q4_K", "int4"), ("IQ4_NL", "int4"),
                                          ("Q3_K", "int4"), ("Q2_K", "int4"), ("IQ2_XS", "int4"),
                                          ("TQ1_0", "int4"), ("Q8_0", "int8"), ("Q6_K", "int8"),
                                          ("Q5_0", "int8"), ("F32", None), ("F16", None),
                                          ("BF16", None)])
def test_each_weight_type_keeps_its_precision(weights, want):
    assert mode_for(weights) == want


def test_the_header_alone_gives_the_bytes_of_each_type_as_the_gguf_package_reads_them():
    from gguf import GGUFReader

    from mdi.checkpoint.gguf_file import bytes_by_type

    path = shipped()
    want: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        want[t.tensor_type.name] = want.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert bytes_by_type(path) == want
    blocks = bytes_by_type(path, prefix="blk.")       # the embedding (Q8_0) left out
    assert blocks and sum(blocks.values()) < sum(want.values()) and "Q4_1" in blocks
    assert file_mode("smollm2-135m-instruct") == ("int4", "Q4_1")
    assert gguf_path(BUNDLED) is None and file_mode(BUNDLED) == (None, None)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"quantize": None, "ckpt": "smollm2-135m-instruct", "device": "cpu",
                                 **kw})


def test_commands_default_to_the_file_s_precision_and_none_asks_for_float():
    shipped()
    for kw, want in [({}, "int4"), ({"quantize": "none"}, None), ({"quantize": "int8"}, "int8"),
                     ({"device": "cuda"}, None),                 # int4 is a CPU kernel
                     ({"ckpt": str(BUNDLED)}, None)]:        # not a GGUF: float as stored
        args = _args(**kw)
        resolve_quantize(args)
        assert args.quantize == want, kw
