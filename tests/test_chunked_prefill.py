"""Chunked prefill: a prompt written into the cache a chunk at a time equals the
one-piece prefill (logits within float tolerance, greedy tokens exactly), for
every model family, at chunk sizes 1, block_size - 1 and past the context
window; through the engine on one device and through a fake ring; and a chunk
at the wrong position is refused."""
from __future__ import annotations

import asyncio

import pytest
import torch

from mdi.engine import LocalEngine, MemoryLink, PipelineEngine, SeqParams
from mdi.engine.messages import Admit, Decode, Prefill, Prefills
from mdi.engine.slots import SlotError, SlotStage, lane_sizes
from mdi.generate import step
from mdi.generate.schedule import SampleState, needs_prefill, plan_chunk
from mdi.model import GPTConfig
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model, split_model

VOCAB = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(22)]  # 48
TOK = CharTokenizer(VOCAB)
FAMILIES = {
    "nanogpt": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=2, n_embd=32),
    "llama": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=4, n_embd=32, n_kv_head=2,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       intermediate_size=48, tie_embeddings=False),
    "qwen2": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=4, n_embd=32, n_kv_head=2,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       qkv_bias=True, intermediate_size=48, rope_theta=1e6),
}
PROMPT = [(7 * i + 3) % 48 for i in range(29)]   # 29 tokens, block_size 32


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [1, 5, 31])
def test_chunked_cache_and_logits_equal_one_piece(family, chunk):
    """Chunks written at positions start.. attend to the chunks before them: the next
    decode's logits equal the one-piece prefill's (float32, atol 1e-5: the chunks'
    matmuls have other shapes, so sums may round differently)."""
    model = scaled_random_model(FAMILIES[family], seed=3)
    whole, parts = model.new_cache(1), model.new_cache(1)
    body, last = PROMPT[:-1], PROMPT[-1]
    with torch.inference_mode():
        step.prefill(model, whole, 0, body)
        for start in range(0, len(body), chunk):
            step.prefill(model, parts, 0, body[start:start + chunk], start)
        want = step.decode(model, whole, [last], [len(body)])
        got = step.decode(model, parts, [last], [len(body)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    n = len(body)
    for kw, kp in zip(whole.k, parts.k):
        torch.testing.assert_close(kp[:, :, :n], kw[:, :, :n], rtol=0, atol=1e-5)


def test_plan_chunk_splits_a_prompt_and_decodes_with_the_last_chunk():
    s = SampleState.from_prompt(list(range(10)))
    plans = []
    while True:
        plans.append(plan_chunk(s, context=16, budget=4))
        if plans[-1].decodes:
            break
    assert [(p.start, p.prefill) for p in plans] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]),
                                                     (8, [8])]
    assert plans[-1].token == 9 and plans[-1].position == 9
    assert not needs_prefill(s, 16)
    s.tokens.append(10)
    assert plan_chunk(s, 16, 4).prefill == []   # a decode step needs no budget


def test_plan_chunk_after_a_context_overflow_prefills_the_window_in_chunks():
    s = SampleState.from_prompt(list(range(16)))
    s.cached = 15
    s.tokens.append(16)                       # 17 tokens > context 16: the window jumps
    assert needs_prefill(s, 16)
    p = plan_chunk(s, 16, 3)
    assert s.window == 17 - 8 and (p.start, p.prefill, p.token) == (0, [9, 10, 11], None)
    p = plan_chunk(s, 16, 3)
    assert (p.start, p.prefill, p.token) == (3, [12, 13, 14], None)
    p = plan_chunk(s, 16, 3)
    assert (p.start, p.prefill, p.token, p.position) == (6, [15], 16, 7)


def greedy(n: int) -> SeqParams:
    return SeqParams(max_tokens=n, temperature=0.0)


async def run_all(engine: PipelineEngine, prompts, params) -> list[list[int]]:
    await engine.start()
    try:
        seqs = [engine.submit(p, q) for p, q in zip(prompts, params)]

        async def drain(seq):
            return [ev.token async for ev in seq.events() if ev.token is not None]
        return list(await asyncio.gather(*(drain(s) for s in seqs)))
    finally:
        await engine.close()


PROMPTS = [PROMPT, PROMPT[:3], [5] * 20, PROMPT[4:], [1]]
LENGTHS = [12, 30, 9, 40, 25]   # 40 > block_size: overflows re-prefill in chunks too


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [1, 7, 31, 64])
def test_engine_tokens_equal_unchunked(family, chunk):
    """Greedy tokens of 5 sequences sharing a lane (joining at once, some decoding
    while others still prefill) equal the unchunked run's, through overflows."""
    model = scaled_random_model(FAMILIES[family], seed=5)
    model.batch_invariant = True   # a step's row set changes with chunking: compare per row

    def run(prefill_chunk: int) -> list[list[int]]:
        engine = LocalEngine(model, TOK, max_seqs=5, prefill_chunk=prefill_chunk)
        return asyncio.run(run_all(engine, PROMPTS, [greedy(n) for n in LENGTHS]))

    want = run(0)
    assert [len(t) for t in want] == LENGTHS
    assert run(chunk) == want


