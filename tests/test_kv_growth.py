"""A KV cache's memory follows the positions in use (issue 20.5), without stalls (23.3).

On the CPU each layer's buffer is a whole context of lazily committed pages
(`mapped_zeros`): it never grows, and the process holds only the pages written.
Elsewhere the buffers start at GROW_BY positions and double up to the context;
growth keeps every row's keys and values and row views follow it. Either way a
model's tokens are those over a cache allocated whole, on one stage or split."""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from mdi.engine import LocalEngine, MemoryLink, PipelineEngine
from mdi.engine.slots import SlotStage, lane_sizes
from mdi.generate import SamplingConfig, generate
from mdi.model import GPT, GPTConfig, KVCache
from mdi.model.cache import mapped_zeros

from conftest import scaled_random_model, split_model
from test_join_prefill import LENGTHS, TOK, run_engine

ROPE = GPTConfig(vocab_size=48, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                 intermediate_size=48, norm="rmsnorm", positions="rope", activation="swiglu",
                 bias=False, tie_embeddings=False)
GPT2 = GPTConfig(vocab_size=48, block_size=64, n_layer=3, n_head=2, n_embd=32)
FORMS = {"gpt2": GPT2, "llama": ROPE}


def cache_kind(monkeypatch, **kw) -> None:
    """Make GPT.new_cache build KVCache(..., **kw) (float32, on the CPU)."""
    def new_cache(self, batch, dtype=None, device=None):
        c = self.config
        return KVCache(self.n_blocks, batch, c.kv_heads, self.context, c.head_size, **kw)
    monkeypatch.setattr(GPT, "new_cache", new_cache)


WHOLE = {"grow_by": None, "paged": False}   # zeros of the whole context, made at once


# ---- paged: a whole context of pages the OS commits as they are written --------------
def test_a_paged_cache_is_whole_from_the_start_and_never_moves():
    cache = KVCache(2, 3, 2, 40, 4)
    assert cache.paged and cache.allocated == 40 and cache.rows(1, 2).paged
    assert cache.allocated_nbytes() == cache.nbytes() == 2 * 2 * 3 * 2 * 40 * 4 * 4
    assert all(b.abs().sum() == 0 for b in cache.kv)   # zeros: finite where attention masks
    ptrs = [b.data_ptr() for b in cache.kv]
    kv = torch.randn(2, 2, 2, 7, 4)
    view = cache.rows(1, 3)
    view.reserve(40)
    view.update(0, torch.arange(33, 40).expand(2, 7), kv, start=33)
    assert [b.data_ptr() for b in cache.kv] == ptrs and view.k[0].data_ptr() == cache.k[0][1:].data_ptr()
    assert torch.equal(cache.kv[0][:, 1:, :, 33:], kv) and cache.kv[0][:, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="position 40 is past the cache's 40 positions"):
        view.reserve(41)


def test_a_cache_off_the_cpu_or_unpaged_grows():
    assert not KVCache(1, 1, 1, 40, 4, paged=False).paged
    meta = KVCache(1, 2, 1, 600, 4, device="meta")
    assert not meta.paged and meta.allocated == 256 and meta.kv[0].is_meta
    assert mapped_zeros((0, 4), torch.float32) is None   # nothing to map: the caller allocates


def _resident() -> int:
    """The process's resident bytes, after a collection (an earlier test's tensors
    freed inside a measurement would lower it)."""
    import gc
    import mmap

    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_paged_cache_holds_only_the_pages_its_rows_wrote():
    """8 rows, 4 layers, a context of 4096 positions of 4 heads of 64 (268 MB of address
    space): one row's 2048 positions, written in chunks, hold about their own 17 MB,
    not the lane's, and reading every row (attention reads past short rows) adds none."""
    before = _resident()
    cache = KVCache(4, 8, 4, 4096, 64)
    assert cache.nbytes() == 4 * 2 * 8 * 4 * 4096 * 64 * 4
    first = cache.rows(0, 1)
    for start in range(0, 2048, 256):
        pos = torch.arange(start, start + 256)[None]
        for layer in range(4):
            first.update(layer, pos, torch.ones(2, 1, 4, 256, 64), start=start)
    row = 4 * 2 * 4 * 2048 * 64 * 4   # 16.8 MB
    # page by page (mincore; the process's RSS also moves with whatever else it frees)
    assert cache.unwritten_nbytes() == cache.nbytes() - row
    assert sum(float(b[:, :, :, :2048].sum()) for b in cache.kv) == 4 * 2 * 4 * 2048 * 64
    held = _resident() - before
    assert held < 1.5 * row + (4 << 20), (held, row)


# ---- growing buffers (another device, or paged=False) ---------------------------------
def test_growth_keeps_what_the_rows_hold_and_views_follow():
    cache = KVCache(2, 3, 2, 40, 4, grow_by=8, paged=False)
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


@pytest.mark.parametrize("kind", [{"grow_by": 1, "paged": False}, {"grow_by": 3, "paged": False},
                                  {}])   # {}: the default, paged
