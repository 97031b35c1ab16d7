"""--kv-dtype: the KV caches store a narrower dtype than the compute dtype, read back
in the compute dtype each step: half the cache memory, logits close to a float32
cache's; the nodes are told at /init and plan with it; a ring equals one device."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from mdi.generate import step
from mdi.model import GPTConfig
from mdi.model.quant import configure_stage

from cluster_helpers import child_env, mdi_cmd
from conftest import REPO, scaled_random_model

ROPE = GPTConfig(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                 intermediate_size=48, norm="rmsnorm", positions="rope", activation="swiglu",
                 bias=False, tie_embeddings=False)
GPT2 = GPTConfig(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_embd=32)


def _logits(model, prompt: list[int], n: int) -> torch.Tensor:
    """Prefill prompt, then n decode steps of token 1: the last step's logits."""
    cache = model.new_cache(1)
    with torch.inference_mode():
        step.prefill(model, cache, 0, prompt)
        for i in range(n):
            out = step.decode(model, cache, [1 + i % 7], [len(prompt) + i])
    return out, cache


@pytest.mark.parametrize("config", [ROPE, GPT2], ids=["rope-gqa", "gpt2"])
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float16])
def test_a_narrow_cache_is_half_the_memory_and_close(config, kv):
    model = scaled_random_model(config, seed=5).eval()
    want, full = _logits(model, list(range(2, 20)), 6)
    configure_stage(model, kv_dtype=kv)
    got, narrow = _logits(model, list(range(2, 20)), 6)
    assert narrow.kv[0].dtype == kv and full.kv[0].dtype == torch.float32
    assert narrow.nbytes() * 2 == full.nbytes()
    assert got.dtype == torch.float32
    tol = 0.05 if kv == torch.bfloat16 else 0.01
    assert torch.allclose(got, want, atol=tol * want.abs().max().item()), (got - want).abs().max()
    assert not torch.equal(got, want)  # the cache really is narrower
    configure_stage(model)  # None again: the compute dtype
    assert torch.equal(_logits(model, list(range(2, 20)), 6)[0], want)


def test_the_plan_counts_the_narrow_cache():
    from mdi.ring.plan.capability import stage_memory

    wide = stage_memory(ROPE, 4, max_context=64)
    narrow = stage_memory(ROPE, 4, max_context=64, kv_dtype="bfloat16")
    cache = 2 * 4 * ROPE.kv_heads * 64 * ROPE.head_size * 4  # one block's float32 cache
    assert wide.block_bytes - narrow.block_bytes == cache // 2


def test_init_takes_the_kv_dtype_and_refuses_another_name():
    from pydantic import ValidationError

    from mdi.ring.node.control_messages import InitRequest

    body = {"run_id": 1, "role": "finisher", "start": 0, "stop": 2, "model": GPT2.to_dict(),
            "groups": [[0, 1]], "next": {"addr": "127.0.0.1", "port": 1}, "prev_addr": "127.0.0.1"}
    assert InitRequest.model_validate({**body, "kv_dtype": "bfloat16"}).kv_dtype == "bfloat16"
    assert InitRequest.model_validate(body).kv_dtype is None
    with pytest.raises(ValidationError, match="kv_dtype"):
        InitRequest.model_validate({**body, "kv_dtype": "int3"})


def _json(*args) -> dict:
    p = subprocess.run(mdi_cmd(*args, "--json"), capture_output=True, text=True, timeout=300,
                       env=child_env(), stdin=subprocess.DEVNULL, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_a_ring_with_a_narrower_cache_equals_one_device(kv_dtype):
    gen = ["--ckpt", "models/shakespeare-char", "--n-samples", "2", "--n-tokens", "40",
           "--temperature", "0", "--batch-invariant", "--threads", "1", "--prompt", "ROMEO:",
           "--kv-dtype", kv_dtype]
    one = _json("sample", *gen)
    ring = _json("run", *gen, "--nodes", "2", "--timeout", "30")
    assert ring["samples"] == one["samples"] and ring["n_nodes"] == 2
