"""Joining sequences prefilled together (issue 23, item 2): the prefill chunks of
several slots of one lane step run as one forward over a packed row
(model/packed.py) and cross the ring as one PREFILLS frame. They equal one
prefill per sequence: activations, every KV-cache entry and the next decode's
logits within 1e-5 (float32: other GEMM shapes, a masked SDPA), greedy tokens
exactly, for every model family; exactly (atol 0) with --batch-invariant, where
each row still runs on its own. A malformed frame is refused by name."""
from __future__ import annotations

import asyncio
import struct

import pytest
import torch

from mdi.engine import LocalEngine, MemoryLink, PipelineEngine, SeqParams
from mdi.engine.messages import Admit, Prefill, Prefills
from mdi.engine.slots import SlotError, SlotStage, lane_sizes
from mdi.generate import step
from mdi.model import GPTConfig
from mdi.model.packed import pack_rows
from mdi.ring.protocol.seq_frames import to_frame, to_message
from mdi.ring.protocol.wire import DTYPE_CODES, HEADER, Kind, Limits, WireError, decode_frame
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model, split_model

ATOL = 1e-5
FAMILIES = {
    "gpt2": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=2, n_embd=32),
    "llama": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=4, n_embd=32, n_kv_head=2,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       intermediate_size=48, tie_embeddings=False, rope_theta=500.0),
    "qwen2": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=4, n_embd=32, n_kv_head=1,
                       norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                       qkv_bias=True, intermediate_size=40, rope_theta=1e6),
    "mistral": GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=4, n_embd=32,
                         n_kv_head=2, head_dim=16, norm="rmsnorm", positions="rope",
                         activation="swiglu", bias=False, intermediate_size=48),
}
TOK = CharTokenizer([chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(22)])

# (positions some cache rows of 0..4 hold already, the rows that join: (row, start, length)).
# "mixed": rows 1 and 3 go on with a chunk, two new ones start, out of order, of lengths 1..13
# (one SDPA per sequence); "uniform": same starts and lengths (one SDPA for all), from
# position 0 in another row order, or chunks from position 6.
CASES = {
    "mixed": ({1: 6, 3: 9}, [(4, 0, 13), (1, 6, 5), (0, 0, 1), (3, 9, 8)]),
    "uniform": ({1: 6}, [(4, 0, 6), (2, 0, 6), (0, 0, 6)]),
    "uniform-chunks": ({1: 6, 3: 6}, [(3, 6, 5), (1, 6, 5)]),
}


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 48, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def filled_caches(stage, held, x_of):
    """Two caches with `held` written the same way; x_of(row, start, n): the stage's input."""
    caches = [stage.new_cache(5), stage.new_cache(5)]
    for cache in caches:
        for row, n in held.items():
            step.prefill(stage, cache, row, x_of(row, 0, n), 0)
    return caches


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_prefill_equals_one_prefill_per_sequence(family, case):
    """Every stage of a split model (ids in on the first, activations after): outputs,
    the whole cache (nothing written where no token went) and the next decode's
    logits of every row equal one step.prefill per sequence within ATOL."""
    model = scaled_random_model(FAMILIES[family], seed=11)
    stages = split_model(model, [1])
    tokens = {row: ids(48, row) for row in range(5)}
    held, join = CASES[case]
    rows, starts, lengths = zip(*join)
    with torch.inference_mode():
        x_first = lambda row, a, n: tokens[row][a:a + n]  # noqa: E731
        caches = [filled_caches(s, held, x_first) for s in stages[:1]]
        acts = {row: step.prefill(stages[0], stages[0].new_cache(5), row, tokens[row][:n], 0)
                for row, n in held.items()}   # what stage 0 sent for the held positions
        one = caches[0][0]
        outs = [step.prefill(stages[0], one, r, tokens[r][a:a + n], a) for r, a, n in join]
        packed_ids = torch.tensor([sum((tokens[r][a:a + n] for r, a, n in join), [])])
        got = step.prefill_rows(stages[0], caches[0][1], rows, starts, lengths, packed_ids)
        torch.testing.assert_close(got, torch.cat(outs, 1), rtol=0, atol=ATOL)
        for kw, kp in zip(one.kv, caches[0][1].kv):
            torch.testing.assert_close(kp, kw, rtol=0, atol=ATOL)
        # stage 1 takes stage 0's activations: the held rows' and the joining ones'
        c1 = filled_caches(stages[1], held, lambda row, a, n: acts[row])
        outs1 = [step.prefill(stages[1], c1[0], r, o, a) for (r, a, _), o in zip(join, outs)]
        got1 = step.prefill_rows(stages[1], c1[1], rows, starts, lengths, got)
        torch.testing.assert_close(got1, torch.cat(outs1, 1), rtol=0, atol=ATOL)
        for kw, kp in zip(c1[0].kv, c1[1].kv):
            torch.testing.assert_close(kp, kw, rtol=0, atol=ATOL)
        ends = {r: a + n for r, a, n in join}
        positions = [ends.get(r, 0) for r in range(5)]   # row 2 holds nothing: position 0
        h0 = [step.decode(stages[0], c, [0, 1, 2, 3, 4], positions) for c in caches[0]]
        want = step.decode(stages[1], c1[0], h0[0], positions)
        logits = step.decode(stages[1], c1[1], h0[1], positions)
    torch.testing.assert_close(logits, want, rtol=0, atol=ATOL)
    assert logits.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_pad_queries_and_rows_are_not_written():
    """The packed row writes exactly its tokens' (row, position) entries: a cache full of
    a marker keeps it everywhere else (pads and other rows untouched)."""
    model = scaled_random_model(FAMILIES["llama"], seed=2)
    cache = model.new_cache(4)
    for buf in cache.kv:
        buf.fill_(7.0)
    with torch.inference_mode():
        step.prefill_rows(model, cache, [3, 1], [2, 0], [1, 6], torch.tensor([ids(7, 5)]))
    written = torch.zeros(4, cache.allocated, dtype=torch.bool)
    written[3, 2] = True
    written[1, :6] = True
    for buf in cache.kv:
        untouched = (buf == 7.0).all(dim=4).all(dim=2).all(dim=0)   # (rows, positions)
        assert torch.equal(untouched, ~written)


