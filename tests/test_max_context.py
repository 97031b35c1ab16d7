"""--max-context: the positions a run keeps (KV cache length and window), capped
at min(block_size, max_context), 2048 by default.

A cap at or above a run's length changes nothing; a cap N behaves exactly as a
model whose block_size is N; single-device equals the pipeline under a cap; a
node sizes its caches from /init's max_context."""
from __future__ import annotations

import asyncio

import pytest
import torch

from mdi.checkpoint import LoadOptions, load_model, save_checkpoint
from mdi.checkpoint.stream import shard_bytes
from mdi.engine import MemoryLink, PipelineEngine
from mdi.engine.batch import batch_params, run_sequences
from mdi.engine.slots import SlotStage, lane_sizes
from mdi.generate import SamplingConfig, generate
from mdi.model import GPT, GPTConfig
from mdi.model.cache import DEFAULT_MAX_CONTEXT, context_length
from mdi.model.quant import configure_stage
from mdi.ring.node.control_messages import InitRequest
from mdi.ring.node.runtime import NodeRuntime
from mdi.ring.cluster.nodes_config import NodeSpec
from mdi.ring.plan.partition import Shard
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model, split_model

LEARNED = GPTConfig(vocab_size=48, block_size=64, n_layer=3, n_head=2, n_embd=32)
ROPE = GPTConfig(vocab_size=48, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                 intermediate_size=48, norm="rmsnorm", positions="rope", activation="swiglu",
                 bias=False, tie_embeddings=False)
PROMPTS = [[1, 2, 3], [40], [7] * 10, [0, 47, 0, 47], [9, 8, 7]]
SAMPLED = SamplingConfig(temperature=0.9, top_k=20, seed=11)


def capped(model: GPT, n: int | None) -> GPT:
    model.max_context = n  # None: the default cap (configure_stage's None leaves it as it is)
    return model


def test_context_length_rules():
    assert context_length(8192) == DEFAULT_MAX_CONTEXT == 2048
    assert context_length(1024) == 1024 and context_length(64, 4096) == 64
    assert context_length(8192, 100) == 100
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_context must be a positive integer"):
            context_length(64, bad)
    with pytest.raises(ValueError, match="max_context must be a positive integer, got 0"):
        configure_stage(GPT(LEARNED), max_context=0)
    assert configure_stage(GPT(LEARNED), max_context=9).context == 9


def test_a_huge_block_size_gets_the_default_cache():
    config = GPTConfig(**{**ROPE.to_dict(), "block_size": 8192})
    with torch.device("meta"):
        model = GPT(config)
    cache = model.new_cache(3)
    assert cache.max_len == 2048 and cache.nbytes() == 2 * 3 * 2 * 2048 * 8 * 4 * 3  # 3 layers
    assert cache.k[0].shape == (3, 2, 256, 8)  # what is held until the positions grow
    assert capped(model, 8192).new_cache(1).max_len == 8192


@pytest.mark.parametrize("config", [LEARNED, ROPE], ids=["learned", "rope"])
def test_a_cap_at_or_above_the_run_length_changes_nothing(config):
    model = scaled_random_model(config, seed=4)
    n_new = 20  # longest prompt 10: at most 30 positions
    want = generate(model, PROMPTS, n_new, SAMPLED)
    for cap in (30, 64, 5000):
        assert generate(capped(model, cap), PROMPTS, n_new, SAMPLED) == want
        assert model.new_cache(1).max_len == min(cap, 64)


@pytest.mark.parametrize("config", [LEARNED, ROPE], ids=["learned", "rope"])
def test_a_cap_behaves_as_that_block_size(config):
    """Cap 12 on block_size 64 == the same weights with block_size 12 (learned positions
    cut to 12 rows): the same caches, the same window jumps, the same tokens."""
    model = scaled_random_model(config, seed=5)
    small = GPT(GPTConfig(**{**config.to_dict(), "block_size": 12}))
    sd = model.state_dict()
    small.load_state_dict({k: (v[:12] if k == "transformer.wpe.weight" else v)
                           for k, v in sd.items() if k in small.state_dict()})
    small.eval()
    want = generate(small, PROMPTS, 40, SAMPLED)  # 40 > 12: several overflows
    got = generate(capped(model, 12), PROMPTS, 40, SAMPLED)
    assert got == want
    assert got != generate(capped(model, None), PROMPTS, 40, SAMPLED)  # the cap did something


def _stages(model: GPT, cuts: list[int], cap: int) -> list[GPT]:
    return [capped(s, cap) for s in split_model(model, cuts)]


