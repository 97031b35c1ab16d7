"""The model: cached == uncached (with the context-overflow policy), stages chained
== whole model, batch invariance of the cached forward, config validation."""
from __future__ import annotations

import pytest
import torch

from mdi.generate import local
from mdi.generate.local import LocalGenerator, decode, prefill
from mdi.generate.sampling import SamplingConfig
from mdi.model import GPT, GPTConfig

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)


def reference_generate(model: GPT, prompt: list[int], n_tokens: int
                       ) -> tuple[list[int], torch.Tensor, int]:
    """Greedy generation with full uncached forwards over the current window.

    The window rule of mdi/generate/schedule.py, written out independently:
    when the context would exceed block_size, keep the newest block_size // 2
    tokens, which then sit at positions 0.. . Returns (new tokens, per-step
    logits (n_tokens, V), number of window jumps).
    """
    bs = model.config.block_size
    tokens, window, jumps, logits = list(prompt), 0, 0, []
    with torch.no_grad():
        for _ in range(n_tokens):
            if len(tokens) - window > bs:
                window = len(tokens) - bs // 2
                jumps += 1
            step_logits = model(torch.tensor([tokens[window:]]))[0, -1]  # (V,)
            logits.append(step_logits)
            tokens.append(int(torch.argmax(step_logits)))
    return tokens[len(prompt):], torch.stack(logits), jumps


def cached_generate(model: GPT, prompts: list[list[int]], n_tokens: int, monkeypatch,
                    n_groups: int = 1) -> tuple[list[list[int]], list[torch.Tensor], list[list[int]]]:
    """Run LocalGenerator greedily, recording the logits of every decode and the
    length of every prefill. Returns (tokens per sample, logits (n_tokens, V) per
    sample, prefill lengths per sample)."""
    decoded: list[torch.Tensor] = []
    prefilled: list[tuple[int, int]] = []  # (id of the cache, row, length)

    def recording_decode(model, cache, tokens, positions):
        out = decode(model, cache, tokens, positions)
        decoded.append(out.clone())
        return out

    def recording_prefill(model, cache, row, tokens):
        prefilled.append((id(cache), row, len(tokens)))
        prefill(model, cache, row, tokens)

    monkeypatch.setattr(local, "decode", recording_decode)
    monkeypatch.setattr(local, "prefill", recording_prefill)
    gen = LocalGenerator(model, prompts, GREEDY, n_groups)
    for _ in gen.generate(n_tokens):
        pass
    # decoded holds, for each step, one (len(group), V) tensor per group in order.
    per_sample: list[list[torch.Tensor]] = [[] for _ in prompts]
    groups = gen.groups
    for i, out in enumerate(decoded):
        group = groups[i % len(groups)]
        for row, s in enumerate(group):
            per_sample[s].append(out[row])
    cache_ids = [id(c) for c in gen.caches]
    prefill_lens: list[list[int]] = [[] for _ in prompts]
    for cid, row, n in prefilled:
        g = cache_ids.index(cid)
        prefill_lens[groups[g][row]].append(n)
    return ([s.generated for s in gen.states], [torch.stack(x) for x in per_sample], prefill_lens)


@pytest.mark.parametrize("prompt_len", [1, 7, 16])
def test_cached_generation_equals_uncached_with_overflow(tiny_config, make_model, monkeypatch,
                                                         prompt_len):
    model = make_model(tiny_config, seed=prompt_len)
    bs = tiny_config.block_size
    prompt = [(3 * i + 1) % tiny_config.vocab_size for i in range(prompt_len)]
    n_tokens = 3 * bs  # crosses block_size several times
    ref_tokens, ref_logits, jumps = reference_generate(model, prompt, n_tokens)
    tokens, logits, prefills = cached_generate(model, [prompt], n_tokens, monkeypatch)

    assert logits[0].shape == (n_tokens, tiny_config.vocab_size)
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)
    assert tokens[0] == ref_tokens
    # The overflow policy really ran: one prefill of the prompt (if any) plus one
    # re-prefill of block_size//2 - 1 tokens per window jump.
    assert jumps >= 2
    first = [prompt_len - 1] if prompt_len > 1 else []
    assert prefills[0] == first + [bs // 2 - 1] * jumps


def test_cached_group_with_rows_resetting_at_different_steps(tiny_config, make_model, monkeypatch):
    """Three samples in one cache whose windows jump at different steps: a row's
    reset must not disturb its neighbours, and stale keys must stay masked."""
    model = make_model(tiny_config, seed=11)
    prompts = [[5], [(7 * i) % 48 for i in range(7)], [(5 * i + 2) % 48 for i in range(16)]]
    n_tokens = 2 * tiny_config.block_size + 3
    tokens, logits, _ = cached_generate(model, prompts, n_tokens, monkeypatch)
    for s, prompt in enumerate(prompts):
        ref_tokens, ref_logits, _ = reference_generate(model, prompt, n_tokens)
        torch.testing.assert_close(logits[s], ref_logits, atol=1e-5, rtol=0)
        assert tokens[s] == ref_tokens


def test_prompt_longer_than_block_size_is_windowed(tiny_config, make_model, monkeypatch):
    model = make_model(tiny_config, seed=4)
    prompt = [(i * 11) % 48 for i in range(tiny_config.block_size + 5)]
    ref_tokens, ref_logits, jumps = reference_generate(model, prompt, 10)
    tokens, logits, prefills = cached_generate(model, [prompt], 10, monkeypatch)
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)
    assert tokens[0] == ref_tokens
    assert prefills[0][0] == tiny_config.block_size // 2 - 1  # the prompt itself was cut


