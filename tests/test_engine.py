"""The engine's scheduling, through the single-device backend and the in-memory
Link (a fake ring of in-process stages): admission, retirement at a stop id /
token budget / stop string / cancel, slot reuse, lanes with fewer and more
sequences than stages, a full queue, a failing node. Outputs are compared
exactly with single-device generation of each prompt alone."""
from __future__ import annotations

import asyncio

import pytest
import torch

from mdi.engine import EngineBusy, EngineFailure, LocalEngine, MemoryLink, PipelineEngine, SeqParams
from mdi.engine.batch import batch_params, generate_local, run_sequences
from mdi.engine.messages import Admit, Decode, Retire
from mdi.engine.slots import SlotError, SlotStage, lane_sizes
from mdi.generate import SamplingConfig, generate
from mdi.generate.sampling import sample_seed
from mdi.generate.schedule import make_groups
from mdi.model import GPT
from mdi.tokenizer import CharTokenizer

from conftest import split_model

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)
VOCAB = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(22)]  # 48
TOK = CharTokenizer(VOCAB)
PROMPTS = [[1, 2, 3], [40], [7] * 10, [0, 47, 0, 47], [9, 8, 7], [5], [11, 12], [30, 31, 32, 33]]


@pytest.fixture
def model(tiny_config, make_model) -> GPT:
    return make_model(tiny_config, seed=21)


stages_of = split_model


def ring_engine(model: GPT, max_seqs: int, n_stages: int = 3, delay: float = 0.0, **kw
                ) -> tuple[PipelineEngine, MemoryLink]:
    cuts = [1, 2][: n_stages - 1]
    stages = stages_of(model, cuts)
    sizes = lane_sizes(max_seqs, n_stages)
    link = MemoryLink([SlotStage(s, sizes) for s in stages[1:]], delay=delay,
                      fail_at=kw.pop("fail_at", None), hop=kw.pop("hop", None))
    return PipelineEngine(stages[0], TOK.decode, max_seqs, n_stages, link, **kw), link


def greedy(n: int, **kw) -> SeqParams:
    return SeqParams(max_tokens=n, temperature=0.0, **kw)


def alone(model: GPT, prompt: list[int], n: int, sampling: SamplingConfig = GREEDY) -> list[int]:
    return generate(model, [prompt], n, sampling)[0]


async def collect(seq) -> tuple[list[int], str, str]:
    toks, text, reason = [], "", None
    async for ev in seq.events():
        if ev.token is not None:
            toks.append(ev.token)
        text += ev.text
        reason = ev.finish_reason
    return toks, text, reason


async def run_all(engine, prompts, params) -> list[tuple[list[int], str, str]]:
    await engine.start()
    try:
        seqs = [engine.submit(p, q) for p, q in zip(prompts, params)]
        return await asyncio.gather(*(collect(s) for s in seqs))
    finally:
        await engine.close()


# -- single device ---------------------------------------------------------------------------

def test_local_fixed_batch_equals_generate(model):
    """The engine reproduces today's fixed-batch generation token for token, sampled,
    through context overflows (40 tokens, block_size 16)."""
    sampling = SamplingConfig(temperature=0.8, top_k=20, seed=99)
    want = generate(model, PROMPTS, 40, sampling)
    for lanes in (1, 3):
        got = generate_local(lambda: LocalEngine(model, TOK, max_seqs=len(PROMPTS), lanes=lanes),
                             PROMPTS, 40, sampling)
        assert got.tokens == want
        assert len(got.step_times) == 40 and got.step_times == sorted(got.step_times)


def test_a_fixed_batch_on_one_device_computes_on_the_callers_thread(model, monkeypatch):
    """generate_local (mdi sample) runs every prefill and decode on the thread that called
    it, so one thread runs the process's OpenMP work (scheduler.compute_inline)."""
    import threading

    from mdi.engine import slots

    seen = set()
    for name in ("prefill", "decode"):
        def spy(*a, _f=getattr(slots.step, name), **k):
            seen.add(threading.get_ident())
            return _f(*a, **k)
        monkeypatch.setattr(slots.step, name, spy)
    want = generate(model, PROMPTS[:3], 6, GREEDY)
    got = generate_local(lambda: LocalEngine(model, TOK, max_seqs=3), PROMPTS[:3], 6, GREEDY)
    assert got.tokens == want and seen == {threading.get_ident()}