def test_packed_prefill_into_a_narrower_cache():
    """--kv-dtype bfloat16: the packed row's keys and values are stored rounded and read
    back in float32, as a lone prefill's are."""
    model = scaled_random_model(FAMILIES["mistral"], seed=7)
    model.kv_dtype = torch.bfloat16
    one, many = model.new_cache(3), model.new_cache(3)
    assert one.kv[0].dtype == torch.bfloat16
    toks = [ids(9, 3), ids(4, 4)]
    with torch.inference_mode():
        want = torch.cat([step.prefill(model, one, r, t, 0) for r, t in zip([2, 0], toks)], 1)
        got = step.prefill_rows(model, many, [2, 0], [0, 0], [9, 4],
                                torch.tensor([toks[0] + toks[1]]))
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    for a, b in zip(one.kv, many.kv):
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=1e-2)


def test_batch_invariant_rows_equal_a_lone_prefill_exactly():
    model = scaled_random_model(FAMILIES["qwen2"], seed=4)
    model.batch_invariant = True
    one, many = model.new_cache(3), model.new_cache(3)
    toks = [ids(9, 1), ids(4, 2)]
    with torch.inference_mode():
        want = torch.cat([step.prefill(model, one, r, t, 0) for r, t in zip([2, 0], toks)], 1)
        got = step.prefill_rows(model, many, [2, 0], [0, 0], [9, 4], torch.tensor([toks[0] + toks[1]]))
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(one.kv, many.kv))


