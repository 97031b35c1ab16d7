"""Upstream replay, in process (engine/replay.py, SlotStage): the log of what a
stage sent downstream (bounds, freeing), a replacement stage filled from its
upstream's log holds the cache the lost stage held, an engine over the
in-memory ring that loses a stage mid-generation and heals it by replay gives
the text of an undisturbed run, and bad replay frames are refused."""
from __future__ import annotations

import asyncio

import pytest
import torch

from mdi.engine import MemoryLink, PipelineEngine, SeqParams
from mdi.engine.messages import Admit, Decode, Prefill, Replay, Retire
from mdi.engine.replay import ActivationLog, Confirmed
from mdi.engine.slots import SlotError, SlotStage, lane_sizes
from mdi.generate import SamplingConfig, generate
from mdi.model import GPT, GPTConfig
from mdi.model.quant import configure_stage
from mdi.ring.protocol.seq_frames import to_frame, to_message
from mdi.ring.protocol.wire import (DType, Frame, Kind, Limits, WireError, decode_frame,
                                    encode_frame)
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model, split_model

CONFIG = GPTConfig(vocab_size=48, block_size=64, n_layer=3, n_head=2, n_embd=32)
TOK = CharTokenizer([chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(22)])
GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)
PROMPTS = [[1, 2, 3], [40] * 20, [7, 8], [0, 47, 0, 47, 5]]


@pytest.fixture
def model() -> GPT:
    m = scaled_random_model(CONFIG, seed=3)
    configure_stage(m, None, batch_invariant=True)
    return m


def stages(model: GPT) -> list[GPT]:
    out = split_model(model, [1, 2])
    for s in out:
        configure_stage(s, None, batch_invariant=True)
    return out


# -- the log -------------------------------------------------------------------------------

def test_log_grows_to_its_bound_and_frees():
    log = ActivationLog(n_slots=2, context=40, n_embd=4)
    assert ActivationLog.max_bytes(2, 40, 4, 4) == 2 * 40 * 4 * 4
    log.record(0, 0, torch.ones(3, 4))
    log.record(0, 3, torch.full((1, 4), 2.0))
    assert log.length == [4, 0] and log.read(0, 4)[0, 3, 0].item() == 2.0
    for p in range(4, 40):           # grows by doubling, never past the context
        log.record(0, p, torch.full((1, 4), float(p)))
    assert log.rows[0].shape == (40, 4) and log.nbytes == 40 * 4 * 4
    with pytest.raises(ValueError, match="context 40"):
        log.record(0, 40, torch.ones(1, 4))
    with pytest.raises(ValueError, match="after 0 written"):
        log.record(1, 5, torch.ones(1, 4))  # no gap
    log.cut(0, 10)
    assert log.length[0] == 10
    with pytest.raises(ValueError, match="holds 10 positions, 11"):
        log.read(0, 11)
    log.record(0, 0, torch.zeros(2, 4))  # a prefill from 0 starts the slot again
    assert log.length[0] == 2
    log.free(0)
    assert log.rows == [None, None] and log.nbytes == 0


def test_stage_logs_what_it_sends_and_frees_it_at_retire(model):
    first = SlotStage(stages(model)[0], [2])
    first.keep_log()
    first.admit(Admit(0, 0.0, None, None, 1))
    h = first.prefill(Prefill(0, torch.tensor([[1, 2, 3]])))
    out = first.decode(Decode(0, (0,), torch.tensor([[4]]), 3))
    assert first.log.length[0] == 4
    assert torch.equal(first.log.read(0, 4), torch.cat([h, out], dim=1))
    first.retire(Retire(0))
    assert first.log.rows[0] is None and first.log.nbytes == 0
    last = SlotStage(stages(model)[2], [2])
    last.keep_log()                      # the last stage sends tokens: nothing to keep
    assert last.log is None


def test_confirmed_positions_follow_the_tokens_that_came_back():
    c = Confirmed()
    c.sent({0: (7, 0, 5), 1: (8, 0, 3)})
    c.sent({0: (7, 0, 6), 1: (8, 0, 4)})
    assert c.positions({0: (7, 0, 6), 1: (8, 0, 4)}) == {0: 0, 1: 0}  # nothing back yet
    c.arrived()
    assert c.positions({0: (7, 0, 6), 1: (8, 0, 4)}) == {0: 5, 1: 3}
    assert c.positions({0: (9, 0, 6), 1: (8, 2, 4)}) == {0: 0, 1: 0}  # another sequence, window


# -- a replayed stage ----------------------------------------------------------------------

def run_chain(chain: list[SlotStage], m):
    for st in chain:
        m = st.handle(m)
        if m is None:
            return None
    return m