def test_relane_before_admission_keeps_the_tokens(model):
    """Lanes regrouped before any sequence holds a slot (RingEngine does it once the
    nodes say how many stages compute at once): same tokens, the new lane sizes;
    refused once a lane holds a sequence."""
    sampling = SamplingConfig(temperature=0.8, top_k=20, seed=99)
    want = generate(model, PROMPTS, 12, sampling)

    def make():
        engine = LocalEngine(model, TOK, max_seqs=len(PROMPTS), lanes=3)
        engine._relane(2)
        assert engine.sizes == [len(g) for g in make_groups(len(PROMPTS), 2)]
        assert [len(lane.slots) for lane in engine.lanes] == engine.sizes
        return engine

    assert generate_local(make, PROMPTS, 12, sampling).tokens == want

    async def busy():
        engine = LocalEngine(model, TOK, max_seqs=2, lanes=2)
        await engine.start()
        try:
            seq = engine.submit(PROMPTS[0], greedy(50))
            async for _ in seq.events():
                break  # admitted: its lane holds it
            with pytest.raises(RuntimeError, match="no sequence holds a slot"):
                engine._relane(1)
        finally:
            await engine.close()

    asyncio.run(busy())


def test_greedy_alone_equals_among_15_others(model):
    """A sequence's greedy tokens do not depend on its step-mates, on when it was
    admitted, or on which slot it took."""
    prompts = [PROMPTS[i % len(PROMPTS)] + [i % 48] for i in range(16)]
    lengths = [5 + (7 * i) % 30 for i in range(16)]

    async def main():
        engine = LocalEngine(model, TOK, max_seqs=16)
        await engine.start()
        try:
            seqs = []
            for p, n in zip(prompts, lengths):  # staggered: joins at different steps
                seqs.append(engine.submit(p, greedy(n)))
                await asyncio.sleep(0.005)
            return await asyncio.gather(*(collect(s) for s in seqs))
        finally:
            await engine.close()

    results = asyncio.run(main())
    for p, n, (toks, text, reason) in zip(prompts, lengths, results):
        assert toks == alone(model, p, n)
        assert text == TOK.decode(toks) and reason == "length"


def test_sampled_sequence_equals_alone_with_its_seed(model):
    """Each sequence draws from its own stream: temperature, top_k, top_p and seed per sequence."""
    params = [SeqParams(max_tokens=20, temperature=t, top_k=k, top_p=p, seed=sample_seed(s, 0))
              for t, k, p, s in [(0.9, None, None, 1), (1.2, 5, None, 2), (0.7, None, 0.8, 3),
                                 (0.0, None, None, 4)]]
    results = asyncio.run(run_all(LocalEngine(model, TOK, max_seqs=4), PROMPTS[:4], params))
    for prompt, q, (toks, _, _) in zip(PROMPTS, params, results):
        cfg = SamplingConfig(q.temperature, q.top_k, [1, 2, 3, 4][params.index(q)], q.top_p)
        assert toks == alone(model, prompt, 20, cfg)


# -- retirement --------------------------------------------------------------------------------

def test_stop_id_ends_the_sequence_without_emitting_it(model):
    ref = alone(model, PROMPTS[0], 30)
    stop = ref[6]
    cut = ref.index(stop)
    toks, text, reason = asyncio.run(run_all(LocalEngine(model, TOK, 2), [PROMPTS[0]],
                                             [greedy(30, stop_ids=(stop,))]))[0]
    assert toks == ref[:cut] and text == TOK.decode(ref[:cut]) and reason == "stop"


def test_stop_string_truncates_the_text(model):
    ref = TOK.decode(alone(model, PROMPTS[2], 30))
    stop = ref[8:11]
    cut = ref.index(stop)
    seen = []

    async def main():
        engine = LocalEngine(model, TOK, 2)
        await engine.start()
        try:
            seq = engine.submit(PROMPTS[2], greedy(30, stop=("zzzz", stop)))
            async for ev in seq.events():
                seen.append(ev)
        finally:
            await engine.close()

    asyncio.run(main())
    assert "".join(e.text for e in seen) == ref[:cut]
    assert seen[-1].finish_reason == "stop" and seen[-1].token is None
    assert len([e for e in seen if e.token is not None]) == cut + len(stop)  # char tokens


