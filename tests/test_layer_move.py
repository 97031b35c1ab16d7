"""Moving boundary layers with their KV cache, in process (engine/layer_splice.py,
ring/protocol/kv_move.py): the moved rows equal the giver's, every sequence's next
logits after a move equal those of the pipeline that did not move (both ways: the
downstream stage takes the upstream's last layers, or the other way), and bad or
truncated move streams are refused with an error naming what is wrong while the
giving stage keeps its state and goes on computing the same numbers."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from mdi.engine.layer_splice import SpliceError, kv_dtype, rows_of, splice
from mdi.engine.messages import Admit, Decode, Prefill
from mdi.engine.slots import SlotStage
from mdi.model import GPT, GPTConfig
from mdi.model.quant import configure_stage
from mdi.ring.protocol.kv_move import END, HEAD, ROW, Expect, MoveError, decode, encode

from conftest import scaled_random_model, split_model

CONFIG = GPTConfig(vocab_size=48, block_size=64, n_layer=4, n_head=2, n_embd=32)
PROMPTS = {0: [1, 2, 3, 4, 5], 1: [40] * 11, 2: [7, 8, 9]}  # slot -> prompt (lanes [2, 1])


@pytest.fixture
def model() -> GPT:
    m = scaled_random_model(CONFIG, seed=5)
    configure_stage(m, None, batch_invariant=True)
    return m


def pipeline(model: GPT, cut: int | list[int]) -> list[SlotStage]:
    """Stages split at `cut`, every prompt prefilled and two tokens decoded."""
    out = []
    for s in split_model(model, cut if isinstance(cut, list) else [cut]):
        configure_stage(s, None, batch_invariant=True)
        out.append(SlotStage(s, [2, 1]))
    for slot, prompt in PROMPTS.items():
        x: torch.Tensor = torch.tensor([prompt])
        for st in out:
            st.handle(Admit(slot, 0.0, None, None, 1))
            m = st.handle(Prefill(slot, x, 0))
            x = m.x if m is not None else x
    for step in range(2):
        step_all(out, tokens=[3 + step, 9, 4])
    return out


def step_all(stages: list[SlotStage], tokens: list[int]) -> list[torch.Tensor]:
    """One decode of every slot (lane 0: slots 0, 1; lane 1: slot 2): the logits."""
    logits = []
    for lane, slots in ((0, (0, 1)), (1, (2,))):
        x = torch.tensor([[tokens[s]] for s in slots])
        pos = stages[0].slots[slots[0]].position
        for st in stages:
            x = st.decode(Decode(lane, slots, x, pos))
        logits.append(x)
    return logits


def expect_of(st: SlotStage, start: int, stop: int, positions: dict[int, int]) -> Expect:
    c = st.stage.config
    return Expect(start, stop, tuple(sorted(positions.items())), kv_dtype(st), c.kv_heads,
                  c.head_size)


def move(model: GPT, giver: SlotStage, taker: SlotStage, start: int, stop: int) -> bytes:
    """Move layers [start, stop) from giver to taker through the stream; its bytes."""
    positions = {s: giver.slots[s].position for s in PROMPTS}
    expect = expect_of(giver, start, stop, positions)
    data = b"".join(encode(expect, rows_of(giver, start, stop, positions)))
    assert len(data) == expect.nbytes
    rows = decode(data, expect_of(taker, start, stop, positions))
    blocks = {i: copy.deepcopy(model.transformer.h[str(i)]) for i in range(start, stop)}
    g, t = giver.stage, taker.stage
    new_t = (min(t.start, start), max(t.stop, stop))
    new_g = (g.start, start) if stop == g.stop else (stop, g.stop)
    splice(taker, *new_t, blocks, rows, positions)
    splice(giver, *new_g, {}, {}, positions)
    return data


@pytest.mark.parametrize("cut, layers", [(3, (2, 3)), (2, (1, 2)), (1, (1, 3)), (2, (2, 3))])
def test_moved_layers_keep_every_sequences_next_logits(model, cut, layers):
    ref = pipeline(model, cut)
    moved = pipeline(model, cut)
    a, b = layers
    giver, taker = (moved[0], moved[1]) if b == cut else (moved[1], moved[0])
    before = {(i, s): giver.caches[giver.slots[s].lane].kv[i - giver.stage.start]
              [:, giver.slots[s].row, :, :giver.slots[s].position].clone()
              for i in range(a, b) for s in PROMPTS}
    move(model, giver, taker, a, b)
    for (i, s), rows in before.items():  # the taker's cache holds the giver's rows
        t = taker.slots[s]
        assert torch.equal(taker.caches[t.lane].kv[i - taker.stage.start][:, t.row, :, :t.position],
                           rows)
    for step in range(3):
        toks = [11 + step, 2, 30 - step]
        for x, y in zip(step_all(ref, toks), step_all(moved, toks)):
            assert torch.equal(x, y)
    assert [s.stage.n_blocks for s in moved] != [s.stage.n_blocks for s in ref]


def test_a_stage_may_give_all_its_layers_and_take_others(model):
    """[0, 1) [1, 2) [2, 4) -> [0, 2) [2, 3) [3, 4): the middle stage gives its only
    layer upstream and takes the finisher's first; the logits stay the same."""
    ref = pipeline(model, [1, 2])
    moved = pipeline(model, [1, 2])
    first, mid, last = moved
    positions = {s: mid.slots[s].position for s in PROMPTS}
    given = {}
    for giver, a, b in ((mid, 1, 2), (last, 2, 3)):  # read before anything changes
        ex = expect_of(giver, a, b, positions)
        given[(a, b)] = decode(b"".join(encode(ex, rows_of(giver, a, b, positions))), ex)
    blocks = {i: copy.deepcopy(model.transformer.h[str(i)]) for i in (1, 2)}
    splice(first, 0, 2, {1: blocks[1]}, given[(1, 2)], positions)
    splice(mid, 2, 3, {2: blocks[2]}, given[(2, 3)], positions)
    splice(last, 3, 4, {}, {}, positions)
    assert [(s.stage.start, s.stage.stop) for s in moved] == [(0, 2), (2, 3), (3, 4)]
    for step in range(3):
        toks = [8, 9 + step, 10]
        for x, y in zip(step_all(ref, toks), step_all(moved, toks)):
            assert torch.equal(x, y)