def test_pack_rows_refuses_what_it_cannot_place():
    with pytest.raises(ValueError, match="distinct cache rows"):
        pack_rows([1, 1], [0, 0], [2, 2])
    with pytest.raises(ValueError, match="lengths >= 1"):
        pack_rows([0, 1], [0, 0], [2, 0])
    with pytest.raises(ValueError, match="one start and one length per row"):
        pack_rows([0, 1], [0], [2, 2])
    p = pack_rows([2, 0], [3, 0], [2, 3])
    assert p.input_pos.tolist() == [[3, 4, 0, 1, 2]] and p.token_rows.tolist() == [2, 2, 0, 0, 0]
    assert p.offsets == (0, 2) and p.length == 5 and p.uniform is None
    assert p.masks[0].tolist() == [[[[True] * 4 + [False], [True] * 5]]] and p.masks[1] is None
    assert pack_rows([1, 0], [4, 4], [2, 2]).uniform.tolist() == [1, 0]   # one SDPA for both


# ---- through the engine -----------------------------------------------------------------
def greedy(n: int) -> SeqParams:
    return SeqParams(max_tokens=n, temperature=0.0)


PROMPTS = [ids(29, 1), ids(3, 2), [5] * 20, ids(25, 3), [1], ids(12, 4)]
LENGTHS = [12, 30, 9, 40, 25, 6]   # 40 > block_size: an overflow re-prefills


def run_engine(engine: PipelineEngine, late: int = 0) -> list[list[int]]:
    """Greedy tokens of PROMPTS; the last `late` ones submitted once the others decode."""
    async def main():
        await engine.start()
        try:
            seqs = [engine.submit(p, greedy(n)) for p, n in
                    zip(PROMPTS[:len(PROMPTS) - late], LENGTHS)]
            first: list[int] = []
            events = seqs[0].events()
            if late:
                first.append((await events.__anext__()).token)   # the first ones decode by now
                seqs += [engine.submit(p, greedy(n)) for p, n in
                         zip(PROMPTS[-late:], LENGTHS[-late:])]

            async def drain(it):
                return [ev.token async for ev in it if ev.token is not None]
            out = list(await asyncio.gather(drain(events), *(drain(s.events()) for s in seqs[1:])))
            out[0] = first + out[0]
            return out
        finally:
            await engine.close()
    return asyncio.run(main())


def fake_ring(model, batched: bool, chunk: int, hop=None) -> tuple[PipelineEngine, MemoryLink]:
    stages = split_model(model, [1, 2])
    sizes = lane_sizes(6, 2)
    link = MemoryLink([SlotStage(s, sizes) for s in stages[1:]], hop=hop)
    engine = PipelineEngine(stages[0], TOK.decode, 6, 2, link, prefill_chunk=chunk)
    engine.batch_prefill = batched
    return engine, link


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [0, 9])
def test_engine_tokens_equal_one_frame_each(family, chunk):
    """Six sequences in two lanes of a fake 3-stage ring, two of them joining while the
    others decode, prompts in chunks of 9 (a step then packs one prompt's last chunk
    with the next one's first) or whole: the greedy tokens of batched joins equal
    one frame per sequence and one device's; the batched run sent PREFILLS."""
    model = scaled_random_model(FAMILIES[family], seed=5)
    engine, link = fake_ring(model, True, chunk)
    got = run_engine(engine, late=2)
    each, each_link = fake_ring(model, False, chunk)
    want = run_engine(each, late=2)
    assert got == want and [len(t) for t in got] == LENGTHS
    assert any(isinstance(m, Prefills) for m in link.sent)
    assert not any(isinstance(m, Prefills) for m in each_link.sent)
    local = LocalEngine(model, TOK, max_seqs=6, prefill_chunk=chunk)
    assert run_engine(local, late=2) == want


def test_engine_batch_invariant_tokens_equal_exactly_through_the_wire():
    """--batch-invariant: each row of a PREFILLS still runs on its own, so tokens equal
    the one-frame-each run; every message crosses the wire format both ways."""
    def hop(m, stage):
        return to_message(decode_frame(to_frame(m, 3, stage).encode(), stage_limits(stage)), stage)

    model = scaled_random_model(FAMILIES["mistral"], seed=6)
    model.batch_invariant = True
    engine, link = fake_ring(model, True, 7, hop)
    got = run_engine(engine)
    each, _ = fake_ring(model, False, 7)
    assert got == run_engine(each)
    assert sum(isinstance(m, Prefills) for m in link.sent) >= 2