def test_replayed_stage_holds_the_lost_stage_cache(model):
    """Stage 1 computed a prefill in chunks and decodes; a fresh copy filled by the
    replay of stage 0's log holds the same cache rows, and the ring goes on with it to
    the same logits."""
    s = stages(model)
    chain = [SlotStage(st, [2]) for st in s]
    for st in chain:
        st.keep_log()
    for st in chain:
        st.admit(Admit(1, 0.0, None, None, 1))
    ids = torch.tensor([[5, 9, 2, 30, 31, 32, 7]])
    run_chain(chain, Prefill(1, ids[:, :4], 0))
    run_chain(chain, Prefill(1, ids[:, 4:6], 4))
    for p, t in enumerate([3, 11, 12], start=6):
        run_chain(chain, Decode(0, (1,), torch.tensor([[t]]), p))
    n = chain[0].slots[1].position
    assert n == 9
    fresh = SlotStage(split_model(model, [1, 2])[1], [2])
    configure_stage(fresh.stage, None, batch_invariant=True)
    fresh.keep_log()
    fresh.expect_replay(Admit(1, 0.0, None, None, 1), n)
    with pytest.raises(SlotError, match="await their replay"):
        fresh.decode(Decode(0, (1,), torch.zeros(1, 1, 32), n))
    msgs = chain[0].replay_of({1: n}, chunk=4)
    assert [(m.start, m.x.shape[1]) for m in msgs] == [(0, 4), (4, 4), (8, 1)]
    for m in msgs:
        assert fresh.handle(m) is None  # nothing goes on
    assert fresh.slots[1].position == n and not fresh.due
    for layer, (a, b) in enumerate(zip(chain[1].caches[0].kv, fresh.caches[0].kv)):
        assert torch.allclose(a[:, 1:2, :, :n], b[:, 1:2, :, :n], atol=1e-6, rtol=0), layer
    assert torch.allclose(fresh.log.read(1, n), chain[1].log.read(1, n), atol=1e-6, rtol=0)
    nxt = Decode(0, (1,), torch.tensor([[17]]), n)
    want = chain[2].decode(run_chain(chain[:2], nxt))
    chain[0].keep({1: n})
    chain[2].keep({1: n})
    got = chain[2].decode(run_chain([chain[0], fresh], Decode(0, (1,), torch.tensor([[17]]), n)))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_replay_frames_out_of_order_or_unasked_are_refused(model):
    st = SlotStage(stages(model)[1], [2, 2])
    x = torch.zeros(1, 3, 32)
    with pytest.raises(SlotError, match="awaits none"):
        st.replay(Replay(0, x, 0))
    st.expect_replay(Admit(2, 0.0, None, None, 1), 4)
    with pytest.raises(SlotError, match="holds 0 of the 4"):
        st.replay(Replay(2, x, 1))          # a gap
    with pytest.raises(SlotError, match="holds 0 of the 4"):
        st.replay(Replay(2, torch.zeros(1, 5, 32), 0))  # more than announced
    st.replay(Replay(2, x, 0))
    assert st.due == {2: 4} and st.slots[2].position == 3
    with pytest.raises(SlotError, match="replay of 0 positions"):
        st.expect_replay(Admit(1, 0.0, None, None, 1), 0)


def test_replay_frame_round_trips_and_bad_ones_are_refused(model):
    st = SlotStage(stages(model)[1], [2, 2])
    lim = Limits(7, 32, 64, 4, DType.FLOAT32, 2, sequences=True)
    m = Replay(3, torch.randn(1, 5, 32), 0)
    f = decode_frame(encode_frame(to_frame(m, 7, st)), lim)
    assert f.kind == Kind.REPLAY
    back = to_message(f, st)
    assert isinstance(back, Replay) and back.slot == 3 and torch.equal(back.x, m.x)
    data = encode_frame(to_frame(m, 7, st))
    with pytest.raises(WireError, match="truncated|announces"):
        decode_frame(data[:-4], lim)
    for bad, what in [(Frame(Kind.REPLAY, 7, 4, 0, torch.zeros(1, 2, 32)), "outside"),
                      (Frame(Kind.REPLAY, 7, 0, 0, torch.zeros(2, 2, 32)), "one sample"),
                      (Frame(Kind.REPLAY, 7, 0, 0, torch.zeros(1, 2, 16)), "width"),
                      (Frame(Kind.REPLAY, 7, 0, 63, torch.zeros(1, 2, 32)), "block_size")]:
        with pytest.raises(WireError, match=what):
            decode_frame(encode_frame(bad), lim)
    fixed = Limits(7, 32, 64, 4, DType.FLOAT32, 2, sequences=False)
    with pytest.raises(WireError, match="fixed-batch"):
        decode_frame(data, fixed)


# -- an engine that heals its in-memory ring by replay ------------------------------------

