"""int8 weights (mdi/model/quant.py): rounding, batch invariance, tied heads,
memory, and the logit / perplexity change against fp32 on the bundled model and
a GPT-2-shaped random model."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from mdi.checkpoint import load_model
from mdi.model import GPT, GPTConfig
from mdi.model.quant import (Int8Embedding, Int8Linear, int8_matmul, quantize, quantize_linears,
                             quantize_rows, weight_bytes)

from conftest import REPO, SHAKESPEARE

BUNDLED = REPO / "models" / "shakespeare-char"


def test_quantize_rows_rounds_to_nearest_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.rand(37, 1)  # rows of different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert q.abs().max() == 127  # each row's largest value maps to +-127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    ref = x @ q.dequantized().t() + lin.bias  # weight-only reference
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    # Activations are rounded to 8 bits per row: error <= sum_i |w_i| * step_x / 2.
    step = x.abs().amax(-1, keepdim=True) / 127
    bound = step / 2 * q.dequantized().abs().sum(1)
    assert ((y - ref).abs() <= bound * 1.001 + 1e-6).all()
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_int8_linear_is_batch_invariant():
    """A row's output is bit-identical alone or among other rows (exact int accumulation)."""
    torch.manual_seed(1)
    q = Int8Linear.from_linear(nn.Linear(96, 80))
    x = torch.randn(9, 96) * torch.linspace(0.1, 30, 9)[:, None]  # very different row ranges
    together = q(x)
    for i in range(9):
        assert torch.equal(q(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(q(x[2:7]), together[2:7])


def test_zero_rows_give_zeros_and_bias():
    lin = nn.Linear(16, 8)
    q = Int8Linear.from_linear(lin)
    y = q(torch.zeros(3, 16))
    assert torch.equal(y, lin.bias.detach().expand(3, 8))
    assert torch.equal(int8_matmul(torch.zeros(2, 16), q.weight, q.scale), torch.zeros(2, 8))


def test_embedding_rows_are_dequantized_table_rows():
    torch.manual_seed(2)
    emb = nn.Embedding(30, 12)
    qe = Int8Embedding.from_embedding(emb)
    idx = torch.tensor([[0, 5, 29], [3, 3, 7]])
    q, scale = quantize_rows(emb.weight)
    assert torch.equal(qe(idx), (q.float() * scale[:, None])[idx])


def test_tied_head_shares_one_quantized_table_and_matches_split_stages(tiny_config, make_model):
    model = make_model(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    whole = quantize_linears(copy.deepcopy(model))
    head, wte = whole.lm_head, whole.transformer.wte
    assert isinstance(head, Int8Linear) and isinstance(wte, Int8Embedding)
    assert head.weight is wte.weight and head.scale is wte.scale  # shared, not duplicated
    # A first stage (embedding only) and a last stage (head only), quantized on
    # their own nodes, hold the same int8 values as the whole model.
    first, last = GPT(tiny_config, 0, 1), GPT(tiny_config, 1, tiny_config.n_layer)
    sd = model.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in sd.items() if k in last.state_dict()})
    quantize_linears(first)
    quantize_linears(last)
    assert torch.equal(first.transformer.wte.weight, wte.weight)
    assert torch.equal(last.lm_head.weight, head.weight)
    assert torch.equal(last.lm_head.scale, head.scale)
    x = torch.randint(0, tiny_config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(last(first(x)), whole(x))


def test_skip_leaves_named_modules_in_float(tiny_config, make_model):
    model = quantize_linears(make_model(tiny_config), skip=["lm_head", "transformer.wte", "*.wpe",
                                                              "*.mlp.c_fc"])
    assert type(model.lm_head) is nn.Linear and type(model.transformer.wte) is nn.Embedding
    assert type(model.transformer.wpe) is nn.Embedding
    block = model.transformer.h["0"]
    assert type(block.mlp.c_fc) is nn.Linear and isinstance(block.mlp.c_proj, Int8Linear)
    assert isinstance(block.attn.c_attn, Int8Linear)


def test_quantize_by_name():
    lin = nn.Sequential(nn.Linear(4, 4))
    assert quantize(lin, None) is lin and isinstance(lin[0], nn.Linear)
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*int8, int4"):
        quantize(lin, "int3")
    assert isinstance(quantize(lin, "int8")[0], Int8Linear)


def test_int8_weights_take_a_quarter_of_fp32(tiny_config):
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)
    model = GPT(config)
    fp = weight_bytes(model)
    q = weight_bytes(quantize_linears(model))
    # int8 matrices + one float32 scale per row; LayerNorms and biases stay fp32.
    assert q < 0.27 * fp, (q, fp)


def _logits_and_ppl(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    bs = model.config.block_size
    n = (len(ids) - 1) // bs
    x = torch.stack([ids[i * bs:(i + 1) * bs] for i in range(n)])
    y = torch.stack([ids[i * bs + 1:(i + 1) * bs + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return logits, math.exp(loss.item())


def test_bundled_model_logits_and_perplexity_close_to_fp32():
    loaded = load_model(BUNDLED)
    model, info = loaded.model, loaded.checkpoint
    model.eval()
    text = SHAKESPEARE.read_text(encoding="utf-8")[-4096:]  # the end: held out by the split
    ids = torch.tensor(info.tokenizer().encode(text))
    ref, ppl_fp = _logits_and_ppl(model, ids)
    got, ppl_q = _logits_and_ppl(quantize_linears(copy.deepcopy(model)), ids)
    # Measured: ppl 5.772 -> 5.773 (+0.02%), max |dlogit| 0.58 on logits up to ~15,
    # greedy choice kept at ~99% of positions.
    assert abs(ppl_q / ppl_fp - 1) < 0.01, (ppl_fp, ppl_q)
    assert (got - ref).abs().max() < 1.0
    assert (got - ref).abs().mean() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def quantized_error(config: GPTConfig) -> tuple[GPT, float]:
    """(the quantized model, relative logit error of int8 vs fp32) for a random init."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(x)
        got = quantize_linears(model)(x)
    return model, ((got - ref).norm() / ref.norm()).item()


def test_gpt2_shaped_model_logits_close_to_fp32():
    """GPT-2 small's widths and vocabulary (2 of its 12 blocks), GPT-2 initialization."""
    _, rel = quantized_error(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=12,
                                       n_embd=768))
    assert rel < 0.05, rel  # measured 0.029-0.030 (logits of a random init are small)


def test_llama_shaped_model_logits_close_to_fp32():
    """SmolLM2-135M's widths (RMSNorm, RoPE, SwiGLU, 3 KV heads of 9, untied head), 2 blocks."""
    model, rel = quantized_error(GPTConfig(
        vocab_size=4096, block_size=64, n_layer=2, n_head=9, n_kv_head=3, n_embd=576,
        intermediate_size=1536, norm="rmsnorm", positions="rope", activation="swiglu",
        bias=False, tie_embeddings=False))
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight is not \
        model.transformer.wte.weight  # untied: two tables
    assert rel < 0.05, rel  # measured 0.029-0.030 (logits of a random init are small)


def test_kernel_choice_by_rows_one_weight_two_kernels(tiny_config, make_model):
    """Up to few_rows rows the weight-only kernel (bf16 activations) runs, above it the
    bfloat16 GEMM on the converted weight, on the same stored int8 weight; neither
    rounds the activations to 8 bits; --batch-invariant and the head: weight-only at
    any rows, each row on its own."""
    from mdi.model.kernels import FEW_ROWS, weight_only_available
    from mdi.model.quant import configure_stage

    if not weight_only_available():
        pytest.skip("no weight-only int8 kernel")
    model = configure_stage(make_model(tiny_config, seed=0), "int8")
    for lin in (model.transformer.h["0"].attn.c_attn, model.transformer.h["0"].mlp.c_proj):
        assert (lin.few_rows, lin.many_rows) == (FEW_ROWS, FEW_ROWS + 1)
        x = torch.randn(FEW_ROWS + 1, lin.in_features)
        many = lin(x)  # 17 rows: the bfloat16 GEMM
        one = torch.cat([lin(x[r:r + 1]) for r in range(len(x))])  # 1 row: weight-only
        ref = x @ lin.dequantized().t() + lin.bias
        for got in (many, one):  # bfloat16 activations: ~0.3%; 8-bit ones were ~1%
            assert ((got - ref).norm() / ref.norm()).item() < 0.006
        assert not torch.equal(many, one)  # two kernels really ran
    inv = configure_stage(model, "int8", batch_invariant=True)
    for m in (inv.transformer.h["0"].attn.c_attn, inv.transformer.h["0"].mlp.c_proj, inv.lm_head):
        assert m.few_rows >= 1 << 30  # weight-only at any rows, each row on its own
        xs = torch.randn(40, m.in_features)
        assert all(torch.equal(m(xs[r:r + 1]), m(xs)[r:r + 1]) for r in range(0, 40, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_many_rows_gemm_in_either_dtype_equals_the_dequantized_weights(dtype):
    """kernels.dequantized_matmul: bfloat16 where the CPU has it natively, float32
    elsewhere (GEMM_DTYPE); both multiply the exact int8 codes, only the activations'
    rounding differs (float32: the reference's own maths, to float32's last bits)."""
    from mdi.model.kernels import GEMM_DTYPE, dequantized_matmul, native_bf16

    assert GEMM_DTYPE == (torch.bfloat16 if native_bf16() else torch.float32)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(48, generator=g) / 100
    sb = scale.to(torch.bfloat16)
    x = torch.randn(20, 64, generator=g)
    ref = x @ (q.float() * sb.float()[:, None]).t()
    got = dequantized_matmul(x, q, sb, dtype)
    assert got.dtype == dtype
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 6e-3), err


def test_the_head_recomputes_its_best_candidates_in_float32():
    """kernels.refine_top: the weight-only kernel rounds its output to bfloat16 (steps of
    0.125 near 25), so two logits 0.03 apart tie; the head's top candidates come back
    in float32 from the exact int8 rows, the others as the kernel gave them, row by row."""
    from mdi.model.kernels import REFINE_TOP, refine_top, weight_only_available

    if not weight_only_available():
        pytest.skip("no weight-only int8 kernel")
    g = torch.Generator().manual_seed(0)
    head = Int8Linear(64, 200, bias=False)
    head.weight = torch.randint(-127, 128, (200, 64), generator=g, dtype=torch.int8)
    head.scale = torch.full((200,), 0.01)
    x = torch.randn(5, 64, generator=g)
    x[0] = 1.0                                         # row 0: logit 3 = 32.00, logit 7 = 32.03
    head.weight[3] = head.weight[7] = 50
    head.weight[7, 0] = 53
    exact = x @ (head.weight.float() * 0.01).t()
    sb = head.scale.to(torch.bfloat16)
    rounded = torch._weight_int8pack_mm(x.to(torch.bfloat16), head.weight, sb)
    got = refine_top(rounded, x, head.weight, head.scale)
    assert rounded[0, 3] == rounded[0, 7] and int(rounded[0].argmax()) == 3   # a tie, lost
    assert int(got[0].argmax()) == 7                                            # found again
    top = rounded.float().topk(REFINE_TOP, dim=1).indices
    for r in range(5):
        t = top[r]
        assert torch.allclose(got[r, t], exact[r, t], rtol=0, atol=1e-5)   # float32, exactly
        rest = torch.ones(200, dtype=torch.bool)
        rest[t] = False
        assert torch.equal(got[r, rest], rounded[r, rest].float())       # the kernel's values
        assert torch.equal(refine_top(rounded[r:r + 1], x[r:r + 1], head.weight, head.scale),
                           got[r:r + 1])                                  # rows on their own
    assert got.argmax(1).tolist() == exact.argmax(1).tolist()
    head.few_rows = head.many_rows = 1 << 62                             # as configure_stage sets
    head.refine = True
    assert torch.equal(head(x), got) and head(x.bfloat16()).dtype == torch.bfloat16