def test_long_chunks_go_in_packs_of_at_most_pack_tokens():
    """A step's chunks in slot order, packed up to pack_tokens tokens (a longer one
    alone, a pack of one as a Prefill); the cache ends as one prefill each."""
    from mdi.engine.slots import packs
    from mdi.generate.schedule import StepPlan

    plans = {s: StepPlan(ids(n, s), None, n) for s, n in [(0, 4), (1, 4), (2, 5), (3, 12), (4, 1)]}
    assert [list(p) for p in packs(plans, 10)] == [[0, 1], [2], [3], [4]]
    assert [list(p) for p in packs(plans, 0)] == [[0], [1], [2], [3], [4]]
    assert [list(p) for p in packs(plans, 512)] == [[0, 1, 2, 3, 4]]
    model = scaled_random_model(FAMILIES["llama"], seed=9)
    stage = SlotStage(split_model(model, [1])[0], [5])
    for slot in plans:
        stage.admit(Admit(slot, 0.0, None, None, 0))
    out = stage.first_step(0, [], plans, pack_tokens=10)
    assert [(type(m).__name__, getattr(m, "slots", None)) for m in out] == [
        ("Prefills", (0, 1)), ("Prefill", None), ("Prefill", None), ("Prefill", None)]
    assert [s.position for s in stage.slots] == [4, 4, 5, 12, 1]


def stage_limits(stage: SlotStage) -> Limits:
    c = stage.stage.config
    return Limits(3, c.n_embd, c.block_size, stage.n_slots, DTYPE_CODES[torch.float32],
                  max(stage.sizes), sequences=True)


# ---- the frame and the node's checks ------------------------------------------------------
C, SLOTS = 32, 6
LIM = Limits(3, C, 32, SLOTS, DTYPE_CODES[torch.float32], 3, sequences=True)


def prefills_bytes(rows: list[tuple[int, int, int]], tokens: int | None = None,
                   sample: int | None = None, count: int | None = None) -> bytes:
    n = sum(r[2] for r in rows) if tokens is None else tokens
    table = struct.pack(f"!{3 * len(rows)}I", *(v for r in rows for v in r))
    payload = table + bytes(n * C * 4)
    return HEADER.pack(b"MDI\x00", 1, Kind.PREFILLS, DTYPE_CODES[torch.float32], 3, 3,
                       rows[0][0] if sample is None else sample,
                       len(rows) if count is None else count, 1, n, C, len(payload)) + payload


def test_prefills_round_trip_as_one_frame():
    stage = SlotStage(split_model(scaled_random_model(FAMILIES["gpt2"]), [1])[1], [3, 3])
    x = torch.randn(1, 11, C)
    m = Prefills(1, (3, 5), (0, 4), (7, 4), x)
    frame = to_frame(m, 3, stage)
    data = frame.encode()
    assert frame.kind == Kind.PREFILLS and len(data) == 44 + 2 * 12 + x.numel() * 4
    back = to_message(decode_frame(data, LIM), stage)
    assert isinstance(back, Prefills) and (back.lane, back.slots, back.starts, back.lengths) == (
        1, (3, 5), (0, 4), (7, 4)) and torch.equal(back.x, x)


@pytest.mark.parametrize("data,needle", [
    (prefills_bytes([(0, 0, 3), (1, 0, 2)], tokens=6), "lengths \\[3, 2\\] .* must add up to the 6"),
    (prefills_bytes([(0, 0, 3), (1, 0, 0)], tokens=3), "each at least 1"),
    (prefills_bytes([(1, 0, 3), (0, 0, 2)]), "strictly ascending"),
    (prefills_bytes([(1, 0, 3), (2, 0, 2)], sample=0), "first slot 1 != header sample 0"),
    (prefills_bytes([(0, 30, 3), (1, 0, 2)]), "3 tokens at position 30 pass block_size 32"),
    (prefills_bytes([(4, 0, 3), (6, 0, 2)]), "slot 6 outside the run's 6"),
    (prefills_bytes([(0, 0, 3)]), "PREFILLS of 1 slots"),
    (prefills_bytes([(0, 0, 1), (1, 0, 1)], count=7), "PREFILLS of 7 slots"),
    (prefills_bytes([(0, 0, 1), (1, 0, 2)], count=3), "payload length"),
])
def test_a_malformed_prefills_frame_is_refused(data, needle):
    with pytest.raises(WireError, match=needle):
        decode_frame(data, LIM)


