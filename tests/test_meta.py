"""Stages on the meta device (model/meta.py): shapes without storage, and no
initialiser runs there (the first one imported torch._dynamo: 1.1 s per process)."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from mdi.model import GPT, GPTConfig
from mdi.model.meta import on_meta

LLAMA = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                  norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                  intermediate_size=48, tie_embeddings=False)


def test_a_meta_stage_has_the_real_stage_names_and_shapes():
    for config in (GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16),
                   LLAMA):
        with on_meta():
            meta = GPT(config, 0, 2)
        real = GPT(config, 0, 2)
        assert all(t.is_meta for t in meta.state_dict().values())
        assert {k: v.shape for k, v in meta.state_dict().items()} == \
            {k: v.shape for k, v in real.state_dict().items()}


def test_real_tensors_are_initialised_inside_and_on_other_threads():
    """Initialisers skipped on the meta device still run for real tensors: the
    values equal those drawn outside on_meta from the same seed (zeros or
    torch.empty's leftovers would differ)."""
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)

    def drawn() -> torch.Tensor:
        return torch.nn.init.normal_(torch.zeros(4, 4, device="cpu"), std=1.0,
                                     generator=torch.Generator().manual_seed(3))

    def model() -> GPT:
        torch.manual_seed(5)
        return GPT(config)

    with on_meta():
        w = drawn()  # a CPU tensor built inside still gets its values
        seen = {}
        t = threading.Thread(target=lambda: seen.update(m=model()))
        t.start()
        t.join()
    assert torch.equal(w, drawn()) and w.abs().sum() > 0
    inside, outside = seen["m"].state_dict(), model().state_dict()
    assert inside["transformer.wte.weight"].device.type == "cpu"
    assert all(torch.equal(inside[k], outside[k]) for k in outside)


@pytest.mark.slow  # a fresh interpreter: this one may have imported torch._dynamo already
def test_sizing_a_stage_does_not_import_dynamo():
    code = ("import sys\nfrom mdi.model import GPTConfig\nfrom mdi.ring.plan.capability import stage_memory\n"
            "stage_memory(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16), 2)\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # a fresh interpreter
def test_a_quantized_skeleton_computes_nothing_on_the_meta_device():
    """quantize_rows of a skeleton's placeholder returns placeholders: arithmetic on the
    meta device imports sympy, torch._dynamo and torch._inductor (+68 MB of RSS in every
    process that loaded or sized an int8/int4 stage)."""
    code = ("import sys\nfrom mdi.model import GPTConfig\nfrom mdi.checkpoint.format import "
            "quantized_skeleton\nfrom mdi.ring.plan.capability import stage_memory\n"
            "c = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32)\n"
            "for mode in ('int8', 'int4'):\n"
            "    s = quantized_skeleton(c, 0, None, mode)\n"
            "    stage_memory(c, 2, quantize=mode)\n"
            "print(s.transformer.wte.weight.dtype, s.transformer.wte.scale.is_meta,\n"
            "      sorted(m for m in ('sympy', 'torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch.int8 True []"
