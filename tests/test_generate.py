"""Sampling functions, micro-batch grouping and the single-device generation loop."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdi.checkpoint import load_model
from mdi.generate import (LocalGenerator, SamplingConfig, generate, make_groups, sample_generator,
                          sample_token)
from mdi.generate.sampling import nucleus, top_p_filter
from mdi.model import GPT

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)


@pytest.fixture
def model(tiny_config, make_model) -> GPT:
    return make_model(tiny_config, seed=21)


PROMPTS = [[1, 2, 3], [40], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [0, 47, 0, 47]]


def test_batched_greedy_equals_separate_runs(model):
    model.batch_invariant = True  # groupings differ: exact only with the option
    n = 2 * model.config.block_size + 5  # crosses the context limit too
    batched = generate(model, PROMPTS, n, GREEDY)
    separate = [generate(model, [p], n, GREEDY)[0] for p in PROMPTS]
    assert batched == separate
    assert all(len(t) == n for t in batched)
    assert len({tuple(t) for t in batched}) == len(PROMPTS)


def test_grouping_does_not_change_sampled_tokens(model):
    model.batch_invariant = True  # groupings differ: exact only with the option
    sampling = SamplingConfig(temperature=0.8, top_k=20, seed=99)
    prompts = PROMPTS + [[9, 8, 7], [5]]
    runs = {g: generate(model, prompts, 40, sampling, n_groups=g) for g in (1, 3, 6)}
    assert runs[1] == runs[3] == runs[6]
    assert len({tuple(t) for t in runs[1]}) == len(prompts)


def test_sample_stream_depends_on_index_not_on_batch(model):
    """Sample 0 of a batch is sample 0 of a run alone; identical prompts at
    different indices draw different tokens."""
    model.batch_invariant = True  # groupings differ: exact only with the option
    sampling = SamplingConfig(temperature=1.0, top_k=None, seed=5)
    batched = generate(model, [[3, 4]] * 3, 30, sampling)
    alone = generate(model, [[3, 4]], 30, sampling)
    assert batched[0] == alone[0]
    assert batched[1] != batched[0] and batched[2] != batched[1]


def test_same_seed_same_text_other_seed_other_text(tiny_ckpt):
    loaded = load_model(tiny_ckpt)
    model, info = loaded.model, loaded.checkpoint
    tok = info.tokenizer()
    prompt = [tok.encode("ROMEO:")] * 2

    def text(seed: int) -> list[str]:
        out = generate(model, prompt, 40, SamplingConfig(temperature=1.0, top_k=None, seed=seed))
        return [tok.decode(t) for t in out]

    a, b, c = text(1), text(1), text(2)
    assert a == b
    assert a != c
    assert all(len(s) == 40 for s in a + c)  # one char per token


def test_n_tokens_beyond_block_size(model):
    bs = model.config.block_size
    gen = LocalGenerator(model, [[1, 2], [3]], SamplingConfig(temperature=0.9, top_k=5, seed=1))
    steps = list(gen.generate(4 * bs))
    assert [s.index for s in steps] == list(range(4 * bs))
    for i, state in enumerate(gen.states):
        assert state.generated == [s.tokens[i] for s in steps]
        assert len(state.generated) == 4 * bs
        assert all(0 <= t < model.config.vocab_size for t in state.generated)
        # The window moved: the context never exceeds block_size.
        assert 0 < len(state.tokens) - state.window <= bs + 1
        assert state.window > 0


def test_generator_errors(tiny_config, model):
    with pytest.raises(ValueError, match="at least one token"):
        LocalGenerator(model, [[1], []], GREEDY)
    with pytest.raises(ValueError, match="whole model"):
        LocalGenerator(GPT(tiny_config, 0, 1), [[1]], GREEDY)
    with pytest.raises(ValueError, match="n_samples must be positive"):
        LocalGenerator(model, [], GREEDY)
    with pytest.raises(ValueError, match="micro-batches must be positive"):
        LocalGenerator(model, [[1]], GREEDY, n_groups=0)


# -- make_groups -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_samples,n_groups,expected", [
    (1, 1, [(0, 1)]),
    (3, 1, [(0, 3)]),
    (3, 3, [(0, 1), (1, 2), (2, 3)]),
    (5, 2, [(0, 3), (3, 5)]),
    (7, 3, [(0, 3), (3, 5), (5, 7)]),
    (6, 4, [(0, 2), (2, 4), (4, 5), (5, 6)]),
    (2, 5, [(0, 1), (1, 2)]),    # more groups than samples: one sample each
    (10, 10, [(i, i + 1) for i in range(10)]),
])
def test_make_groups_table(n_samples, n_groups, expected):
    assert make_groups(n_samples, n_groups) == [range(a, b) for a, b in expected]


@pytest.mark.parametrize("n_samples,n_groups,message", [
    (0, 1, "n_samples must be positive, got 0"),
    (-2, 1, "n_samples must be positive, got -2"),
    (3, 0, "micro-batches must be positive, got 0"),
    (3, -1, "micro-batches must be positive, got -1"),
])
def test_make_groups_errors(n_samples, n_groups, message):
    with pytest.raises(ValueError, match=message):
        make_groups(n_samples, n_groups)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 50))
def test_make_groups_properties(n_samples, n_groups):
    groups = make_groups(n_samples, n_groups)
    assert len(groups) == min(n_samples, n_groups)
    assert [i for g in groups for i in g] == list(range(n_samples))  # contiguous, in order
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# -- sampling ----------------------------------------------------------------------------------

LOGITS = torch.tensor([0.1, 2.0, -1.0, 1.9, 0.5, 1.8, -3.0, 0.0])


def test_temperature_zero_is_argmax():
    g = sample_generator(0, 0)
    greedy = SamplingConfig(temperature=0.0, top_k=None)
    for seed in range(5):
        logits = torch.randn(50, generator=torch.Generator().manual_seed(seed))
        assert sample_token(logits, greedy, g) == int(logits.argmax())
    assert sample_token(LOGITS, SamplingConfig(temperature=0.0, top_k=3), g) == 1


def test_top_k_one_is_argmax():
    cfg = SamplingConfig(temperature=0.8, top_k=1)
    g = sample_generator(3, 0)
    assert {sample_token(LOGITS, cfg, g) for _ in range(50)} == {1}


def test_top_k_limits_the_candidates():
    cfg = SamplingConfig(temperature=5.0, top_k=3)  # flat: every kept token shows up
    g = sample_generator(3, 1)
    assert {sample_token(LOGITS, cfg, g) for _ in range(300)} == {1, 3, 5}
    everything = SamplingConfig(temperature=5.0, top_k=100)  # top_k > vocabulary: no cut
    assert {sample_token(LOGITS, everything, g) for _ in range(600)} == set(range(8))


def test_sampling_follows_the_softmax():
    cfg = SamplingConfig(temperature=1.0, top_k=None)
    g = sample_generator(11, 0)
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.25, 0.75
    draws = [sample_token(logits, cfg, g) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.03


def test_top_k_sampling_follows_the_kept_softmax():
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    g = sample_generator(5, 0)
    logits = torch.tensor([math.log(3.0), -2.0, 0.0])  # kept: 0 and 2, p = 0.75, 0.25
    draws = [sample_token(logits, cfg, g) for _ in range(4000)]
    assert set(draws) == {0, 2}
    assert abs(draws.count(0) / len(draws) - 0.75) < 0.03


def test_a_draw_takes_one_uniform_number():
    g, twin = sample_generator(7, 0), sample_generator(7, 0)
    for cfg in (SamplingConfig(temperature=0.9, top_k=None), SamplingConfig(top_k=3),
                SamplingConfig(top_k=None, top_p=0.5)):
        sample_token(LOGITS, cfg, g)
        torch.rand((), generator=twin, dtype=torch.float64)
        assert torch.equal(g.get_state(), twin.get_state())


def test_a_draw_rounded_up_to_the_total_takes_the_last_drawable_token(monkeypatch):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    cfg = SamplingConfig(temperature=1.0, top_k=None, top_p=0.7)  # the nucleus is {0, 1}
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert sample_token(logits, cfg, sample_generator(0, 0)) == 1


def test_sampling_refuses_nan_logits():
    with pytest.raises(ValueError, match="NaN or infinity"):
        sample_token(torch.tensor([0.0, float("nan")]), SamplingConfig(top_k=None),
                     sample_generator(0, 0))


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_nucleus_keeps_what_top_p_filter_keeps(top_p):
    logits = 3 * torch.randn(5000, generator=torch.Generator().manual_seed(2))  # flat: > 256 kept
    kept, ids = nucleus(logits, top_p)
    expected = torch.isfinite(top_p_filter(logits, top_p)).nonzero().flatten()
    assert sorted(ids.tolist()) == expected.tolist()
    assert torch.equal(kept, logits[ids]) and kept.tolist() == sorted(kept.tolist(), reverse=True)


def test_sample_generator_streams():
    def draws(seed, index):
        return torch.rand(5, generator=sample_generator(seed, index)).tolist()

    assert draws(1, 0) == draws(1, 0)
    assert draws(1, 0) != draws(1, 1)
    assert draws(1, 0) != draws(2, 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature must be a finite number >= 0 .* got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0 .* got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0 .* got inf"),
    ({"top_k": 0}, "top_k must be a positive integer, got 0"),
    ({"top_k": -5}, "top_k must be a positive integer, got -5"),
    ({"top_k": 2.5}, "top_k must be a positive integer, got 2.5"),
])
def test_invalid_sampling_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_sampling_config_to_dict():
    assert SamplingConfig(temperature=0.5, top_k=7, seed=3).to_dict() == {
        "temperature": 0.5, "top_k": 7, "seed": 3}