def test_cancel_waiting_and_running_frees_the_slot(model):
    """A cancelled sequence ends with 'cancelled'; its slot is reused by the next one,
    whose tokens equal a run alone."""
    async def main():
        engine = LocalEngine(model, TOK, max_seqs=1)
        await engine.start()
        try:
            a = engine.submit(PROMPTS[0], greedy(1000))
            b = engine.submit(PROMPTS[1], greedy(10))   # waits for a's slot
            c = engine.submit(PROMPTS[2], greedy(12))
            assert engine.queued == 3 and engine.running == 0  # admitted at the next boundary
            b.cancel()                                    # cancelled while waiting
            got_a = []
            async for ev in a.events():
                if ev.token is not None:
                    got_a.append(ev.token)
                if len(got_a) == 5:
                    a.cancel()                            # cancelled while running
                last = ev
            assert last.finish_reason == "cancelled" and 5 <= len(got_a) <= 6
            assert (await collect(b))[2] == "cancelled"
            rc = await collect(c)
            assert engine.running == 0 and engine.queued == 0
            return got_a, rc
        finally:
            await engine.close()

    got_a, (toks_c, _, reason_c) = asyncio.run(main())
    assert got_a == alone(model, PROMPTS[0], len(got_a))
    assert toks_c == alone(model, PROMPTS[2], 12) and reason_c == "length"


def test_full_queue_raises_engine_busy(model):
    async def main():
        engine = LocalEngine(model, TOK, max_seqs=1, max_queue=2, retry_after=3.0)
        seqs = [engine.submit(PROMPTS[0], greedy(3)) for _ in range(3)]  # 1 slot + 2 waiting
        with pytest.raises(EngineBusy, match="queue holds 2") as e:
            engine.submit(PROMPTS[0], greedy(3))
        assert e.value.retry_after == 3.0
        await engine.start()
        try:
            return await asyncio.gather(*(collect(s) for s in seqs))
        finally:
            await engine.close()

    assert [r[2] for r in asyncio.run(main())] == ["length"] * 3

    async def no_queue():  # max_queue 0: as many as there are free slots, no more
        engine = LocalEngine(model, TOK, max_seqs=2, max_queue=0)
        engine.submit(PROMPTS[0], greedy(3))
        engine.submit(PROMPTS[1], greedy(3))
        with pytest.raises(EngineBusy):
            engine.submit(PROMPTS[2], greedy(3))
        await engine.close()

    asyncio.run(no_queue())


def test_bad_prompt_and_seed_are_refused(model):
    engine = LocalEngine(model, TOK, 1)
    with pytest.raises(ValueError, match="prompt: token id 48 outside"):
        engine.submit([1, 48], greedy(2))
    with pytest.raises(ValueError, match="prompt: a prompt must have"):
        engine.submit([], greedy(2))
    with pytest.raises(ValueError, match="seed must be in"):
        engine.submit([1], greedy(2, seed=-1))


# -- the pipeline through the in-memory link ----------------------------------------------------

@pytest.mark.parametrize("n_seqs,max_seqs", [(1, 8), (2, 2), (3, 3), (8, 8), (8, 3), (5, 2)])
def test_ring_lanes_equal_single_device(model, n_seqs, max_seqs):
    """3 stages; lanes = min(max_seqs, 3): fewer and more sequences than stages, and more
    sequences than slots (they wait, then reuse freed slots). Every sequence's tokens
    equal the prompt run alone on the whole model; several lanes are in flight at once."""
    prompts = PROMPTS[:n_seqs]
    lengths = [4 + 9 * i % 23 for i in range(n_seqs)]
    engine, link = ring_engine(model, max_seqs, delay=0.001)
    results = asyncio.run(run_all(engine, prompts, [greedy(n) for n in lengths]))
    for p, n, (toks, text, reason) in zip(prompts, lengths, results):
        assert toks == alone(model, p, n) and reason == "length"
    assert engine.max_in_flight == min(n_seqs, max_seqs, 3)
    # every admitted sequence was retired on every stage: no slot left in use
    assert all(not s.active for st in link.stages for s in st.slots)
    assert all(not s.active for s in engine.first.slots)
    retired = [m.slot for m in link.sent if isinstance(m, Retire)]
    assert len(retired) == n_seqs