def test_a_stage_may_give_its_end_to_two_stages():
    """[0, 3) [3, 4) [4, 5) -> [0, 1) [1, 2) [2, 5) (a re-plan on a loaded machine did
    this): the first stage gives [1, 2) to the middle one and [2, 3), a run inside
    its old range, to the last; the middle gives its only layer to the last."""
    model = scaled_random_model(replace(CONFIG, n_layer=5), seed=6)
    configure_stage(model, None, batch_invariant=True)
    ref = pipeline(model, [3, 4])
    moved = pipeline(model, [3, 4])
    first, mid, last = moved
    positions = {s: first.slots[s].position for s in PROMPTS}
    given = {}
    for giver, a, b in ((first, 1, 2), (first, 2, 3), (mid, 3, 4)):  # read before any change
        ex = expect_of(giver, a, b, positions)
        given[(a, b)] = decode(b"".join(encode(ex, rows_of(giver, a, b, positions))), ex)
    blocks = {i: copy.deepcopy(model.transformer.h[str(i)]) for i in (1, 2, 3)}
    splice(first, 0, 1, {}, {}, positions)
    splice(mid, 1, 2, {1: blocks[1]}, given[(1, 2)], positions)
    splice(last, 2, 5, {2: blocks[2], 3: blocks[3]}, {**given[(2, 3)], **given[(3, 4)]},
           positions)
    assert [(s.stage.start, s.stage.stop) for s in moved] == [(0, 1), (1, 2), (2, 5)]
    for step in range(3):
        toks = [8, 9 + step, 10]
        for x, y in zip(step_all(ref, toks), step_all(moved, toks)):
            assert torch.equal(x, y)