def split_model(full: GPT, k: int) -> tuple[GPT, GPT]:
    cfg = full.config
    sd = full.state_dict()
    first, second = GPT(cfg, 0, k).eval(), GPT(cfg, k, cfg.n_layer).eval()
    for stage in (first, second):
        keys = set(stage.state_dict())
        assert keys <= set(sd)
        stage.load_state_dict({name: sd[name] for name in keys}, strict=True)
    return first, second


@pytest.mark.parametrize("k", [1, 2])
def test_chained_stages_equal_whole_model_uncached(tiny_config, make_model, k):
    full = make_model(tiny_config, seed=2)
    first, second = split_model(full, k)
    assert first.has_embeddings and not first.has_head
    assert second.has_head and not second.has_embeddings
    assert "transformer.wte.weight" not in second.state_dict()
    assert "transformer.h.0.attn.c_attn.weight" not in second.state_dict()
    assert f"transformer.h.{k}.attn.c_attn.weight" in second.state_dict()
    idx = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = first(idx)
        assert hidden.shape == (2, tiny_config.block_size, tiny_config.n_embd)
        # The same operations in the same order: bitwise equal.
        assert torch.equal(second(hidden), full(idx))


@pytest.mark.parametrize("k", [1, 2])
def test_chained_stages_equal_whole_model_cached(tiny_config, make_model, k):
    full = make_model(tiny_config, seed=3)
    first, second = split_model(full, k)
    prompt = [1, 9, 17, 4, 30]
    caches = [first.new_cache(1), second.new_cache(1)]
    assert len(caches[0].k) == k and len(caches[1].k) == tiny_config.n_layer - k
    full_cache = full.new_cache(1)
    with torch.no_grad():
        pos = torch.arange(len(prompt))[None]
        ids = torch.tensor([prompt])
        second(first(ids, pos, caches[0]), pos, caches[1], logits=False)
        prefill(full, full_cache, 0, prompt)
        tokens = list(prompt)
        for _ in range(8):
            p = torch.tensor([[len(tokens) - 1]])
            t = torch.tensor([[tokens[-1]]])
            staged = second(first(t, p, caches[0]), p, caches[1])[:, -1]
            whole = decode(full, full_cache, [tokens[-1]], [len(tokens) - 1])
            uncached = full(torch.tensor([tokens]))[:, -1]
            assert torch.equal(staged, whole)
            torch.testing.assert_close(staged, uncached, atol=1e-5, rtol=0)
            tokens.append(int(staged.argmax()))


def test_cached_decode_is_batch_invariant_bitwise(tiny_config, make_model):
    """Row b of a group's cached decode == decoding sample b alone, bit for bit.
    This is what lets distributed runs (other groupings) equal single-device runs."""
    model = make_model(tiny_config, seed=5)
    model.batch_invariant = True  # groupings differ: exact only with the option
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]
    group = model.new_cache(3)
    alone = [model.new_cache(1) for _ in prompts]
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            if len(p) > 1:
                prefill(model, group, row, p[:-1])
                prefill(model, alone[row], 0, p[:-1])
        seqs = [list(p) for p in prompts]
        for _ in range(6):
            last = [s[-1] for s in seqs]
            pos = [len(s) - 1 for s in seqs]
            batched = decode(model, group, last, pos)
            assert batched.shape == (3, tiny_config.vocab_size)
            for row in range(3):
                single = decode(model, alone[row], [last[row]], [pos[row]])
                assert torch.equal(batched[row], single[0]), f"row {row} differs"
            for row, s in enumerate(seqs):
                s.append(int(batched[row].argmax()))


def test_generated_tokens_do_not_depend_on_group_size(tiny_config, make_model):
    model = make_model(tiny_config, seed=6)
    model.batch_invariant = True  # groupings differ: exact only with the option
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    sampling = SamplingConfig(temperature=1.0, top_k=None, seed=7)
    outs = []
    for n_groups in (1, 2, 3):
        gen = LocalGenerator(model, prompts, sampling, n_groups)
        for _ in gen.generate(2 * tiny_config.block_size):
            pass
        outs.append([s.generated for s in gen.states])
    assert outs[0] == outs[1] == outs[2]
    assert len(set(map(tuple, outs[0]))) == 3  # three distinct samples


def test_forward_errors(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs input_pos"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1))
    for start, stop in [(0, 0), (2, 1), (-1, 2), (0, 4)]:
        with pytest.raises(ValueError, match="invalid layer range"):
            GPT(tiny_config, start, stop)


def test_tied_head_and_parameter_count(tiny_config):
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    c = tiny_config
    per_block = 12 * c.n_embd ** 2 + 13 * c.n_embd  # with biases
    total = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - c.block_size * c.n_embd


# -- configuration ---------------------------------------------------------------------------

def test_config_round_trip():
    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.head_size == 8


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
def test_config_rejects_non_positive(field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be a positive integer, got 0"):
        GPTConfig(**{field: 0})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"n_embd \(33\) must be divisible by n_head \(2\)"):
        GPTConfig(n_embd=33, n_head=2)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        GPTConfig(block_size=True)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="swish")


def test_config_from_dict_rejects_unknown_and_mistyped_fields():
    with pytest.raises(ValueError, match="unknown model config field\\(s\\): bogus, n_layers"):
        GPTConfig.from_dict({"n_layers": 2, "bogus": 1, "n_head": 2})
    with pytest.raises(ValueError, match="'n_layer' must be int"):
        GPTConfig.from_dict({"n_layer": "2"})
    with pytest.raises(ValueError, match="'bias' must be bool"):
        GPTConfig.from_dict({"bias": 1})
    with pytest.raises(ValueError, match="must be a JSON object"):
        GPTConfig.from_dict([1, 2])
    assert GPTConfig.from_dict({"dropout": 0}).dropout == 0
