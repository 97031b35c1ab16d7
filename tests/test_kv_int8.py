"""--kv-dtype int8 (model/cache_int8.py): keys and values stored as int8 with a float32
scale per (position, head), read back in the compute dtype. Logits stay within a
stated tolerance of a float32 cache's, a growing cache gives the tokens of one
allocated whole, the plan and a node's memory check count the scales (a ring with
the option equals one device: tests/test_kv_dtype.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from mdi.generate import SamplingConfig, generate, step
from mdi.model import GPT
from mdi.model.cache_int8 import Int8KVCache, QuantizedKV, quantize_vectors
from mdi.model.quant import configure_stage

from conftest import scaled_random_model
from test_kv_dtype import GPT2, ROPE, _logits


def test_vectors_round_to_nearest_with_their_own_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * torch.rand(2, 3, 5, 1) * 10  # vectors of different ranges
    x[0, 0, 0] = 0  # a zero vector: zeros, not NaN
    q, s = quantize_vectors(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5, 1)
    assert torch.equal(q[0, 0, 0], torch.zeros(16, dtype=torch.int8)) and s[0, 0, 0] == 0
    assert (q.abs().amax(-1)[s[..., 0] > 0] == 127).all()
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()
    view = QuantizedKV(q, s)[1:, :, 2:4]
    assert torch.equal(view.dequantize(torch.float32), (q.float() * s)[1:, :, 2:4])
    assert view.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("config", [ROPE, GPT2], ids=["rope-gqa", "gpt2"])
def test_an_int8_cache_is_close_to_float32_and_a_quarter_of_it_with_scales(config):
    model = scaled_random_model(config, seed=5).eval()
    want, full = _logits(model, list(range(2, 20)), 6)
    configure_stage(model, kv_dtype=torch.int8)
    got, small = _logits(model, list(range(2, 20)), 6)
    assert isinstance(small, Int8KVCache) and small.kv[0].dtype == torch.int8
    hs = config.head_size
    assert small.nbytes() * 4 * hs == full.nbytes() * (hs + 4)  # 1 byte a number + 4 a vector
    assert got.dtype == torch.float32
    # measured 0.5% (rope-gqa) and 0.2% (gpt2) of the logits' largest magnitude
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.02, err
    assert not torch.equal(got, want)  # the cache really is int8
    configure_stage(model)
    assert torch.equal(_logits(model, list(range(2, 20)), 6)[0], want)


@pytest.mark.parametrize("grow_by, paged", [(1, False), (3, False), (None, True)])
def test_a_growing_int8_cache_gives_the_tokens_of_one_allocated_whole(grow_by, paged,
                                                                       monkeypatch):
    """Scales grow with the numbers (or are paged as they are: the CPU's default):
    greedy tokens over the window and past it (packed prefills of several prompts,
    batched decode) equal those of a whole int8 cache."""
    model = scaled_random_model(ROPE, seed=3).eval()
    configure_stage(model, kv_dtype=torch.int8)
    prompts = [[1, 2, 3], [4] * 9, [5, 6]]
    sampling = SamplingConfig(temperature=0.0, top_k=None)
    c = model.config

    def cache_of(grow, paged):
        def new_cache(self, batch, dtype=None, device=None):
            return Int8KVCache(self.n_blocks, batch, c.kv_heads, self.context, c.head_size,
                               grow_by=grow, paged=paged)
        return new_cache

    monkeypatch.setattr(GPT, "new_cache", cache_of(None, False))
    whole = generate(model, prompts, 40, sampling)
    monkeypatch.setattr(GPT, "new_cache", cache_of(grow_by, paged))
    cache = model.new_cache(1)
    assert cache.paged == paged and cache.allocated == (grow_by or c.block_size)
    assert generate(model, prompts, 40, sampling) == whole


def test_growth_keeps_the_scales_and_row_views_follow():
    cache = Int8KVCache(2, 3, 2, 40, 4, grow_by=8, paged=False)
    kv = torch.randn(2, 3, 2, 5, 4)
    cache.update(1, torch.arange(5).expand(3, 5), kv, start=0)
    before = cache.k[1][:, :, :5].dequantize(torch.float32)
    view = cache.rows(1, 3)
    view.reserve(9)
    assert cache.allocated == 16 and cache.sc[1].shape == (2, 3, 2, 16, 1)
    assert torch.equal(view.k[1][:, :, :5].dequantize(torch.float32), before[1:])
    assert cache.sc[1][:, :, :, 5:].abs().sum() == 0
    assert view.sc[1].data_ptr() == cache.sc[1][:, 1:].data_ptr()
    assert cache.allocated_nbytes() == 2 * (2 * 3 * 2 * 16 * (4 + 4))


def test_the_plan_and_the_node_count_the_int8_cache_with_its_scales():
    from mdi.model.dtypes import KV_DTYPES
    from mdi.ring.plan.capability import stage_memory
    from mdi.ring.plan.limits import kv_cache_bytes

    wide = stage_memory(ROPE, 4, max_context=64)
    small = stage_memory(ROPE, 4, max_context=64, kv_dtype="int8")
    vectors = 2 * 4 * ROPE.kv_heads * 64  # one block's keys and values, one per position
    assert wide.block_bytes - small.block_bytes == vectors * (4 * ROPE.head_size
                                                             - ROPE.head_size - 4)
    model = GPT(ROPE)
    model.max_context = 64
    assert kv_cache_bytes(ROPE, ROPE.n_layer, 4, KV_DTYPES["int8"], 64) == \
        model.new_cache(4, dtype=torch.int8).nbytes()


def test_init_takes_int8_and_compile_refuses_it():
    from mdi.ring.node.control_messages import InitRequest

    body = {"run_id": 1, "role": "finisher", "start": 0, "stop": 2, "model": GPT2.to_dict(),
            "groups": [[0, 1]], "next": {"addr": "127.0.0.1", "port": 1}, "prev_addr": "127.0.0.1"}
    assert InitRequest.model_validate({**body, "kv_dtype": "int8"}).kv_dtype == "int8"
    model = scaled_random_model(GPT2, seed=1).eval()
    with pytest.raises(ValueError, match="--compile with --kv-dtype int8"):
        configure_stage(model, kv_dtype=torch.int8, compile=True)


def test_decode_over_an_int8_cache_equals_prefill_of_the_same_tokens():
    """Row independence: a row's stored numbers depend on its own vectors only, so two
    rows decoded together give what each gives alone."""
    model = scaled_random_model(ROPE, seed=2).eval()
    configure_stage(model, kv_dtype=torch.int8)
    with torch.inference_mode():
        both = model.new_cache(2)
        for r, p in enumerate(([1, 2, 3, 4], [7, 8, 9, 10])):
            step.prefill(model, both, r, p)
        together = step.decode(model, both, [5, 11], [4, 4])
        alone = model.new_cache(1)
        step.prefill(model, alone, 0, [7, 8, 9, 10])
        assert torch.allclose(step.decode(model, alone, [11], [4]), together[1:], atol=1e-5)


def test_eval_scores_through_the_cache_it_is_given(capsys, monkeypatch):
    """`mdi eval --kv-dtype`: a float32 cache scores as no cache does (up to float
    rounding); an int8 one within 1% of its perplexity (measured +0.02%)."""
    import json

    from mdi.cli.main import main
    from mdi.model import cache as cache_mod

    from conftest import REPO, SHAKESPEARE

    def ppl(*extra):
        assert main(["eval", "--ckpt", str(REPO / "models" / "shakespeare-char"), "--data",
                     str(SHAKESPEARE), "--max-tokens", "400", "--window", "64", "--stride", "32",
                     "--dtype", "float32", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["ppl"]

    plain, f32, i8 = ppl(), ppl("--kv-dtype", "float32"), ppl("--kv-dtype", "int8")
    assert abs(f32 / plain - 1) < 1e-5, (f32, plain)
    assert abs(i8 / plain - 1) < 0.01 and i8 != f32, (i8, plain)
    # review: a window past the run's default context (SmolLM2: 8192 > 2048) went through
    # a cache of that context and failed on a position the user never capped
    monkeypatch.setattr(cache_mod, "DEFAULT_MAX_CONTEXT", 32)
    assert ppl("--kv-dtype", "int8") == i8


@pytest.mark.parametrize("lengths", [(4, 4), (3, 6)], ids=["uniform", "ragged"])
def test_a_packed_prefill_into_an_int8_cache_equals_lone_prefills(lengths):
    """Several prompts prefilled as one packed frame (rows out of order: the gathered
    reads) store and read what each prompt's own prefill does."""
    model = scaled_random_model(ROPE, seed=4).eval()
    configure_stage(model, kv_dtype=torch.int8)
    prompts = [list(range(1, 1 + lengths[0])), list(range(10, 10 + lengths[1]))]
    with torch.inference_mode():
        packed = model.new_cache(2)
        x = torch.tensor([prompts[0] + prompts[1]])
        out = step.prefill_rows(model, packed, [1, 0], [0, 0], lengths, x)
        alone = model.new_cache(2)
        ref = torch.cat([step.prefill(model, alone, r, p) for r, p in zip([1, 0], prompts)], dim=1)
        assert torch.allclose(out, ref, atol=1e-4)
        for r in (0, 1):
            n = lengths[1 - r]
            assert torch.allclose(packed.k[0][r:r + 1, :, :n].dequantize(torch.float32),
                                  alone.k[0][r:r + 1, :, :n].dequantize(torch.float32), atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise through Linux's libc")
def test_a_released_int8_row_gives_back_values_and_scales():
    cache = Int8KVCache(2, 2, 2, 4096, 64)
    assert cache.paged and all(s.shape == (2, 2, 2, 4096, 1) for s in cache.sc)
    kv = torch.randn(2, 1, 2, 4096, 64)
    for layer in range(2):
        cache.rows(0, 1).update(layer, torch.arange(4096)[None], kv, start=0)
    written = cache.nbytes() - cache.unwritten_nbytes()   # values and scales both counted
    assert 0.95 * cache.nbytes() / 2 <= written <= cache.nbytes() / 2 + 4 * 4096
    freed = cache.release(0)
    # values 2 layers x 2 x 2 heads x 4096 x 64 bytes, scales a 16th of that
    assert freed >= 0.95 * (2 * 2 * 2 * 4096 * 64) * (1 + 1 / 16)
    assert cache.unwritten_nbytes() >= cache.nbytes() - 4 * 4096  # at most the edge pages
    assert all(float(b[:, 0].abs().sum()) == 0 for b in cache.kv + cache.sc)