def test_ring_fixed_batch_sampled_equals_single_device(model):
    sampling = SamplingConfig(temperature=1.0, top_k=10, seed=5)
    want = generate(model, PROMPTS, 25, sampling)

    async def main():
        engine, _ = ring_engine(model, len(PROMPTS), n_stages=2)
        seqs, _, _ = await run_sequences(engine, PROMPTS, batch_params(len(PROMPTS), 25, sampling))
        return [s.generated for s in seqs]

    assert asyncio.run(main()) == want


def test_ring_through_the_wire_format(model):
    """Every message crosses each hop as data-plane bytes (encoded, checked, decoded):
    whole lanes as DECODE/TOKENS, partial ones as SEQ_DECODE/SEQ_TOKENS."""
    from mdi.ring.protocol.seq_frames import to_frame, to_message
    from mdi.ring.protocol.wire import DTYPE_CODES, Kind, Limits, decode_frame

    sizes = lane_sizes(5, 2)
    lim = Limits(3, model.config.n_embd, model.config.block_size, 5, DTYPE_CODES[torch.float32],
                 max(sizes), sequences=True)
    kinds = []

    def hop(m, stage):
        f = decode_frame(to_frame(m, 3, stage).encode(), lim)
        kinds.append(f.kind)
        return to_message(f, stage)

    engine, _ = ring_engine(model, 5, n_stages=2, hop=hop)
    lengths = [6, 20, 3, 11, 14]
    results = asyncio.run(run_all(engine, PROMPTS[:5], [greedy(n) for n in lengths]))
    for p, n, (toks, _, _) in zip(PROMPTS, lengths, results):
        assert toks == alone(model, p, n)
    assert {Kind.ADMIT, Kind.RETIRE, Kind.PREFILL, Kind.DECODE, Kind.TOKENS, Kind.SEQ_DECODE,
            Kind.SEQ_TOKENS} <= set(kinds)


def test_ring_decode_frames_carry_only_active_slots(model):
    engine, link = ring_engine(model, 4, n_stages=2)   # lanes of 2 slots
    lengths = [3, 9, 5, 9]
    asyncio.run(run_all(engine, PROMPTS[:4], [greedy(n) for n in lengths]))
    decodes = [m for m in link.sent if isinstance(m, Decode)]
    admits = [m for m in link.sent if isinstance(m, Admit)]
    assert sorted(m.slot for m in admits) == [0, 1, 2, 3]
    assert max(len(d.slots) for d in decodes) == 2
    assert any(len(d.slots) == 1 for d in decodes)  # after the short ones retired
    assert sum(len(d.slots) for d in decodes) == sum(lengths)


def test_ring_failure_reaches_every_sequence(model):
    engine, _ = ring_engine(model, 4, fail_at=(1, 12))

    async def main():
        await engine.start()
        try:
            seqs = [engine.submit(p, greedy(30)) for p in PROMPTS[:4]]
            for s in seqs:
                with pytest.raises(EngineFailure, match="node 2 stopped answering") as e:
                    await collect(s)
                assert e.value.node == "node 2"
            with pytest.raises(EngineFailure):
                engine.submit(PROMPTS[0], greedy(2))
        finally:
            await engine.close()

    asyncio.run(main())


# -- slots ---------------------------------------------------------------------------------------

def test_slot_rules(model):
    st = SlotStage(stages_of(model, [1])[1], [2, 2])
    x = torch.zeros(1, 1, model.config.n_embd)
    with pytest.raises(SlotError, match="slot 0 is free"):
        st.decode(Decode(0, (0,), x))
    st.admit(Admit(0, 0.0, None, None, 1))
    st.admit(Admit(2, 0.0, None, None, 1))
    with pytest.raises(SlotError, match="another lane"):
        st.decode(Decode(0, (0, 2), torch.zeros(2, 1, model.config.n_embd)))
    with pytest.raises(SlotError, match="outside"):
        st.retire(Retire(4))
    # the last stage samples with the sequence's own parameters and stream seed
    assert st.slots[2].sampling == SamplingConfig(temperature=0.0, top_k=None, seed=1)
    st.admit(Admit(1, 0.5, 7, 0.9, 2**40))
    assert st.slots[1].sampling == SamplingConfig(temperature=0.5, top_k=7, seed=2**40, top_p=0.9)
    st.retire(Retire(0))
    with pytest.raises(SlotError, match="slot 0 is free"):
        st.retire(Retire(0))