class HealingEngine(PipelineEngine):
    """Over a MemoryLink whose stage `lost` fails: the survivors keep their slots, a
    fresh copy of the lost stage is filled by its upstream's replay."""

    def __init__(self, model: GPT, lost: int, at: int, max_seqs: int = 4) -> None:
        self.model = model
        self.lost = lost
        parts = stages(model)
        sizes = lane_sizes(max_seqs, 3)
        self.rest = [SlotStage(s, sizes) for s in parts[1:]]
        for st in self.rest:
            st.keep_log()
        link = MemoryLink(self.rest, fail_at=(lost, at))
        super().__init__(parts[0], TOK.decode, max_seqs, 3, link, prefill_chunk=4)
        self.first.keep_log()
        self.healed: dict[int, int] | None = None

    async def _recover(self, e) -> bool:
        for task in self.link.tasks:
            task.cancel()
        await asyncio.gather(*self.link.tasks, return_exceptions=True)
        keep = self.kept_positions()
        fresh = SlotStage(split_model(self.model, [1, 2])[self.lost + 1], self.rest[0].sizes)
        configure_stage(fresh.stage, None, batch_invariant=True)
        fresh.keep_log()
        seqs = {slot: seq for lane in self.lanes for slot, seq in lane.seqs.items()}
        for slot, n in keep.items():
            if n:
                p = seqs[slot].params
                fresh.expect_replay(Admit(slot, p.temperature, p.top_k, p.top_p, seqs[slot].seed), n)
        for i, st in enumerate(self.rest):
            if i != self.lost:
                st.keep(keep)
        upstream = self.first if self.lost == 0 else self.rest[self.lost - 1]
        self.rest[self.lost] = fresh
        self.link = MemoryLink(self.rest)
        for m in upstream.replay_of(keep):
            if self.lost == 0:
                await self.link.send(m)
            else:
                fresh.handle(m)
        self.healed, self._keep = keep, keep
        return True


@pytest.mark.parametrize("lost,at", [(0, 9), (0, 40), (1, 23), (1, 61)])
def test_engine_healed_by_replay_gives_the_undisturbed_text(model, lost, at):
    n = 30
    want = [generate(model, [p], n, GREEDY)[0] for p in PROMPTS]
    engine = HealingEngine(model, lost, at)

    async def go():
        await engine.start()
        try:
            seqs = [engine.submit(p, SeqParams(max_tokens=n, temperature=0.0)) for p in PROMPTS]
            out = []
            for seq in seqs:
                toks = []
                async for ev in seq.events():
                    if ev.token is not None:
                        toks.append(ev.token)
                out.append(toks)
            return out
        finally:
            await engine.close()

    got = asyncio.run(go())
    assert got == want
    assert engine.healed is not None and any(engine.healed.values()), engine.healed


# -- a node's part -------------------------------------------------------------------------

def test_node_replay_fills_its_slot_forwards_nothing_and_refuses_bad_frames(tmp_path):
    """An intermediate of a replay run, the replacement of a lost node: a REPLAY for a
    slot that awaits none, and a truncated one, are refused naming the frame (the run is
    parked, the node takes the next /init); good REPLAY frames fill the slot and go no
    further, and the next DECODE goes on as usual. The log counts in the run's memory."""
    from cluster_helpers import (build_tiny_ckpt, closed_by_peer, intermediate_and_fake_finisher,
                                 open_data)
    from mdi.ring.protocol.wire import read_frame

    ckpt = build_tiny_ckpt(tmp_path / "ckpt")
    replayed = [{"slot": 1, "positions": 3, "temperature": 0.0, "seed": 1}]

    async def scenario() -> None:
        async with intermediate_and_fake_finisher(ckpt) as (rt, cfg, config, start_run):
            inter = cfg.intermediate[0]
            x = torch.randn(1, 3, config.n_embd)
            await start_run(50, connect=False, recovery="reprefill")
            plain = rt.run.mem_bytes
            for run_id in (51, 52, 53):
                back_r, back_w = await start_run(run_id, recovery="replay", replayed=replayed)
                assert rt.run.mem_bytes - plain == ActivationLog.max_bytes(
                    2, config.block_size, config.n_embd, 4)
                reader, writer = await open_data(inter, run_id)
                if run_id == 51:
                    writer.write(Frame(Kind.REPLAY, run_id, 0, 0, x).encode())
                elif run_id == 52:
                    writer.write(Frame(Kind.REPLAY, run_id, 1, 0, x).encode()[:-5])
                    writer.write_eof()
                else:
                    writer.write(Frame(Kind.REPLAY, run_id, 1, 0, x).encode())
                    writer.write(Frame(Kind.SEQ_DECODE, run_id, 1, 0, x[:, :1].clone(),
                                       (1,)).encode())
                    f = await asyncio.wait_for(read_frame(back_r, rt.run.limits), 5)
                    assert f.kind == Kind.SEQ_DECODE and f.slots == (1,)  # no REPLAY went on
                    assert rt.run.slots.slots[1].position == 4 and not rt.run.slots.due
                    assert rt.run.slots.log.length[1] == 4
                    writer.close()
                    back_w.close()
                    continue
                assert await closed_by_peer(reader)
                assert rt.state == "parked"  # kept for a resume; the next /init replaces it
                reason = rt.status()["last_run"]["reason"]
                want = "replay for slot 0, which awaits none" if run_id == 51 else "truncated"
                assert reason.startswith("bad frame from the previous node") and want in reason, \
                    reason
                writer.close()
                back_w.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