def bad(data: bytes) -> list[tuple[bytes, str]]:
    """Streams broken in every way the decoder names, each with the words it must say."""
    row0 = HEAD.size
    first = bytearray(data)
    first[row0 + 4:row0 + 8] = (99).to_bytes(4, "little")  # a layer not moved
    twice = bytearray(data)
    n = int.from_bytes(data[row0 + ROW.size - 8:row0 + ROW.size], "little")
    twice[row0 + ROW.size + n:row0 + 2 * ROW.size + n] = data[row0:row0 + ROW.size]
    dtype = bytearray(data)
    dtype[row0 + 16] = 3  # bfloat16
    return [(data[:5], "before its header"), (b"MDIMOVE0" + data[8:], "magic"),
            (data[:row0 + 10], "cut short after 0"), (data[:-20], "cut short"),
            (data[:-END.size], "no end mark"), (data + b"\0", "after its end mark"),
            (bytes(first), "not a layer and slot"), (bytes(twice), "sent twice"),
            (bytes(dtype), "bfloat16")]


def test_bad_or_truncated_streams_are_refused_and_the_giver_keeps_serving(model):
    ref = pipeline(model, 2)
    live = pipeline(model, 2)
    giver = live[0]
    positions = {s: giver.slots[s].position for s in PROMPTS}
    expect = expect_of(giver, 1, 2, positions)
    data = b"".join(encode(expect, rows_of(giver, 1, 2, positions)))
    for broken, words in bad(data):
        with pytest.raises(MoveError, match=words):
            decode(broken, expect)
    with pytest.raises(MoveError, match="layers \\[1, 2\\), expected \\[1, 3\\)"):
        decode(data, expect_of(giver, 1, 3, positions))
    short = {**positions, 0: positions[0] - 1}
    with pytest.raises(MoveError, match="positions, expected"):
        decode(data, expect_of(giver, 1, 2, short))
    with pytest.raises(SpliceError, match="rows none"):  # a splice without its rows
        splice(live[1], 1, 4, {1: copy.deepcopy(model.transformer.h["1"])}, {}, positions)
    with pytest.raises(SpliceError, match="blocks of layers"):
        splice(live[1], 1, 4, {}, decode(data, expect), positions)
    with pytest.raises(SpliceError, match="not in the stage's"):  # layers it does not hold
        rows_of(pipeline(model, 2)[1], 1, 3, positions)
    for step in range(2):  # nothing changed: the same numbers as the reference
        toks = [5, 6 + step, 7]
        for x, y in zip(step_all(ref, toks), step_all(live, toks)):
            assert torch.equal(x, y)


def test_a_node_bounds_what_a_move_asks_before_it_takes_a_byte(model):
    """/move/expect (layer_move.expect_of): layers outside the model, slots it does not
    hold, more positions than a slot has, or a slot twice are refused by name, so a
    stream's size is bounded by the run's own cache."""
    from types import SimpleNamespace

    from mdi.ring.node.control_messages import MoveSpec
    from mdi.ring.node.layer_move import expect_of
    from mdi.ring.node.validate import InitError

    stage = pipeline(model, 2)[1]
    run = SimpleNamespace(slots=stage, config=CONFIG)
    n0 = stage.slots[0].position
    ok = expect_of(run, MoveSpec(run_id=1, start=1, stop=2, slots=[[0, n0], [2, 1]]))
    assert ok.nbytes == HEAD.size + 2 * ROW.size + ok.row_bytes(n0) + ok.row_bytes(1) + END.size
    for start, stop, slots, words in [(2, 2**31 - 1, [[0, 1]], "not a range of the model"),
                                      (1, 2, [[9, 1]], "slot 9 outside"),
                                      (1, 2, [[0, n0 + 1]], f"holds {n0} positions"),
                                      (1, 2, [[0, 1], [0, 1]], "each slot once")]:
        with pytest.raises(InitError, match=words):
            expect_of(run, MoveSpec(run_id=1, start=start, stop=stop, slots=slots))
