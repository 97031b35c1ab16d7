"""generate/step.py, the one step every runner uses: the same calls chained over a
model's stages (as the starter and nodes make them) give bitwise the whole model's
numbers (as single-device generation makes them)."""
from __future__ import annotations

import torch

from mdi.generate import step
from mdi.model import GPT

PROMPTS = [[7, 1, 30, 12, 3], [25, 0]]


def split(whole: GPT, bounds: list[int]) -> list[GPT]:
    """Stages [bounds[i], bounds[i+1]) holding the whole model's weights."""
    state = whole.state_dict()
    stages = []
    for start, stop in zip(bounds, bounds[1:]):
        stage = GPT(whole.config, start, stop).eval()
        stage.load_state_dict({k: state[k] for k in stage.state_dict()})
        stages.append(stage)
    return stages


def test_prefill_and_decode_over_stages_equal_the_whole_model(tiny_config, make_model):
    whole = make_model(tiny_config)
    stages = split(whole, [0, 1, 3])
    with torch.inference_mode():
        wcache = whole.new_cache(len(PROMPTS))
        caches = [s.new_cache(len(PROMPTS)) for s in stages]
        for row, p in enumerate(PROMPTS):
            want = step.prefill(whole, wcache, row, p[:-1])
            h = p[:-1]
            for stage, cache in zip(stages, caches):
                h = step.prefill(stage, cache, row, h)
            assert h.shape == (1, len(p) - 1, tiny_config.n_embd)  # activations, no logits
            assert torch.equal(h, want)
        tokens, positions = [p[-1] for p in PROMPTS], [len(p) - 1 for p in PROMPTS]
        want = step.decode(whole, wcache, tokens, positions)
        h = tokens
        for stage, cache in zip(stages, caches):
            h = step.decode(stage, cache, h, positions)
        assert want.shape == (len(PROMPTS), tiny_config.vocab_size)  # logits of the new token
        assert torch.equal(h, want)
        # and the cached step agrees with an uncached forward of the same context
        ref = step.forward_context(whole, PROMPTS[0])
        assert ref.shape == (1, tiny_config.vocab_size)
        torch.testing.assert_close(want[0], ref[0], atol=1e-5, rtol=0)


def test_forward_context_over_stages_equals_the_whole_model(tiny_config, make_model):
    whole = make_model(tiny_config)
    with torch.inference_mode():
        want = step.forward_context(whole, PROMPTS[0])
        h = PROMPTS[0]
        for stage in split(whole, [0, 2, 3]):
            h = step.forward_context(stage, h)
    assert torch.equal(h, want)
