"""int4 weights: GGUF Q4_0 / Q4_1 / Q4_K kept as their own codes (checked against the
`gguf` package's dequantization, exactly), `--quantize int4` of float weights, the
int4 linear against its dequantized weight, and int4 stages split == whole."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from test_gguf import K_QUANT_SCALES, write_tiny_gguf  # noqa: E402

from mdi.checkpoint.format import CheckpointError  # noqa: E402
from mdi.checkpoint.gguf_int4 import int4_from_blocks  # noqa: E402
from mdi.checkpoint.sources import LoadOptions, load_model, load_stage, open_checkpoint  # noqa: E402
from mdi.generate import step  # noqa: E402
from mdi.model import GPT, GPTConfig  # noqa: E402
from mdi.model.int4 import Int4Linear, Int4Weight, int4_kernel_available, quantize_groups  # noqa: E402
from mdi.model.quant import Int8Linear, quantize  # noqa: E402

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel")


def blocks(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if qtype in K_QUANT_SCALES:  # random valid blocks (the gguf package cannot quantize Q4_K)
        size, offsets = K_QUANT_SCALES[qtype]
        b = rng.integers(0, 256, size=(shape[0] * shape[1] // 256, size), dtype=np.uint8)
        for off in offsets:
            b[:, off:off + 2] = (rng.random((b.shape[0], 1)) * 0.02 + 1e-3).astype(
                np.float16).view(np.uint8)
        return b.reshape(shape[0], -1)
    w = (0.1 * rng.standard_normal(shape) + 0.03).astype(np.float32)
    return gguf.quants.quantize(w, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_block_formats_map_exactly_onto_int4(qtype):
    rng = np.random.default_rng(int(qtype))
    data = blocks(qtype, (16, 512), rng)
    ref = np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
    w = int4_from_blocks(data, qtype.name, (16, 512), "blk.0.ffn_up.weight")
    assert w.group == 32 and w.codes.max() <= 15 and w.codes.dtype == torch.uint8
    assert np.array_equal(w.dequantize().numpy(), ref)  # bit for bit


def test_truncated_or_bad_blocks_are_refused_by_name():
    data = blocks(Q.Q4_1, (4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="'blk.3.attn_q.weight'"):
        int4_from_blocks(data[:, :-1], "Q4_1", (4, 64), "blk.3.attn_q.weight")
    bad = data.copy()
    bad[0, 0:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="'blk.3.attn_q.weight'.*non-finite"):
        int4_from_blocks(bad, "Q4_1", (4, 64), "blk.3.attn_q.weight")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_groups_within_half_a_step(group):
    w = torch.randn(64, 256)
    q = quantize_groups(w, group)
    err = (q.dequantize() - w).abs().view(64, -1, group)
    assert (err <= q.scale[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="group size"):
        quantize_groups(w, 16)


def test_int4_linear_equals_its_dequantized_weight_and_rows_are_independent():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    q4 = Int4Linear.from_linear(lin)
    w = quantize_groups(lin.weight).dequantize()
    # the kernel's scales are bfloat16: compare with the weight it really holds
    sz = q4.scales_and_zeros.float()
    g = q4.group
    w_kernel = ((quantize_groups(lin.weight).codes.float() - 8).view(192, -1, g)
                * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(192, 256)
    # bfloat16 scale and zero: within a tenth of a quantization step of the exact weight
    step_size = quantize_groups(lin.weight).scale.repeat_interleave(g, 1)
    assert ((w_kernel - w).abs() <= 0.1 * step_size).all()
    x = torch.randn(5, 256)
    ref = (x.bfloat16().float() @ w_kernel.t()) + lin.bias
    got = q4(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
    for r in range(5):  # no cross-row quantization: a row alone gives the same numbers
        assert torch.equal(q4(x[r:r + 1]), got[r:r + 1])


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    """A tiny GGUF whose attention and MLP matrices are all 4-bit block formats."""
    import test_gguf
    layers = [{"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K},
              {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
               "ffn_gate": Q.Q4_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_0}]
    saved = test_gguf.LAYER_TYPES
    test_gguf.LAYER_TYPES = layers
    try:
        path = tmp_path_factory.mktemp("q4") / "q4.gguf"
        write_tiny_gguf(path)
    finally:
        test_gguf.LAYER_TYPES = saved
    return path


def test_gguf_int4_stage_keeps_the_files_codes(q4_gguf):
    ck = open_checkpoint(str(q4_gguf))
    model = load_model(ck, LoadOptions(quantize="int4")).model
    reader = {t.name: t for t in gguf.GGUFReader(q4_gguf).tensors}
    src = ck.source
    # layer 0: q|k|v all Q4_0 -> the fused int4 weight is the file's codes, packed
    parts = [src.read(f"model.layers.0.self_attn.{p}_proj.weight").mdi_int4 for p in "qkv"]
    want = Int4Linear.from_weight(Int4Weight.cat_rows(parts))
    got = model.transformer.h["0"].attn.c_attn
    assert isinstance(got, Int4Linear)
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(got.scales_and_zeros, want.scales_and_zeros)
    t = reader["blk.0.ffn_down.weight"]  # Q4_K, no permutation
    down = int4_from_blocks(t.data, "Q4_K", (64, 256), t.name)
    assert torch.equal(model.transformer.h["0"].mlp.c_proj.weight, Int4Linear.from_weight(down).weight)
    # layer 1: a Q8_0 matrix and a gate|up pair with a Q5_0 half go to int8, not int4
    assert isinstance(model.transformer.h["1"].attn.c_proj, Int8Linear)
    assert isinstance(model.transformer.h["1"].mlp.c_fc, Int8Linear)
    assert isinstance(model.transformer.h["1"].mlp.c_proj, Int4Linear)
    # the logits stay near the float model's on the same (dequantized) weights
    ref = load_model(ck).model
    idx = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        a, b = model(idx), ref(idx)
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_gguf_with_a_truncated_q4_tensor_is_refused_by_name(q4_gguf, monkeypatch):
    from mdi.checkpoint import gguf_int4
    real = gguf_int4.int4_from_blocks
    monkeypatch.setattr("mdi.checkpoint.gguf_tensors.int4_from_blocks",
                        lambda data, q, shape, name: real(data[:, :-2], q, shape, name))
    from mdi.checkpoint.gguf import gguf_source
    src = gguf_source(q4_gguf)
    with pytest.raises(CheckpointError, match="blk.0.attn_k.weight"):
        src.read("model.layers.0.self_attn.k_proj.weight")


LLAMA = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_embd=64, n_kv_head=2,
                  norm="rmsnorm", positions="rope", activation="swiglu", bias=False,
                  intermediate_size=128, tie_embeddings=False)


@pytest.mark.parametrize("mode", ["int4", "int4-g64"])
def test_quantize_int4_of_float_weights_is_close_and_split_equals_whole(make_model, mode, tmp_path):
    from mdi.checkpoint.format import save_checkpoint
    from mdi.model.int4 import Int4Linear as I4
    fp = make_model(LLAMA, seed=1)
    path = save_checkpoint(tmp_path / "ck", fp, None)
    whole = load_model(path, LoadOptions(quantize=mode)).model
    assert sum(isinstance(m, I4) for m in whole.modules()) == 3 * 4 + 1  # and the untied head
    assert {m.group for m in whole.modules() if isinstance(m, I4)} == {int(mode[6:] or 32)}
    ref = quantize(make_model(LLAMA, seed=1), mode)  # quantized after load == while loading
    idx = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])
    with torch.no_grad():
        got, fl = whole(idx), fp(idx)
        assert torch.equal(got, ref(idx))
        # nearer the float model than another float model is (random weights, 3 layers:
        # 4-bit rounding of uniform noise compounds to ~40% of the logits' norm)
        err = ((got - fl).norm() / fl.norm()).item()
        other = ((make_model(LLAMA, seed=2)(idx) - fl).norm() / fl.norm()).item()
        assert 0 < err < other / 2, (err, other)
        a, _ = load_stage(path, 0, 2, quantize=mode)
        b, _ = load_stage(path, 2, None, quantize=mode)
        assert torch.equal(b(a(idx)), got)
        # cached decode through the split stages == the whole int4 model's
        ca, cb, cw = a.new_cache(1), b.new_cache(1), whole.new_cache(1)
        step.prefill(b, cb, 0, step.prefill(a, ca, 0, idx[0, :4].tolist()))
        step.prefill(whole, cw, 0, idx[0, :4].tolist())
        for t in range(4, 7):
            h = step.decode(a, ca, [int(idx[0, t])], [t])
            assert torch.equal(step.decode(b, cb, h, [t]), step.decode(whole, cw, [int(idx[0, t])], [t]))


def test_a_tied_head_is_int8_on_every_split_and_odd_widths_stay_int8(make_model, tmp_path):
    """The ring's last node holds the head without the embedding it is tied to: it
    quantizes it as a whole model does (int8, one scale per vocabulary row), so the
    split int4 model equals the whole one. A width the kernel cannot pack (N % 16)
    is int8 too, on every split alike."""
    from mdi.checkpoint.format import save_checkpoint
    config = GPTConfig.from_dict({**LLAMA.to_dict(), "tie_embeddings": True})  # 64 rows: packable
    path = save_checkpoint(tmp_path / "ck", make_model(config, seed=2), None)
    whole = load_model(path, LoadOptions(quantize="int4")).model
    a, _ = load_stage(path, 0, 2, quantize="int4")
    b, _ = load_stage(path, 2, None, quantize="int4")
    assert isinstance(b.lm_head, Int8Linear) and isinstance(whole.lm_head, Int8Linear)
    assert torch.equal(b.lm_head.weight, whole.lm_head.weight)
    assert isinstance(b.transformer.h["2"].mlp.c_proj, Int4Linear)
    untied = quantize(make_model(GPTConfig.from_dict({**LLAMA.to_dict(), "vocab_size": 72}),
                                 seed=2), "int4")
    assert isinstance(untied.lm_head, Int8Linear)  # 72 rows: not a multiple of 16
    idx = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])
    with torch.no_grad():
        assert torch.equal(b(a(idx)), whole(idx))


@pytest.mark.parametrize("mode, bound", [("int4", 0.3), ("int4-g128", 0.45)])
def test_int4_logits_close_to_fp32(mode, bound):
    """SmolLM2-135M's widths, 2 blocks, its initialization's scale (a wrong mapping
    of codes, scales or zeros gives errors of order 1)."""
    config = GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=9, n_kv_head=3, n_embd=576,
                       intermediate_size=1536, norm="rmsnorm", positions="rope",
                       activation="swiglu", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(x)
        got = quantize(model, mode)(x)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < bound, rel


def test_an_int4_stage_is_not_saved_from_its_packed_weights(make_model, tmp_path):
    from mdi.checkpoint.format import save_checkpoint
    m = quantize(make_model(LLAMA, seed=0), "int4")
    with pytest.raises(CheckpointError, match="packed weights: .*mdi convert --quantize int4"):
        save_checkpoint(tmp_path / "x", m, None)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_gpt_forward_with_int4_is_batch_invariant(make_model):
    m = quantize(make_model(LLAMA, seed=2), "int4")
    assert isinstance(m, GPT)
    cache = m.new_cache(3)
    with torch.no_grad():
        for r in range(3):
            step.prefill(m, cache, r, [r + 1, r + 2, r + 3])
        batched = step.decode(m, cache, [4, 5, 6], [3, 3, 3])
        for r in range(3):
            c1 = m.new_cache(1)
            step.prefill(m, c1, 0, [r + 1, r + 2, r + 3])
            assert torch.equal(step.decode(m, c1, [4 + r], [3])[0], batched[r])


def test_int4_on_another_device_is_refused_with_the_reason(make_model, tmp_path):
    from mdi.checkpoint.format import save_checkpoint
    path = save_checkpoint(tmp_path / "ck", make_model(LLAMA, seed=0), None)
    with pytest.raises(CheckpointError, match="CPU only"):
        load_model(path, LoadOptions(device="meta", quantize="int4"))