def ring(model, max_seqs: int, prefill_chunk: int) -> tuple[PipelineEngine, MemoryLink]:
    stages = split_model(model, [1, 2])
    sizes = lane_sizes(max_seqs, 3)
    link = MemoryLink([SlotStage(s, sizes) for s in stages[1:]])
    return PipelineEngine(stages[0], TOK.decode, max_seqs, 3, link,
                          prefill_chunk=prefill_chunk), link


def test_ring_chunks_equal_single_device_and_carry_positions():
    """Through a fake 3-stage ring the chunks travel as Prefill messages at their
    start positions, at most `chunk` tokens a step, and the tokens equal one
    device's with the same chunks."""
    model = scaled_random_model(FAMILIES["llama"], seed=8)
    model.batch_invariant = True
    engine, link = ring(model, 5, prefill_chunk=6)
    got = asyncio.run(run_all(engine, PROMPTS, [greedy(n) for n in LENGTHS]))
    local = LocalEngine(model, TOK, max_seqs=5, prefill_chunk=6)
    assert got == asyncio.run(run_all(local, PROMPTS, [greedy(n) for n in LENGTHS]))
    chunks = chunks_sent(link)
    assert max(sum(n for _, _, n in step) for step in chunks) == 6   # tokens a step
    first = [(a, n) for step in chunks for slot, a, n in step if slot == 0][:5]
    assert first == [(0, 6), (6, 6), (12, 6), (18, 6), (24, 4)]   # 28 = 4 chunks of 6 + 4


def chunks_sent(link: MemoryLink) -> list[list[tuple[int, int, int]]]:
    """(slot, start, length) of each chunk the engine sent, by message: a Prefill's
    one, a Prefills' several (the chunks of one step, as one frame)."""
    return [[(m.slot, m.start, m.x.shape[1])] if isinstance(m, Prefill)
            else list(zip(m.slots, m.starts, m.lengths))
            for m in link.sent if isinstance(m, (Prefill, Prefills))]


def test_a_long_prompt_does_not_hold_the_lane_s_decoding_sequence():
    """One lane: a sequence decodes while a 28-token prompt joins in chunks of 4; it
    gets a token at every chunk's step instead of waiting for the whole prefill."""
    model = scaled_random_model(FAMILIES["nanogpt"], seed=2)
    engine = LocalEngine(model, TOK, max_seqs=2, prefill_chunk=4)
    order: list[str] = []

    async def main():
        await engine.start()
        try:
            a = engine.submit([1, 2], greedy(12))
            first = await a.events().__anext__()
            order.append("a")
            b = engine.submit(PROMPT, greedy(1))

            async def drain(seq, name):
                async for ev in seq.events():
                    if ev.token is not None:
                        order.append(name)
            await asyncio.gather(drain(a, "a"), drain(b, "b"))
            return first
        finally:
            await engine.close()

    asyncio.run(main())
    i = order.index("b")
    assert order.count("a") == 12 and i >= 7   # 28 tokens = 7 chunk steps, each with a's token


def test_a_chunk_at_the_wrong_position_is_refused(tiny_config, make_model):
    model = make_model(tiny_config, seed=1)
    stage = SlotStage(split_model(model, [1])[1], [2])
    stage.admit(Admit(0, 0.0, None, None, 0))
    x = torch.zeros(1, 4, tiny_config.n_embd)
    stage.prefill(Prefill(0, x, 0))
    with pytest.raises(SlotError, match="chunk at position 6, slot 0 holds 4"):
        stage.prefill(Prefill(0, x, 6))
    with pytest.raises(SlotError, match="at position 14"):
        stage.prefill(Prefill(0, x, 14))   # 14 + 4 > context 16
    stage.prefill(Prefill(0, x, 4))
    assert stage.slots[0].position == 8
    stage.decode(Decode(0, (0,), torch.zeros(1, 1, tiny_config.n_embd), 8))


async def decoding_while_a_long_prompt_joins(engine, long: list[int]) -> list[list[int]]:
    """Greedy tokens of a sequence that decodes 60 tokens and of `long`, submitted once
    the first one decodes (3 tokens)."""
    await engine.start()
    try:
        a = engine.submit([1, 2], greedy(60))
        events = a.events()
        await events.__anext__()                   # a decodes
        b = engine.submit(long, greedy(3))
        async for _ in events:
            pass
        async for _ in b.events():
            pass
        return [list(a.generated), list(b.generated)]
    finally:
        await engine.close()