@pytest.mark.parametrize("config", [LEARNED, ROPE], ids=["learned", "rope"])
def test_a_small_cap_single_device_equals_the_pipeline(config):
    model = scaled_random_model(config, seed=6)
    model.batch_invariant = True  # groupings differ between the two
    want = generate(capped(model, 10), PROMPTS, 30, SAMPLED)
    stages = _stages(model, [1, 2], 10)
    for s in stages:
        s.batch_invariant = True
    sizes = lane_sizes(len(PROMPTS), 3)

    async def main():
        link = MemoryLink([SlotStage(s, sizes) for s in stages[1:]])
        tok = CharTokenizer([chr(65 + i) for i in range(48)])
        engine = PipelineEngine(stages[0], tok.decode, len(PROMPTS), 3, link)
        seqs, _, _ = await run_sequences(engine, PROMPTS, batch_params(len(PROMPTS), 30, SAMPLED))
        assert all(c.max_len == 10 for st in link.stages for c in st.caches)
        return [s.generated for s in seqs]

    assert asyncio.run(main()) == want


def test_load_model_takes_max_context(tmp_path):
    tok = CharTokenizer([chr(65 + i) for i in range(48)])
    ck = save_checkpoint(tmp_path / "ck", scaled_random_model(LEARNED, seed=1), tok)
    model = load_model(ck, LoadOptions(max_context=9)).model
    assert model.context == 9 and model.new_cache(2).max_len == 9


def test_node_sizes_its_caches_from_init(tmp_path):
    tok = CharTokenizer([chr(65 + i) for i in range(48)])
    ck = save_checkpoint(tmp_path / "ck", scaled_random_model(LEARNED, seed=1), tok)
    spec = NodeSpec(role="finisher", index=0, addr="127.0.0.1", port=3, port_in=1, port_out=2)

    async def main(cap):
        rt = NodeRuntime(spec, "t" * 32)
        req = InitRequest(run_id=5, role="finisher", start=1, stop=3, model=LEARNED.to_dict(),
                          groups=[[0, 2]], next={"addr": "127.0.0.1", "port": 9},
                          prev_addr="127.0.0.1", max_context=cap, sequences=True)
        await rt.init(req)
        await rt.load_weights(5, shard_bytes(ck, Shard(1, 3, 3)))
        return rt.run

    run = asyncio.run(main(7))  # a sequence run: a KV slot per sequence, lanes of caches
    assert run.limits.block_size == 7 and run.stage.context == 7
    assert [c.max_len for c in run.slots.caches] == [7]
    assert asyncio.run(main(None)).slots.caches[0].max_len == 64


def test_planner_memory_follows_the_cap():
    from mdi.ring.plan import limits
    from mdi.ring.plan.capability import stage_memory

    full, cut = stage_memory(LEARNED, 3), stage_memory(LEARNED, 3, max_context=16)
    kv = lambda n: limits.kv_cache_bytes(LEARNED, 1, 3, torch.float32, n)  # noqa: E731
    assert full.block_bytes - cut.block_bytes == kv(64) - kv(16) > 0


def test_int8_runs_cost_their_int8_weights():
    """/init's memory check and the planner count what an int8 node holds once loaded."""
    from mdi.model.quant import quantize_linears, weight_bytes
    from mdi.ring.plan import limits
    from mdi.ring.plan.capability import stage_memory

    for start, stop in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        stage = quantize_linears(GPT(ROPE, start, stop))
        assert limits.stage_weight_bytes(ROPE, start, stop, torch.float32, "int8") == \
            weight_bytes(stage)
    fp, q = stage_memory(ROPE, 2), stage_memory(ROPE, 2, quantize="int8")
    kv = limits.kv_cache_bytes(ROPE, 1, 2, torch.float32)
    assert q.block_bytes - kv == weight_bytes(quantize_linears(GPT(ROPE, 1, 2)))
    assert q.block_bytes < fp.block_bytes and q.head_bytes < fp.head_bytes


@pytest.mark.parametrize("mode", ["int4", "int4-g64"])
def test_int4_runs_cost_their_int4_weights(mode):
    """Packed codes (half a byte a weight) and bfloat16 scales and zeros per group."""
    from mdi.model.quant import quantize_linears, weight_bytes
    from mdi.ring.plan import limits

    config = GPTConfig.from_dict({**ROPE.to_dict(), "n_embd": 64, "intermediate_size": 128})
    for start, stop in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        stage = quantize_linears(GPT(config, start, stop), mode=mode)
        got = limits.stage_weight_bytes(config, start, stop, torch.float32, mode)
        assert got == weight_bytes(stage)
        assert got < limits.stage_weight_bytes(config, start, stop, torch.float32, "int8")
