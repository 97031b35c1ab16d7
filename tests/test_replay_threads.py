"""The replacement's replay on every core (ring/node/replay_threads.py): a REPLAY
frame is computed with the process's CPUs as torch threads and the node's count is
set back after it; other frames keep the node's count; and the cache a replay
fills with several threads is the one it fills with one (float32 and int4 stages,
--batch-invariant), so the healed ring's text is unchanged."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mdi.engine.messages import Admit, Prefill, Replay
from mdi.engine.slots import SlotStage
from mdi.model import GPTConfig
from mdi.model.quant import configure_stage
from mdi.ring.node.data_plane import NodeRun
from mdi.ring.node.replay_threads import replay_compute, replay_threads
from mdi.ring.protocol.seq_frames import to_frame
from mdi.ring.protocol.wire import DType, Limits

from conftest import scaled_random_model, split_model

CONFIG = GPTConfig(vocab_size=48, block_size=128, n_layer=3, n_head=2, n_embd=64)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_replay_compute_raises_the_threads_and_sets_them_back(threads):
    assert replay_threads() >= 1
    with replay_compute(3) as n:
        assert n == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1
    torch.set_num_threads(4)
    with replay_compute(2) as n:  # never fewer than the node's own
        assert n == 4 and torch.get_num_threads() == 4
    with pytest.raises(RuntimeError):
        with replay_compute(2):
            raise RuntimeError("a bad frame")
    assert torch.get_num_threads() == 4


def test_the_replay_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MDI_REPLAY_THREADS", "3")
    assert replay_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MDI_REPLAY_THREADS", bad)
        with pytest.raises(ValueError, match="MDI_REPLAY_THREADS"):
            replay_threads()
    monkeypatch.delenv("MDI_REPLAY_THREADS")
    assert replay_threads() >= 1


def test_a_replay_frame_computes_on_more_threads_other_frames_do_not(threads, monkeypatch):
    stage = split_model(scaled_random_model(CONFIG, seed=1), [1, 2])[1]
    configure_stage(stage, None, batch_invariant=True)
    slots = SlotStage(stage, [2])
    slots.expect_replay(Admit(0, 0.0, None, None, 1), 4)
    slots.admit(Admit(1, 0.0, None, None, 1))
    run = NodeRun(SimpleNamespace(run_id=7), CONFIG, Limits(7, 64, 128, 2, DType.FLOAT32, 2, sequences=True),
                  slots=slots)
    seen = []
    handle = slots.handle
    monkeypatch.setattr(slots, "handle", lambda m: (seen.append(
        (type(m).__name__, torch.get_num_threads())), handle(m))[1])
    monkeypatch.setattr("mdi.ring.node.replay_threads.replay_threads", lambda: 3)
    assert run.compute(to_frame(Replay(0, torch.randn(1, 4, 64), 0), 7, slots)) is None
    run.compute(to_frame(Prefill(1, torch.randn(1, 2, 64), 0), 7, slots))
    assert seen == [("Replay", 3), ("Prefill", 1)]
    assert torch.get_num_threads() == 1 and slots.slots[0].position == 4


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_replay_on_more_threads_fills_the_cache_one_thread_fills(threads, quantize):
    model = scaled_random_model(CONFIG, seed=2)
    x = torch.randn(1, 100, CONFIG.n_embd)
    caches = []
    for n in (1, 2):
        stage = split_model(model, [1, 2])[1]
        configure_stage(stage, quantize, batch_invariant=True)
        slots = SlotStage(stage, [2])
        slots.expect_replay(Admit(1, 0.0, None, None, 1), 100)
        with replay_compute(n):
            for a in range(0, 100, 32):
                slots.handle(Replay(1, x[:, a:a + 32], a))
        assert not slots.due and torch.get_num_threads() == 1
        caches.append([kv[:, 1, :, :100].clone() for kv in slots.caches[0].kv])
    for layer, (a, b) in enumerate(zip(*caches)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), layer