def test_adaptive_prefill_cuts_chunks_to_a_decode_step_while_others_decode():
    """mdi serve's engines (prefill_share): while a sequence decodes, a joining
    100-token prompt goes in chunks cut to about a decode step's time (the first one,
    nothing measured yet, MIN_SHARED_CHUNK), not the configured 64; the tokens are
    those of the one-piece prefill."""
    from mdi.engine.step_times import MIN_SHARED_CHUNK

    config = GPTConfig(vocab_size=48, block_size=128, n_layer=3, n_head=2, n_embd=32)
    model = scaled_random_model(config, seed=4)
    model.batch_invariant = True
    long = [(5 * i + 1) % 48 for i in range(100)]

    def run(prefill_chunk: int, adaptive: bool) -> tuple[list[list[int]], list[int]]:
        engine, link = ring(model, 2, prefill_chunk)
        engine.prefill_share = 1.0 if adaptive else 0.0

        tokens = asyncio.run(decoding_while_a_long_prompt_joins(engine, long))
        sizes = [m.x.shape[1] for m in link.sent if isinstance(m, Prefill) and m.x.shape[1] > 2]
        return tokens, sizes

    want, whole = run(0, False)
    got, sizes = run(64, True)
    assert whole == [99]                                 # the last prompt token is decoded
    assert sizes[0] == MIN_SHARED_CHUNK and max(sizes) < 64 and sum(sizes) >= 83, sizes
    assert got == want
    _, plain = run(64, False)
    assert plain[0] == 64                                # without it: the configured chunk


def test_prefill_budget_follows_the_measured_times():
    from mdi.engine.step_times import MIN_SHARED_CHUNK

    model = scaled_random_model(FAMILIES["nanogpt"], seed=1)
    engine = LocalEngine(model, TOK, max_seqs=2, prefill_chunk=256)
    engine.prefill_share = 1.0
    lane = engine.lanes[0]
    long = engine.submit(PROMPT, greedy(5))
    engine.waiting.remove(long)
    lane.seqs[1] = long                                   # a prompt to write
    assert engine._prefill_budget(lane) == 256            # nothing decodes
    seq = engine.submit([1, 2], greedy(5))
    engine.waiting.remove(seq)
    lane.seqs[0] = seq                                    # a sequence past its prompt
    seq.state.cached = 1
    assert engine._prefill_budget(lane) == MIN_SHARED_CHUNK   # nothing measured yet
    for step_s, token_s, want in [(0.01, 0.001, MIN_SHARED_CHUNK), (0.1, 0.001, 100),
                                  (1.0, 0.001, 256)]:
        engine.times.decode, engine.times.prefill_token = step_s, token_s
        assert engine._prefill_budget(lane) == want
    engine.prefill_share, engine.times.decode = 2.0, 0.1
    assert engine._prefill_budget(lane) == 200            # 0.1 s a step, 2 steps' worth
    del lane.seqs[1]
    assert engine._prefill_budget(lane) == 256            # no prompt in this lane: not looked at
    lane.seqs[1] = long
    engine.prefill_share = 0.0
    assert engine._prefill_budget(lane) == 256
    engine.prefill_chunk = 0
    engine.prefill_share = 1.0
    assert engine._prefill_budget(lane) == 0              # --prefill-chunk 0: one piece


def test_a_prompt_alone_in_its_lane_sends_a_chunk_per_step_of_the_decoding_lane():
    """Two lanes on a fake 2-stage ring: one decodes, a 100-token prompt joins the
    other alone, in chunks of 4. A chunks-only step gets nothing back, but while the
    other lane is in flight the prompt's lane waits for the next arrival instead of
    sending its next chunk at once: one chunk per step of the decoding lane, not a
    queue of chunks ahead of it at every stage (the streams' 6-8-step gaps of mdi
    serve during a long prefill); the tokens are those of one device."""
    config = GPTConfig(vocab_size=48, block_size=128, n_layer=3, n_head=2, n_embd=32)
    model = scaled_random_model(config, seed=4)
    model.batch_invariant = True
    long = [(5 * i + 1) % 48 for i in range(100)]
    stages = split_model(model, [1])
    link = MemoryLink([SlotStage(stages[1], lane_sizes(2, 2))])
    engine = PipelineEngine(stages[0], TOK.decode, 2, 2, link, prefill_chunk=4)

    got = asyncio.run(decoding_while_a_long_prompt_joins(engine, long))  # b alone in lane 1
    kinds = [type(m).__name__ for m in link.sent   # b's chunks (slot 1) and a's decodes
             if isinstance(m, Decode) or isinstance(m, Prefill) and m.slot == 1]
    first, last = kinds.index("Prefill"), len(kinds) - kinds[::-1].index("Prefill")
    during = kinds[first:last]
    assert during.count("Prefill") == 25               # 100 tokens, 4 a chunk
    steady = during[during.index("Decode"):]           # once a's lane is in flight
    assert "Prefill, Prefill" not in ", ".join(steady), during
    one = LocalEngine(model, TOK, max_seqs=2, prefill_chunk=4)
    assert got == asyncio.run(decoding_while_a_long_prompt_joins(one, long))
