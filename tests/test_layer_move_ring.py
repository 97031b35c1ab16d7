"""Re-plans that move layers with their KV cache on a real ring of processes on
loopback (ring/starter/layer_shift.py, ring/node/layer_move.py), with the bundled
model: re-plans put in the engine's inbox mid-run move the boundaries every way
(the starter takes and gives layers, an intermediate takes them from the finisher
and gives them back, and gives all its layers upstream while it takes one) and the greedy text equals the undisturbed run's, with no
re-prefill (each record says `moved`, with the rows' bytes); a move whose stream
is cut or damaged on its way is refused by the taker with the reason, and the ring
is formed anew (the rebuild), the text still the undisturbed one."""
from __future__ import annotations

from pathlib import Path

import pytest

from mdi.checkpoint import load_model
from mdi.generate import SamplingConfig, generate
from mdi.model.quant import configure_stage
from mdi.ring.cluster.local_cluster import LocalCluster
from mdi.ring.plan.partition import Shard
from mdi.ring.starter import driver, layer_shift
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import RunOptions
from mdi.ring.starter.replan import Replan

pytestmark = pytest.mark.slow
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"
GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=1)
LINES = ["ROMEO:\nBut soft", "First Citizen:\nWe are accounted poor", "KING"]
N_TOKENS = 60


@pytest.fixture(scope="module")
def bundled():
    ck = load_model(str(BUNDLED))
    prompts = [ck.tokenizer.encode(line) for line in LINES]
    configure_stage(ck.model, None, batch_invariant=True)
    return prompts, [generate(ck.model, [p], N_TOKENS, GREEDY)[0] for p in prompts]


def run_moving(monkeypatch, prompts, splits: dict[int, list[int]]):
    """A 3-node ring split 2+2+2; at token t (all samples counted) a Replan to
    splits[t] (blocks per node) goes into the engine's inbox."""
    engines = []
    init = driver.RingEngine.__init__

    def keep(self, *a, **kw):
        init(self, *a, **kw)
        engines.append(self)

    monkeypatch.setattr(driver.RingEngine, "__init__", keep)
    made = 0

    def on_event(i, ev) -> None:
        nonlocal made
        made += 1
        if made in splits:
            bounds = [0]
            for n in splits[made]:
                bounds.append(bounds[-1] + n)
            shards = [Shard(a, b, bounds[-1]) for a, b in zip(bounds, bounds[1:])]
            engines[0]._inbox.put_nowait(Replan(f"test: split {splits[made]}", [1.0] * 3, shards))

    with LocalCluster(3, threads=1, node_timeout=5.0) as c:
        opts = RunOptions(timeout=5.0, batch_invariant=True, partition="even")
        return Starter(c.nodes, c.token, str(BUNDLED), opts, on_event=on_event).run(
            prompts, N_TOKENS, GREEDY)


def test_layers_move_every_way_with_their_cache(monkeypatch, bundled):
    prompts, want = bundled
    splits = {30: [3, 2, 1], 70: [2, 3, 1], 110: [2, 2, 2], 140: [4, 1, 1]}
    result = run_moving(monkeypatch, prompts, splits)
    assert result.tokens == want
    recs = result.recoveries
    assert [r["recovery"] for r in recs] == ["replan"] * 4
    assert [r["plan"]["partition"] for r in recs] == ["moved"] * 4, recs
    assert [[n["layers"] for n in r["plan"]["nodes"]] for r in recs] == [  # the last: the
        [[0, 3], [3, 5], [5, 6]], [[0, 2], [2, 5], [5, 6]], [[0, 2], [2, 4], [4, 6]],
        [[0, 4], [4, 5], [5, 6]]]  # intermediate gives all its layers and takes another
    assert recs[0]["moved"] == [{"layers": [2, 3], "from": "intermediate[0]", "to": "starter"},
                                {"layers": [4, 5], "from": "finisher", "to": "intermediate[0]"}]
    for r in recs:  # the live sequences kept their caches: rows moved, nothing re-prefilled
        assert r["plan"]["kept_slots"] == 3 and r["plan"]["moved_kv_bytes"] > 0
        assert r["paused_s"] is None or r["paused_s"] >= r["recovery_s"]


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[:-10], "these rows take"),                     # cut on its way
    (lambda data: b"MDIMOVE0" + data[8:], "magic"),                    # not a move stream
    (lambda data: data[:-8] + b"END\0\0\0\0\0", "end mark")])           # its end mark off
def test_a_bad_move_stream_is_refused_and_the_ring_formed_anew(monkeypatch, bundled, caplog,
                                                                damage, words):
    prompts, want = bundled
    put = layer_shift._put

    async def bad(http, spec, path, chunks, total, engine):
        if path.startswith("/move/kv/"):
            data = damage(b"".join(chunks))
            return await put(http, spec, path, [data], len(data), engine)
        return await put(http, spec, path, chunks, total, engine)

    monkeypatch.setattr(layer_shift, "_put", bad)
    with caplog.at_level("WARNING", logger="mdi.ring.starter.layer_shift"):
        result = run_moving(monkeypatch, prompts, {40: [2, 3, 1]})
    assert result.tokens == want
    (rec,) = result.recoveries
    assert rec["recovery"] == "replan" and rec["plan"]["partition"] != "moved"
    assert "refused /move/kv" in caplog.text and words in caplog.text, caplog.text
