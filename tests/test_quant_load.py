"""int8 at load time, tensor by tensor, and int8 checkpoints (`mdi convert --quantize int8`).

The reference is the old way: load the float stage whole, then quantize it
(`configure_stage(stage, "int8")`). Every new way must equal it bit for bit:
each loader (ours, a Hugging Face directory), a node building its stage from
the weights stream, and a checkpoint stored int8.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from mdi.checkpoint import CheckpointError, LoadOptions, load_model, load_stage, read_info, save_checkpoint
from mdi.checkpoint.format import StageBuilder
from mdi.checkpoint.sources import convert_to_ours
from mdi.checkpoint.stream import iter_stream, shard_bytes
from mdi.model import GPT, GPTConfig
from mdi.model.quant import Int8Embedding, Int8Linear, configure_stage, weight_bytes
from mdi.ring.plan.partition import Shard
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model
from hf_helpers import make_hf_dir

TIED = GPTConfig(vocab_size=40, block_size=16, n_layer=4, n_head=2, n_embd=32)
UNTIED = GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                   intermediate_size=48, norm="rmsnorm", positions="rope", activation="swiglu",
                   bias=False, tie_embeddings=False)
RANGES = [(0, None), (0, 1), (1, 3), (2, None)]


def _ckpt(tmp_path, config: GPTConfig, name: str = "ckpt"):
    tok = CharTokenizer([chr(48 + i) for i in range(config.vocab_size)])
    return save_checkpoint(tmp_path / name, scaled_random_model(config, seed=3, std=0.1), tok)


def assert_same_stage(got: GPT, ref: GPT) -> None:
    """Same module types, same tensors (values, dtypes), same tying, same logits."""
    assert [type(m) for m in got.modules()] == [type(m) for m in ref.modules()]
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    if got.has_embeddings and got.has_head and got.config.tie_embeddings:
        assert got.lm_head.weight is got.transformer.wte.weight
        assert got.lm_head.scale is got.transformer.wte.scale
    for m_got, m_ref in zip(got.modules(), ref.modules()):
        if isinstance(m_got, Int8Embedding):
            assert m_got.out_dtype == m_ref.out_dtype
    torch.manual_seed(0)
    if got.has_embeddings:
        x = torch.randint(0, got.config.vocab_size, (2, 9))
    else:
        x = torch.randn(2, 9, got.config.n_embd, dtype=next(ref.parameters()).dtype)
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))


def old_way(spec, start, stop, dtype=None) -> GPT:
    stage, _ = load_stage(spec, start, stop, dtype=dtype)
    return configure_stage(stage, "int8")


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
@pytest.mark.parametrize("start,stop", RANGES)
def test_int8_while_loading_equals_load_then_quantize(tmp_path, config, start, stop):
    ck = _ckpt(tmp_path, config)
    got, _ = load_stage(ck, start, stop, quantize="int8")
    assert isinstance(next(m for m in got.modules() if isinstance(m, (Int8Linear, torch.nn.Linear))),
                      Int8Linear)
    assert_same_stage(got, old_way(ck, start, stop))


def test_int8_while_loading_in_bfloat16_equals_load_then_quantize(tmp_path):
    ck = _ckpt(tmp_path, TIED)
    got = load_model(ck, LoadOptions(dtype=torch.bfloat16, quantize="int8")).model
    assert got.transformer.wte.out_dtype == torch.bfloat16
    assert_same_stage(got, old_way(ck, 0, None, torch.bfloat16))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-llama3rope"])
def test_int8_while_loading_a_hugging_face_dir(tmp_path, name):
    hf = make_hf_dir(tmp_path / name, name)
    for start, stop in [(0, None), (1, 3)]:
        got, _ = load_stage(hf, start, stop, quantize="int8")
        assert_same_stage(got, old_way(hf, start, stop))


def test_load_takes_the_run_options(tmp_path):
    ck = _ckpt(tmp_path, TIED)
    model = load_model(ck, LoadOptions(batch_invariant=True)).model
    assert model.batch_invariant and isinstance(model.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model(ck, LoadOptions(quantize="int3"))


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_node_builds_its_int8_stage_from_the_stream_as_it_arrives(tmp_path):
    """What NodeRuntime.load_weights does: each streamed tensor straight into the stage."""
    ck = _ckpt(tmp_path, TIED)
    config = read_info(ck).config

    async def build(start, stop):
        b = StageBuilder(config, start, stop, quantize="int8")
        async for name, t in iter_stream(_chunks(shard_bytes(ck, Shard(start, stop, 4))), b.want):
            b.put(name, t)
        return b.finish()

    for start, stop in [(1, 3), (2, 4)]:
        assert_same_stage(asyncio.run(build(start, stop)), old_way(ck, start, stop))


def test_builder_names_what_is_wrong(tmp_path):
    b = StageBuilder(TIED, 1, 3)
    with pytest.raises(CheckpointError, match="'transformer.h.0.ln_1.weight' is not part"):
        b.put("transformer.h.0.ln_1.weight", torch.ones(32))
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.ln_1.weight' has shape \(31,\)"):
        b.put("transformer.h.1.ln_1.weight", torch.ones(31))
    with pytest.raises(CheckpointError, match="missing tensor 'transformer.h.1.ln_1.weight' and"):
        b.finish()


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_int8_checkpoint_gives_the_load_time_quantized_stage(tmp_path, config):
    ck = _ckpt(tmp_path, config)
    out = convert_to_ours(ck, tmp_path / "int8", quantize="int8")
    info = read_info(out)
    assert (info.quantized, info.float_dtype) == ("int8", "float32")
    assert json.loads((out / "config.json").read_text())["quantize"] == {"mode": "int8",
                                                                       "dtype": "float32"}
    # a quarter of the float file, give or take the scales, norms and biases
    ratio = (out / "model.safetensors").stat().st_size / (ck / "model.safetensors").stat().st_size
    assert 0.25 < ratio < 0.4, ratio
    for start, stop in RANGES:
        got, _ = load_stage(out, start, stop)  # int8 without being asked: what it holds
        assert_same_stage(got, old_way(ck, start, stop))
    whole = load_model(out, LoadOptions(quantize="int8")).model
    assert weight_bytes(whole) == weight_bytes(old_way(ck, 0, None))


def test_int8_checkpoint_is_inspected(tmp_path):
    from mdi.checkpoint.inspect import inspect_checkpoint

    ck = _ckpt(tmp_path, TIED)
    out = convert_to_ours(ck, tmp_path / "int8", quantize="int8")
    got, want = inspect_checkpoint(out), inspect_checkpoint(ck)
    assert got.n_params == want.n_params  # the scales are not counted
    dtypes = {t.name: t.dtype for t in got.tensors}
    assert dtypes["transformer.h.0.attn.c_attn.weight"] == "int8"
    assert dtypes["transformer.h.0.attn.c_attn.scale"] == "float32"


def test_int8_checkpoint_config_is_checked(tmp_path):
    out = convert_to_ours(_ckpt(tmp_path, TIED), tmp_path / "int8", quantize="int8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantize"] = {"mode": "int5", "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="the quantize field must be"):
        read_info(out)


def test_node_runtime_loads_an_int8_stage_equal_to_load_then_quantize(tmp_path):
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime
    from mdi.ring.cluster.nodes_config import NodeSpec

    ck = _ckpt(tmp_path, TIED)
    spec = NodeSpec(role="finisher", index=0, addr="127.0.0.1", port=3, port_in=1, port_out=2)

    async def main():
        rt = NodeRuntime(spec, "t" * 32)
        req = InitRequest(run_id=5, role="finisher", start=2, stop=4, model=TIED.to_dict(),
                          groups=[[0, 2]], next={"addr": "127.0.0.1", "port": 9},
                          prev_addr="127.0.0.1", quantize="int8",
                          sampling={"temperature": 0.0, "top_k": None, "seed": 1})
        await rt.init(req)
        await rt.load_weights(5, _chunks(shard_bytes(ck, Shard(2, 4, 4)), 4096))
        return rt.run.stage

    assert_same_stage(asyncio.run(main()), old_way(ck, 2, 4))