@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_cache_gives_the_same_tokens_as_one_allocated_whole(form, kind, monkeypatch):
    model = scaled_random_model(FORMS[form], seed=3).eval()
    prompts = [[1, 2, 3], [4] * 9, [5, 6]]
    sampling = SamplingConfig(temperature=0.0, top_k=None)
    cache_kind(monkeypatch, **WHOLE)
    whole = generate(model, prompts, 40, sampling)  # (past the context of 64: the window too)
    cache_kind(monkeypatch, **kind)
    cache = model.new_cache(1)
    assert cache.allocated == kind.get("grow_by", 64) and cache.paged == (kind == {})
    assert generate(model, prompts, 40, sampling) == whole


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_split_ring_over_paged_caches_gives_the_tokens_of_one_device_over_whole_ones(
        form, monkeypatch):
    """Six sequences in two lanes, prompts in chunks of 9, two joining while the others
    decode, one going past the context: one device over caches allocated whole, and two
    stages over the default (paged) caches, give the same greedy tokens."""
    model = scaled_random_model(replace(FORMS[form], block_size=32), seed=5)
    cache_kind(monkeypatch, **WHOLE)
    want = run_engine(LocalEngine(model, TOK, max_seqs=6, prefill_chunk=9), late=2)
    monkeypatch.undo()
    stages = split_model(model, [1])
    ring = [SlotStage(stages[1], lane_sizes(6, 2))]
    engine = PipelineEngine(stages[0], TOK.decode, 6, 2, MemoryLink(ring), prefill_chunk=9)
    assert run_engine(engine, late=2) == want and [len(t) for t in want] == LENGTHS
    assert all(c.paged for c in ring[0].caches)


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_growth_gives_each_old_layer_buffer_up_before_growing_the_next(kind):
    """The old buffer of a layer goes as soon as its rows are copied (views of it kept to
    the end of the growth held the whole old cache beside the new one); an int8 cache's
    too, with its scales."""
    import weakref

    from mdi.model.cache_int8 import Int8KVCache

    cls = Int8KVCache if kind == "int8" else KVCache
    dtype = torch.int8 if kind == "int8" else torch.float32
    cache = cls(3, 2, 2, 64, 4, dtype=dtype, grow_by=8, paged=False)
    rows = cache.rows(0, 2)
    freed = []
    for i, b in enumerate(cache.kv):
        weakref.finalize(b, lambda i=i: freed.append((i, sum(t.shape[3] > 8 for t in cache.kv))))
    del b
    rows.reserve(12)
    assert freed == [(0, 1), (1, 2), (2, 3)]  # (layer, layers grown when it went)
    assert rows.allocated == cache.allocated == 16 and rows.k[2].shape == (2, 2, 16, 4)


def test_the_lane_bench_sees_growths_only_without_pages():
    from mdi.bench.kv_steps import lane_steps

    stage = GPT(replace(ROPE, block_size=1024), 1, 2).eval()   # a stage after the first
    steps, growths = lane_steps(stage, paged=False, prompt=300, chunk=100, context=1024)
    assert len(steps) == 3 and [(a, b) for a, b, _ in growths] == [(256, 512)]
    assert lane_steps(stage, paged=True, prompt=300, chunk=100, context=1024)[1] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_released_row_gives_its_pages_back_and_reads_zeros():
    """A row's sequence ended (KVCache.release, called by SlotStage.retire): the
    process gives its pages back, the row reads as zeros, its neighbour keeps its own.
    Rows of 34 MB, so that the rest of the process (a few MB either way on a loaded
    machine) stays small beside them."""
    cache = KVCache(2, 3, 8, 4096, 64)
    assert cache.unwritten_nbytes() == cache.nbytes()   # nothing written: nothing held
    ones, pos = torch.ones(2, 1, 8, 4096, 64), torch.arange(4096)[None]  # made before `before`
    before = _resident()
    for row in (0, 1):
        for layer in range(2):
            cache.rows(row, row + 1).update(layer, pos, ones, start=0)
    row_bytes = 2 * 2 * 8 * 4096 * 64 * 4    # 33.6 MB a row
    assert _resident() - before > 1.8 * row_bytes
    # what a node's memory budget takes as not yet held (mincore, page by page)
    assert cache.unwritten_nbytes() == cache.nbytes() - 2 * row_bytes
    assert cache.release(0) == row_bytes      # whole pages: a row's bytes are page-aligned
    assert _resident() - before < 1.3 * row_bytes
    assert cache.unwritten_nbytes() == cache.nbytes() - row_bytes
    # pages only read (the OS's zero page mapped in) count as held: the figure errs that way
    assert all(float(b[:, 2].abs().sum()) == 0 for b in cache.kv)
    assert cache.unwritten_nbytes() == cache.nbytes() - 2 * row_bytes
    assert all(float(b[:, 0].abs().sum()) == 0 for b in cache.kv)
    assert all(float(b[:, 1].sum()) == 2 * 8 * 4096 * 64 for b in cache.kv)
    assert KVCache(1, 2, 1, 64, 4, paged=False).release(0) == 0   # growing buffers: held
    assert KVCache(1, 2, 1, 64, 4, paged=False).unwritten_nbytes() == 0  # held whole


def test_a_retired_slot_releases_its_row(monkeypatch):
    from mdi.engine.messages import Admit, Retire
    model = scaled_random_model(GPT2, seed=1).eval()
    stage = SlotStage(model, [2])
    released = []
    monkeypatch.setattr(KVCache, "release", lambda self, row: released.append(row) or 0)
    stage.admit(Admit(1, 0.0, None, None, 0))
    stage.retire(Retire(1))
    stage.admit(Admit(0, 0.0, None, None, 0))
    stage.admit(Admit(0, 0.0, None, None, 0))  # re-admitted: reset
    stage.clear()
    assert released == [1, 0, 0]
