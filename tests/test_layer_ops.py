"""A decode step's layer as one call (mdi/model/csrc/layer_ops.cpp): the same
kernels in the same order as fused_layers.block_forward's calls one by one, so
the same bits, token for token and logit for logit; and the layers it leaves to
those calls."""
from __future__ import annotations

import pytest
import torch

from mdi.model import fused_layers, fused_ops
from mdi.model.kernels import FEW_ROWS
from mdi.model.quant import configure_stage

from test_fused import FAMILIES
from test_fused_ops import decode_run

ops = fused_ops.ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the fused kernels did not build here")
PROMPTS = [[1, 5, 9, 2, 7], [3, 2], [8, 6, 4, 2, 0, 1, 3, 5, 7]]


def decode(model, layer_kernel: bool, monkeypatch, n: int = 6, prompts=PROMPTS):
    """Logits (n, rows, vocab) of greedy decode steps after each prompt's prefill, and
    how many layer calls went through decode_layer."""
    monkeypatch.setattr(fused_layers, "LAYER_KERNEL", layer_kernel)
    calls = []
    real = fused_layers.layer_operands

    def spy(*args):
        got = real(*args)
        calls.append(got is not None)
        return got
    monkeypatch.setattr(fused_layers, "layer_operands", spy)
    return decode_run(model, prompts, n, True, monkeypatch)[1], sum(calls)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("weights", ["int4", "int8", "bfloat16", "int8 bfloat16",
                                     "int4 bfloat16"])
def test_the_layer_call_equals_the_calls_one_by_one(family, weights, make_model, monkeypatch):
    model = make_model(FAMILIES[family], seed=5)
    if "bfloat16" in weights:
        model = model.to(torch.bfloat16)
    quantize = weights.split()[0]
    configure_stage(model, None if quantize == "bfloat16" else quantize)
    want, _ = decode(model, False, monkeypatch)
    got, calls = decode(model, True, monkeypatch)
    # every layer of every step took the one call, and of [3, 2]'s prefill of one position
    assert calls == (6 + 1) * model.config.n_layer
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["gpt2", "float32", "many int8 rows"])
def test_layers_it_does_not_compute_keep_the_calls_one_by_one(case, make_model, monkeypatch):
    """LayerNorm and GELU (GPT-2), float32 linears (oneDNN's packed product), an int8
    layer past its few_rows (the bfloat16 GEMM): block_forward's own calls."""
    model = make_model(FAMILIES["gpt2" if case == "gpt2" else "llama"], seed=5)
    configure_stage(model, "int8" if case == "many int8 rows" else None,
                    few_rows=2 if case == "many int8 rows" else None)
    want, _ = decode(model, False, monkeypatch)
    got, calls = decode(model, True, monkeypatch)
    # (an int8 layer still takes it for the one-row prefill of [3, 2], within few_rows)
    assert calls == (model.config.n_layer if case == "many int8 rows" else 0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["batch-invariant int8", "batch-invariant bfloat16",
                                  "bfloat16 cache", "float32 cache", "many bfloat16 rows"])
def test_what_it_takes_and_leaves_in_other_setups(case, make_model, monkeypatch):
    """--batch-invariant: int8 layers are row-independent, so taken; a bfloat16 Linear
    computes per row there (torch's bmm), so left. A cache of another dtype than the
    activations: the same kernels write it. More than FEW_ROWS bfloat16 rows: torch's
    GEMM, so left. Logits equal either way."""
    model = make_model(FAMILIES["qwen2"], seed=5)  # (its qkv projection has a bias)
    bf16 = "bfloat16" in case and "cache" not in case or case == "float32 cache"
    if bf16:
        model = model.to(torch.bfloat16)
    configure_stage(model, "int8" if "int8" in case or "cache" in case else None,
                    batch_invariant="batch-invariant" in case,
                    kv_dtype={"bfloat16 cache": torch.bfloat16,
                              "float32 cache": torch.float32}.get(case))
    prompts = [[1 + i % 7, 2] for i in range(FEW_ROWS + 1)] if "many" in case else PROMPTS
    want, _ = decode(model, False, monkeypatch, prompts=prompts)
    got, calls = decode(model, True, monkeypatch, prompts=prompts)
    # the steps of one position per row that take it: the 6 decode steps (of all the rows)
    # and each one-position prefill (of one row)
    prefills = 0 if case == "batch-invariant bfloat16" else sum(len(p) == 2 for p in prompts)
    steps = prefills + (0 if case in ("batch-invariant bfloat16", "many bfloat16 rows") else 6)
    assert calls == steps * model.config.n_layer
    assert torch.equal(got, want)


def test_bad_operands_name_what_is_wrong():
    x = torch.zeros(1, 1, 8)
    t = torch.zeros(1)
    with pytest.raises(RuntimeError, match="4 linears of 3 operands, 11 integers and 3 reals"):
        ops.decode_layer(x, t, t, t, t, t, t, [None] * 11, [0] * 11, [0.0] * 3)
    with pytest.raises(RuntimeError, match="a linear's weight"):
        ops.decode_layer(x, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 4),
                         torch.zeros(1, 1, 4), torch.zeros(2, 1, 1, 4, 4), torch.ones(8),
                         torch.ones(8), [None] * 12, [1, 1, 64] + [0, 32] * 4, [1e-5, 1e-5, 0.5])