@pytest.mark.parametrize("rows,needle", [
    ([(0, 3, 2), (1, 0, 2)], "prefill chunk at position 3, slot 0 holds 0 positions"),
    ([(0, 0, 2), (2, 0, 2)], "free"),
    ([(1, 0, 2), (3, 0, 2)], "prefills for lane 0 name slot 3 of lane 1"),
])
def test_the_stage_refuses_prefills_that_do_not_fit_its_slots(rows, needle):
    """What the wire cannot know (positions against the slots' caches, lanes, free
    slots) the stage checks before it computes anything: SlotError, which a node
    reports as a bad frame."""
    model = scaled_random_model(FAMILIES["gpt2"])
    stage = SlotStage(split_model(model, [1])[1], [3, 3])
    for slot in (0, 1, 3):
        stage.admit(Admit(slot, 0.0, None, None, 0))
    frame = decode_frame(prefills_bytes(rows), LIM)
    with pytest.raises(SlotError, match=needle):
        stage.handle(to_message(frame, stage))
    assert [s.position for s in stage.slots] == [0] * 6   # nothing was written


def test_a_prefills_past_the_context_is_refused_by_the_stage():
    mid = split_model(scaled_random_model(FAMILIES["llama"]), [1, 2])[1]   # an intermediate
    mid.max_context = 16   # --max-context 16: the caches hold 16 positions
    stage = SlotStage(mid, [2])
    for slot in (0, 1):
        stage.admit(Admit(slot, 0.0, None, None, 0))
    with pytest.raises(SlotError, match="prefill of 5 tokens at position 12, the context is 16"):
        stage.handle(Prefills(0, (0, 1), (0, 12), (3, 5), torch.zeros(1, 8, C)))
    with pytest.raises(SlotError, match="lengths \\[3, 5\\] for 9 packed tokens"):
        stage.handle(Prefills(0, (0, 1), (0, 0), (3, 5), torch.zeros(1, 9, C)))
    with pytest.raises(SlotError, match="name a slot twice"):
        stage.handle(Prefills(0, (1, 1), (0, 0), (3, 5), torch.zeros(1, 8, C)))
    out = stage.handle(Prefills(0, (0, 1), (0, 0), (3, 5), torch.zeros(1, 8, C)))
    assert isinstance(out, Prefills) and out.x.shape == (1, 8, C)
    assert [s.position for s in stage.slots] == [3, 5]
    assert isinstance(stage.handle(Prefill(0, torch.zeros(1, 2, C), 3)), Prefill)


def test_a_node_refuses_a_bad_prefills_frame_by_name_and_takes_the_next_run(tmp_path):
    """An intermediate node in this process: a PREFILLS whose second slot starts at a
    position its cache does not hold drops the run with the reason in /status's
    last_run, nothing forwarded; the next run's good PREFILLS is computed and forwarded
    as one frame with the same row table."""
    from cluster_helpers import (build_tiny_ckpt, closed_by_peer, intermediate_and_fake_finisher,
                                 open_data)
    from mdi.ring.protocol.wire import Frame, admit_frame, read_frame

    ckpt = build_tiny_ckpt(tmp_path / "tiny")

    async def scenario() -> None:
        async with intermediate_and_fake_finisher(ckpt) as (rt, cfg, config, start_run):
            inter = cfg.intermediate[0]
            for run_id, second in ((41, (1, 3, 2)), (42, (1, 0, 3))):
                back_r, back_w = await start_run(run_id)
                reader, writer = await open_data(inter, run_id)
                x = torch.randn(1, 2 + second[2], config.n_embd)
                for slot in (0, 1):
                    writer.write(admit_frame(run_id, slot, 0.0, 0, 1.0, 1).encode())
                writer.write(Frame(Kind.PREFILLS, run_id, 0, 2, x, (0, 1),
                                   spans=((0, 2), second[1:])).encode())
                if second[1] == 0:
                    kinds = [(await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5))
                             for _ in range(3)]
                    f = kinds[-1]
                    assert [k.kind for k in kinds] == [Kind.ADMIT, Kind.ADMIT, Kind.PREFILLS]
                    assert (f.slots, f.spans, f.tensor.shape) == ((0, 1), ((0, 2), (0, 3)),
                                                                  (1, 5, config.n_embd))
                else:
                    assert await closed_by_peer(reader)   # the run is dropped, the node is not
                    assert rt.state == "idle"
                    assert rt.status()["last_run"]["reason"] == (
                        "bad frame from the previous node: prefill chunk at position 3, slot 1 "
                        "holds 0 positions")
                writer.close()
                back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.slow
