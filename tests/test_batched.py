"""Batched decode (one GEMM per layer for all rows), the --batch-invariant option,
attention over the filled part of the cache only, and int8 stages in cached
generation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdi.generate import SamplingConfig, generate
from mdi.generate.step import decode, prefill
from mdi.model import GPT, fused_ops, layers
from mdi.model.quant import quantize_linears

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]


def _decode_steps(model: GPT, prompts: list[list[int]], steps: int, together: bool
                  ) -> list[torch.Tensor]:
    """Greedy decode logits per step: all rows in one cache, or each row alone."""
    groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
    caches = [model.new_cache(len(g)) for g in groups]
    seqs = [list(p) for p in prompts]
    out = []
    with torch.inference_mode():
        for g, cache in zip(groups, caches):
            for row, s in enumerate(g):
                if len(seqs[s]) > 1:
                    prefill(model, cache, row, seqs[s][:-1])
        for _ in range(steps):
            step = torch.empty(len(prompts), model.config.vocab_size)
            for g, cache in zip(groups, caches):
                logits = decode(model, cache, [seqs[s][-1] for s in g], [len(seqs[s]) - 1 for s in g])
                step[g] = logits
            out.append(step)
            for s in range(len(prompts)):
                seqs[s].append(int(step[s].argmax()))
    return out


def test_batched_decode_close_to_rows_alone_and_invariant_mode_bitwise(tiny_config, make_model):
    model = make_model(tiny_config, seed=5)
    assert model.batch_invariant is False  # batched is the default
    alone = _decode_steps(model, PROMPTS, 6, together=False)
    batched = _decode_steps(model, PROMPTS, 6, together=True)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    model.batch_invariant = True
    invariant = _decode_steps(model, PROMPTS, 6, together=True)
    for a, b in zip(_decode_steps(model, PROMPTS, 6, together=False), invariant):
        assert torch.equal(a, b)


def test_batched_decode_uses_one_gemm_per_layer(tiny_config, make_model, monkeypatch):
    """Without --batch-invariant no per-row bmm runs; with it, every linear is per row."""
    model = make_model(tiny_config, seed=1)
    calls = {"bmm": 0}
    real_bmm = torch.bmm

    def counting_bmm(*a, **k):
        calls["bmm"] += 1
        return real_bmm(*a, **k)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    cache = model.new_cache(3)
    with torch.inference_mode():
        decode(model, cache, [1, 2, 3], [0, 0, 0])
        assert calls["bmm"] == 0
        model.batch_invariant = True
        decode(model, cache, [1, 2, 3], [1, 1, 1])
    assert calls["bmm"] == 4 * tiny_config.n_layer + 1  # c_attn, c_proj, c_fc, c_proj + head


def test_attention_reads_only_the_filled_part_of_the_cache(tiny_config, make_model, monkeypatch):
    """(torch's path: the fused decode kernel reads each row's own positions by
    construction, tests/test_fused_ops.py)"""
    monkeypatch.setitem(fused_ops._state, "ops", None)
    model = make_model(tiny_config, seed=2)
    key_lens: list[int] = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        key_lens.append(k.shape[2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
    cache = model.new_cache(2)
    assert cache.max_len == tiny_config.block_size
    with torch.inference_mode():
        prefill(model, cache, 0, [1, 2, 3, 4])
        assert set(key_lens) == {4}  # a 4-token prefill attends over 4 keys, not block_size
        key_lens.clear()
        decode(model, cache, [5, 6], [4, 0])
        assert set(key_lens) == {5}  # max position of the step + 1
        key_lens.clear()
        model.batch_invariant = True
        decode(model, cache, [7, 8], [5, 1])
        assert key_lens == [6, 2] * tiny_config.n_layer  # each row its own length


def test_batch_invariant_tokens_do_not_depend_on_grouping(tiny_config, make_model):
    model = make_model(tiny_config, seed=7)
    model.batch_invariant = True
    sampling = SamplingConfig(temperature=1.0, top_k=None, seed=3)
    n = 2 * tiny_config.block_size + 3  # through the context-overflow policy
    runs = [generate(model, PROMPTS, n, sampling, n_groups=g) for g in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_int8_cached_generation_equals_int8_uncached(tiny_config, make_model, batch_invariant):
    """int8 activations are quantized per token, so a cached decode sees the same
    int8 numbers as a full forward: greedy tokens agree with the uncached reference."""
    model = quantize_linears(make_model(tiny_config, seed=8))
    model.batch_invariant = batch_invariant
    n = tiny_config.block_size - max(map(len, PROMPTS))  # no window jump
    got = generate(model, PROMPTS, n, GREEDY)
    for prompt, tokens in zip(PROMPTS, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert tokens == seq[len(prompt):]


def test_int8_stage_is_batch_invariant_with_the_option(tiny_config, make_model):
    model = quantize_linears(make_model(tiny_config, seed=9))
    model.batch_invariant = True
    for a, b in zip(_decode_steps(model, PROMPTS, 5, together=False),
                    _decode_steps(model, PROMPTS, 5, together=True)):
        assert torch.equal(a, b)



def test_cached_step_is_built_once_per_forward(tiny_config, make_model, monkeypatch):
    """Mask, length and write positions come from one cached_step per forward:
    no mask when every key is visible (a decode at one position), plain causal
    attention for a prefill, a mask only where rows differ."""
    model = make_model(tiny_config, seed=3)
    steps: list[layers.CachedStep] = []
    real = layers.cached_step

    def recording(input_pos, per_row=False):
        steps.append(real(input_pos, per_row))
        return steps[-1]

    monkeypatch.setattr("mdi.model.gpt.cached_step", recording)
    cache = model.new_cache(2)
    with torch.inference_mode():
        prefill(model, cache, 0, [1, 2, 3])
        prefill(model, cache, 1, [4, 5, 6])
        decode(model, cache, [7, 8], [3, 3])
        decode(model, cache, [9, 10], [4, 1])
    prefill_step, _, same, mixed = steps
    assert (prefill_step.causal, prefill_step.mask, prefill_step.start) == (True, None, 0)
    assert (same.mask, same.start, same.length) == (None, 3, 4)
    assert mixed.start is None and mixed.length == 5
    assert mixed.mask.tolist() == [[[[True] * 5]], [[[True, True, False, False, False]]]]


def test_packed_linears_match_the_plain_layers(tiny_config, make_model, monkeypatch):
    """The prepacked oneDNN weights give the plain nn.Linear's logits (to float
    rounding), follow in-place weight changes, and survive a deepcopy."""
    import copy

    if not layers._HAS_PACKED:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(layers, "PACK_MIN_WEIGHTS", 0)  # tiny layers stay dense otherwise
    model = make_model(tiny_config, seed=4)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        model.packed_linears = False
        plain = model(ids)
        model.packed_linears = True
        packed = model(ids)
        assert "_mdi_packed" in model.lm_head.__dict__  # used under no_grad
        monkeypatch.setattr(layers, "PACK_MIN_WEIGHTS", model.lm_head.weight.numel() + 1)
        del model.lm_head.__dict__["_mdi_packed"]
        torch.testing.assert_close(model(ids), plain, atol=1e-5, rtol=0)
        assert "_mdi_packed" not in model.lm_head.__dict__  # below the size: dense
        monkeypatch.setattr(layers, "PACK_MIN_WEIGHTS", 0)
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
        model.transformer.h["0"].mlp.c_fc.weight.mul_(2)  # in place: repacked
        model.packed_linears = False
        plain2 = model(ids)
        model.packed_linears = True
        torch.testing.assert_close(model(ids), plain2, atol=1e-5, rtol=0)
        assert not torch.allclose(plain2, plain)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(ids), plain2, atol=1e-5, rtol=0)
    out = model(ids)  # autograd on: the plain layers, so training still works
    out.sum().backward()
    assert model.lm_head.weight.grad is not None

def test_configure_stage_packs_at_load_unless_told_not_to(tiny_config, make_model, monkeypatch):
    """The weights a CPU float32 forward packs on first use are packed by
    configure_stage, so the first token does not wait; not with pack=False (a node
    without room for the copy) nor with --batch-invariant (per-row on the plain
    weights); the logits are the same either way."""
    from mdi.model.quant import configure_stage

    if not layers._HAS_PACKED:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(layers, "PACK_MIN_WEIGHTS", 0)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    linears = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.Linear)]  # noqa: E731
    model = configure_stage(make_model(tiny_config, seed=4).eval())
    assert model.packed_linears and all("_mdi_packed" in x.__dict__ for x in linears(model))
    plain = configure_stage(make_model(tiny_config, seed=4).eval(), pack=False)
    assert not plain.packed_linears and not any("_mdi_packed" in x.__dict__ for x in linears(plain))
    inv = configure_stage(make_model(tiny_config, seed=4).eval(), batch_invariant=True)
    assert not any("_mdi_packed" in x.__dict__ for x in linears(inv))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=0)


def test_packing_at_load_keeps_one_copy_of_each_weight(tiny_config, make_model, monkeypatch):
    """Issue 20.4: the packed copy replaces the plain weight (its storage given back;
    shape and dtype still read), except a tied head's, whose rows the embedding looks
    up; the logits equal those of a stage that kept both copies (bit for bit: the same
    packed kernel), a deepcopy computes the same, and a path that needs the plain
    weight (per-row, autograd) refuses with an error instead of computing on nothing."""
    import copy

    from mdi.model.quant import configure_stage

    if not layers._HAS_PACKED:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(layers, "PACK_MIN_WEIGHTS", 0)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    both = make_model(tiny_config, seed=4).eval()
    layers.pack_linears(both, one_copy=False)
    one = configure_stage(make_model(tiny_config, seed=4).eval())
    linears = [m for m in one.modules() if isinstance(m, torch.nn.Linear)]
    given_up = [m for m in linears if m.weight.is_meta]
    assert given_up and all(not layers.has_plain_weight(m) for m in given_up)
    assert set(linears) - set(given_up) == {one.lm_head}  # tied to wte: kept
    assert one.lm_head.weight is one.transformer.wte.weight and not one.lm_head.weight.is_meta
    assert [m.weight.shape for m in linears] == [
        m.weight.shape for m in both.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        assert torch.equal(one(ids), both(ids))
        assert torch.equal(copy.deepcopy(one)(ids), both(ids))
        cache = one.new_cache(1)
        assert cache.kv[0].device.type == "cpu"  # not the meta device of a given-up weight
        one.batch_invariant = True
        with pytest.raises(RuntimeError, match="keeps only oneDNN's packed copy"):
            one(ids, torch.arange(5)[None], cache)
    one.batch_invariant = False
    with pytest.raises(RuntimeError, match="load with pack=False"):
        one(ids)  # autograd on


def test_init_request_carries_the_runtime_options():
    from pydantic import ValidationError

    from mdi.model.quant import QUANT_MODES
    from mdi.ring.node.control_messages import InitRequest

    body = {"run_id": 1, "role": "finisher", "start": 1, "stop": 2, "model": {}, "groups": [[0, 1]],
            "next": {"addr": "127.0.0.1", "port": 5000}, "prev_addr": "127.0.0.1"}
    req = InitRequest.model_validate(body)
    assert req.quantize is None and req.batch_invariant is False
    req = InitRequest.model_validate({**body, "quantize": "int8", "batch_invariant": True})
    assert req.quantize == "int8" and req.batch_invariant is True
    for mode in QUANT_MODES:  # every --quantize mode travels, and nothing else
        assert InitRequest.model_validate({**body, "quantize": mode}).quantize == mode
    with pytest.raises(ValidationError, match="quantize"):
        InitRequest.model_validate({**body, "quantize": "int4-g16"})


def test_int4_is_refused_at_init_off_the_cpu():
    from mdi.ring.node.validate import InitError, check_quantize

    check_quantize("int4", "cpu")
    check_quantize("int8", "cuda:0")
    with pytest.raises(InitError, match="quantize: int4-g64 runs on CPU only.*cuda:0"):
        check_quantize("int4-g64", "cuda:0")


def test_configure_stage(tiny_config, make_model):
    from mdi.model.quant import Int8Linear, configure_stage

    model = configure_stage(make_model(tiny_config), "int8", True)
    assert model.batch_invariant is True and isinstance(model.lm_head, Int8Linear)
    plain = configure_stage(make_model(tiny_config), None, False)
    assert plain.batch_invariant is False and type(plain.lm_head) is torch.nn.Linear


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes", [2, 3])
def test_int8_ring_equals_int8_sample(tmp_path, n_nodes):
    """--quantize int8 travels in /init: every node quantizes its own stage the same
    way, so the ring's tokens equal the single-device int8 run's."""
    from cluster_helpers import TEXT, build_tiny_ckpt
    from test_e2e_ring import DIST, gen_args, mdi_json

    ckpt = build_tiny_ckpt(tmp_path / "ckpt")
    gen = gen_args(n_samples=3, n_tokens=40, prompts=(TEXT[:5],), temperature=0.8, top_k=200,
                   seed=3) + ["--quantize", "int8"]
    base, _ = mdi_json("sample", "--ckpt", ckpt, *gen)
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", n_nodes, *DIST, *gen)
    assert out["samples"] == base["samples"]


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes", [2, 3])
def test_int4_ring_equals_int4_sample(tmp_path, n_nodes):
    """--quantize int4 travels in /init: every node quantizes its float stage as it
    arrives (group 32 codes, the tied head int8 on the finisher as on one device),
    so the ring's tokens equal the single-device int4 run's, and differ from int8's."""
    from cluster_helpers import TEXT, build_tiny_ckpt
    from test_e2e_ring import DIST, gen_args, mdi_json

    ckpt = build_tiny_ckpt(tmp_path / "ckpt")
    gen = gen_args(n_samples=3, n_tokens=40, prompts=(TEXT[:5],), temperature=0.8, top_k=200,
                   seed=3)
    base, _ = mdi_json("sample", "--ckpt", ckpt, *gen, "--quantize", "int4")
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", n_nodes, *DIST, *gen, "--quantize", "int4")
    assert out["samples"] == base["samples"]
    int8, _ = mdi_json("sample", "--ckpt", ckpt, *gen, "--quantize", "int8")
    assert int8["samples"] != base["samples"]  # int4 really ran
