"""The KV cache grows with the positions in use (issue 20.5): buffers start at GROW_BY
positions and double up to the context; growth keeps every row's keys and values, row
views follow it, and a model's outputs are the same as over a cache allocated whole."""
from __future__ import annotations

import pytest
import torch

from mdi.generate import SamplingConfig, generate
from mdi.model import GPT, GPTConfig, KVCache

from conftest import scaled_random_model

ROPE = GPTConfig(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                 intermediate_size=48, norm="rmsnorm", positions="rope", activation="swiglu",
                 bias=False, tie_embeddings=False)


def test_growth_keeps_what_the_rows_hold_and_views_follow():
    cache = KVCache(2, 3, 2, 40, 4, grow_by=8)
    assert cache.allocated == 8 and cache.nbytes() == 2 * 2 * 3 * 2 * 40 * 4 * 4
    kv = torch.randn(2, 3, 2, 5, 4)
    cache.update(1, torch.arange(5).expand(3, 5), kv, start=0)
    view = cache.rows(1, 3)
    view.reserve(9)  # one past the buffer: it doubles, in whole blocks of 8
    assert cache.allocated == 16 and view.allocated == 16
    assert torch.equal(cache.kv[1][:, :, :, :5], kv) and cache.kv[1][:, :, :, 5:].abs().sum() == 0
    assert view.k[1].data_ptr() == cache.k[1][1:].data_ptr()  # still a view of the whole
    view.reserve(33)
    assert cache.allocated == 40  # never past max_len
    assert torch.equal(view.v[1][:, :, :5], kv[1, 1:])
    assert cache.allocated_nbytes() == cache.nbytes()
    with pytest.raises(ValueError, match="position 40 is past the cache's 40 positions"):
        cache.reserve(41)


@pytest.mark.parametrize("grow_by", [1, 3, None])
def test_a_growing_cache_gives_the_same_tokens_as_one_allocated_whole(grow_by, monkeypatch):
    model = scaled_random_model(ROPE, seed=3).eval()
    prompts = [[1, 2, 3], [4] * 9, [5, 6]]
    sampling = SamplingConfig(temperature=0.0, top_k=None)
    whole = generate(model, prompts, 40, sampling)  # (past the context of 64: the window too)
    c = model.config

    def new_cache(self, batch, dtype=None, device=None):
        return KVCache(self.n_blocks, batch, c.kv_heads, self.context, c.head_size, grow_by=grow_by)

    monkeypatch.setattr(GPT, "new_cache", new_cache)
    assert model.new_cache(1).allocated == (64 if grow_by is None else grow_by)
    assert generate(model, prompts, 40, sampling) == whole


def test_growth_gives_each_old_layer_buffer_up_before_growing_the_next():
    """The old buffer of a layer goes as soon as its rows are copied (views of it kept to
    the end of the growth held the whole old cache beside the new one)."""
    import weakref

    cache = KVCache(3, 2, 2, 64, 4, grow_by=8)
    rows = cache.rows(0, 2)
    freed = []
    for i, b in enumerate(cache.kv):
        weakref.finalize(b, lambda i=i: freed.append((i, sum(t.shape[3] > 8 for t in cache.kv))))
    del b
    rows.reserve(12)
    assert freed == [(0, 1), (1, 2), (2, 3)]  # (layer, layers grown when it went)
    assert rows.allocated == cache.allocated == 16 and rows.k[2].shape == (2, 2, 16, 4)