def test_a_real_ring_joins_in_one_frame_with_the_tokens_of_one_frame_each(tmp_path):
    """A 3-node ring (an intermediate and a finisher process): six sequences joining at
    once, two per lane, prompts in chunks of 5. Batched joins give the greedy tokens of
    one frame each and of one device, in fewer frames from every node."""
    from cluster_helpers import build_tiny_ckpt
    from mdi.checkpoint import load_model
    from mdi.ring.cluster.local_cluster import LocalCluster
    from mdi.ring.starter.options import RunOptions
    from mdi.ring.starter.ring_engine import RingEngine

    ckpt = build_tiny_ckpt(tmp_path / "tiny")
    loaded = load_model(ckpt)
    tok = loaded.checkpoint.tokenizer()
    prompts = [tok.encode(p) for p in ["First Citizen", "Be", "All: Speak", "hear me", "w",
                                       "Citizen:\nproceed"]]
    lengths = [9, 14, 6, 11, 8, 5]

    def run(engine) -> tuple[list[list[int]], list[int]]:
        async def main():
            await engine.start()
            try:
                seqs = [engine.submit(p, greedy(n)) for p, n in zip(prompts, lengths)]
                return [[ev.token async for ev in s.events() if ev.token is not None]
                        for s in seqs]
            finally:
                await engine.close()
        tokens = asyncio.run(main())
        return tokens, [h.frames for h in getattr(engine, "hops", [])]

    with LocalCluster(3, threads=1, node_timeout=30.0) as cluster:
        out = {batched: run(RingEngine(cluster.nodes, cluster.token, str(ckpt), max_seqs=6,
                                       opts=RunOptions(timeout=30.0, prefill_chunk=5,
                                                       batch_prefill=batched)))
               for batched in (True, False)}
    local, _ = run(LocalEngine(loaded.model, tok, max_seqs=6, prefill_chunk=5))
    assert out[True][0] == out[False][0] == local
    assert [len(t) for t in local] == lengths
    frames, frames_each = out[True][1][1:], out[False][1][1:]   # the nodes' (not the starter's)
    assert len(frames) == 2 and all(a < b for a, b in zip(frames, frames_each)), (frames, frames_each)


def test_bench_runs_batched_and_one_frame_each_side_by_side(tmp_path):
    """mdi.bench: BenchConfig.join_prefills makes each configuration a variant per mode,
    its worker started with --join-prefill."""
    from mdi.bench.runner import Bench, BenchConfig, variants

    cfg = BenchConfig(model_size="tiny", nodes=[1, 2], prompt_tokens=[16], out=str(tmp_path),
                      prefill_chunks=[0], join_prefills=["batched", "each"])
    vs = variants(cfg)
    assert [v.name for v in vs] == [
        "single-chunk0-join-batched-p16", "single-chunk0-join-each-p16",
        "mdi-2-chunk0-join-batched-p16", "mdi-2-chunk0-join-each-p16"]
    cmd = Bench(cfg)._worker_cmd(vs[1], 0, None)
    assert cmd[cmd.index("--join-prefill") + 1] == "each"
    with pytest.raises(ValueError, match="batched and/or each"):
        BenchConfig(model_size="tiny", join_prefills=["packed"])