# -- parameters ----------------------------------------------------------------------------------

def test_seq_params_hold_one_checked_sampling_object():
    """The sampling fields of a request are one SamplingConfig: its defaults, its check."""
    kw = SeqParams(max_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=11, stop=("x",))
    assert kw.sampling == SamplingConfig(temperature=0.7, top_k=3, seed=11, top_p=0.9)
    assert (kw.temperature, kw.top_k, kw.top_p, kw.seed, kw.stop) == (0.7, 3, 0.9, 11, ("x",))
    assert SeqParams(5, sampling=kw.sampling, stop=("x",)) == kw
    assert SeqParams(max_tokens=5).sampling == SamplingConfig()
    assert SamplingConfig() == SamplingConfig(temperature=1.0, top_k=None, seed=None, top_p=None)
    with pytest.raises(TypeError, match="not both"):
        SeqParams(5, sampling=kw.sampling, temperature=0.1)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer, got 0"):
        SeqParams(0)


def test_a_batch_draws_sample_i_from_its_own_stream():
    run = SamplingConfig(temperature=0.5, top_k=7, seed=9, top_p=0.8)
    params = batch_params(3, 4, run)
    assert [p.sampling for p in params] == [
        SamplingConfig(temperature=0.5, top_k=7, seed=sample_seed(9, i), top_p=0.8) for i in range(3)]
    assert all(p.max_tokens == 4 for p in params)
    unseeded = batch_params(2, 4, SamplingConfig(temperature=0.5))
    assert [p.seed for p in unseeded] == [None, None]  # the engine picks each one


@pytest.mark.parametrize("max_seqs,lanes,want", [(8, 3, [3, 3, 2]), (2, 3, [1, 1]), (1, 1, [1])])
def test_lane_sizes(max_seqs, lanes, want):
    assert lane_sizes(max_seqs, lanes) == want


# -- recovery: the backend rebuilds the pipeline, the engine resumes every sequence -------------

class RecoveringEngine(PipelineEngine):
    """A 3-stage fake ring whose stage `fail_at` dies; _recover replaces it by `then`
    (cuts of the new pipeline; None: the first stage alone holds the whole model)."""

    def __init__(self, model: GPT, max_seqs: int, fail_at: tuple[int, int],
                 then: list[int] | None) -> None:
        stages = stages_of(model, [1, 2])
        sizes = lane_sizes(max_seqs, 3)
        link = MemoryLink([SlotStage(s, sizes) for s in stages[1:]], delay=0.001, fail_at=fail_at)
        super().__init__(stages[0], TOK.decode, max_seqs, 3, link)
        self.model, self.then, self.recovered = model, then, 0

    async def _recover(self, e) -> bool:
        assert "stopped answering" in str(e)
        for t in self.link.tasks:
            t.cancel()
        self.recovered += 1
        if self.then is None:
            self.first = SlotStage(stages_of(self.model, [])[0], self.sizes)
            self.link = None
            return True
        stages = stages_of(self.model, self.then)
        self.first = SlotStage(stages[0], self.sizes)
        self.link = MemoryLink([SlotStage(s, self.sizes) for s in stages[1:]])
        return True


@pytest.mark.parametrize("then", [[2], [1, 2], None], ids=["survivors", "spare", "starter-alone"])
def test_recovered_pipeline_resumes_every_sequence_exactly(model, then):
    engine = RecoveringEngine(model, 4, fail_at=(1, 20), then=then)
    lengths = [12, 25, 7, 30, 18, 9]
    out = asyncio.run(run_all(engine, PROMPTS[:6], [greedy(n) for n in lengths]))
    assert engine.recovered == 1
    for p, n, (toks, text, reason) in zip(PROMPTS, lengths, out):
        assert toks == alone(model, p, n), f"prompt {p}"
        assert text == TOK.decode(toks) and reason == "length"


@pytest.mark.parametrize("how", ["refused", "raised"])
def test_recovery_refused_fails_every_sequence_as_before(model, how):
    class Refusing(RecoveringEngine):
        async def _recover(self, e) -> bool:
            self.recovered += 1
            if how == "raised":
                raise RuntimeError("no node answers")
            return False

    engine = Refusing(model, 4, fail_at=(1, 12), then=None)

    async def main():
        await engine.start()
        try:
            seqs = [engine.submit(p, greedy(30)) for p in PROMPTS[:4]]
            for s in seqs:
                with pytest.raises(EngineFailure, match="node 2 stopped answering"):
                    await collect(s)
        finally:
            engine._reader.cancel()
    asyncio.run(main())
    assert engine.recovered == 1


def test_recovered_sampled_sequence_draws_a_stream_derived_from_its_seed(model):
    engine = RecoveringEngine(model, 2, fail_at=(1, 10), then=[2])
    params = [SeqParams(max_tokens=20, temperature=1.0, seed=7), greedy(20)]
    out = asyncio.run(run_all(engine, PROMPTS[:2], params))
    assert engine.recovered == 1
    assert [len(t) for t, _, _ in out] == [20, 20]
    assert out[1][0] == alone(model, PROMPTS[1], 20)


def test_a_sequence_whose_reader_falls_behind_pauses_and_goes_on_when_read(model):
    """Issue 25.4: a sequence PAUSE_UNREAD events ahead of its reader leaves the steps (a
    client that stopped reading costs no compute) while the sequence beside it goes on;
    read, it resumes, and both equal runs alone."""
    from mdi.engine.sequence import PAUSE_UNREAD

    async def main():
        engine, _ = ring_engine(model, max_seqs=2, n_stages=3, delay=0.002)
        await engine.start()
        try:
            behind = engine.submit(PROMPTS[0], greedy(PAUSE_UNREAD * 3))
            other = await collect(engine.submit(PROMPTS[3], greedy(PAUSE_UNREAD * 3)))
            await asyncio.sleep(0.1)
            held = behind.paused, behind.stats.n_generated
            return other, held, await collect(behind), behind.paused
        finally:
            await engine.close()

    other, (paused, n_unread), (toks, _, reason), paused_after = asyncio.run(main())
    assert paused and PAUSE_UNREAD <= n_unread <= PAUSE_UNREAD + 3  # + steps already sent
    assert other[0] == alone(model, PROMPTS[3], PAUSE_UNREAD * 3)
    assert toks == alone(model, PROMPTS[0], PAUSE_UNREAD * 3) and reason == "length"
    assert not paused_after


def test_a_sequence_nobody_reads_is_cancelled_and_its_slots_freed_on_every_stage(model):
    """Issue 25.4: a client that stops reading held its slot for ever while its queue grew.
    With a stall timeout the unread sequence is cancelled (counted in `stalled`), its
    slot is free again on every stage of the ring, and the sequence read beside it
    goes on to equal a run alone."""
    async def main():
        engine, link = ring_engine(model, max_seqs=2, n_stages=3, delay=0.002)
        engine.stall_timeout = 0.2
        await engine.start()
        try:
            unread = engine.submit(PROMPTS[0], greedy(100_000))
            read = engine.submit(PROMPTS[3], greedy(60))
            got = await collect(read)
            async def ended():                            # its reader never comes
                while not unread.done:
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(ended(), 20)
            await asyncio.sleep(0.1)                      # the Retire goes round
            stages = [engine.first] + link.stages
            return got, unread, engine.stalled, [sum(s.active for s in st.slots) for st in stages]
        finally:
            await engine.close()

    (toks, _, reason), unread, stalled, active = asyncio.run(main())
    assert unread.finish_reason == "cancelled" and stalled == 1
    assert unread.stats.n_generated < 100  # paused at PAUSE_UNREAD, then cancelled
    assert active == [0, 0, 0]
    assert toks == alone(model, PROMPTS[3], 60) and reason == "length"
