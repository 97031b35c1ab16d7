"""A --quantize int4 ring over a GGUF: the starter streams each node the file's own
int4 codes (and int8 rows for the wider block formats), and the node's stage equals
the one a single device loads from the file; the quantized parts are checked as
they arrive, and a bad one is refused naming the tensor."""
from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import save as st_save

gguf = pytest.importorskip("gguf")
from test_int4 import LLAMA, q4_gguf  # noqa: E402,F401  (the fixture)

from mdi.checkpoint.format import CheckpointError, StageBuilder  # noqa: E402
from mdi.checkpoint.quant_parts import pack_codes, unpack_codes  # noqa: E402
from mdi.checkpoint.sources import load_stage, open_checkpoint  # noqa: E402
from mdi.checkpoint.stream import (WeightsStreamError, iter_stream, quantized_layers,  # noqa: E402
                                   shard_bytes)
from mdi.model.int4 import Int4Linear, int4_kernel_available  # noqa: E402
from mdi.model.quant import Int8Linear  # noqa: E402
from mdi.ring.plan.partition import Shard  # noqa: E402

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel")


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def built(config, start, stop, data: bytes, mode: str = "int4", dtype=torch.float32):
    """What a node's stage_from_stream does: the stream parsed and put as it arrives."""
    async def main():
        b = StageBuilder(config, start, stop, dtype=dtype, quantize=mode)
        async for name, t in iter_stream(_chunks(data), b.stream_want):
            b.put(name, t)
        return b.finish()
    return asyncio.run(main())


def assert_same_stage(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def test_codes_pack_two_to_a_byte_and_back():
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (48, 32) and int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4
    assert torch.equal(unpack_codes(packed), codes)


@pytest.mark.parametrize("start, stop", [(0, 1), (1, 2), (0, 2)])
def test_streamed_gguf_int4_stage_equals_the_single_device_one(q4_gguf, start, stop):
    ck = open_checkpoint(str(q4_gguf))
    config = ck.config
    layers = {p: form for p, (form, _) in quantized_layers(ck, Shard(start, stop, 2), "int4").items()}
    if start == 1:  # layer 1: a Q8_0 matrix and a gate|up pair with a Q5_0 half; the tied head
        assert layers == {"transformer.h.1.attn.c_attn": "int4", "transformer.h.1.attn.c_proj": "int8",
                          "transformer.h.1.mlp.c_fc": "int8", "transformer.h.1.mlp.c_proj": "int4",
                          "lm_head": "int8"}
    else:  # with the embedding the tied head is the table's: not sent apart
        assert "lm_head" not in layers and layers["transformer.h.0.mlp.c_proj"] == "int4"
    data = shard_bytes(ck, Shard(start, stop, 2), "int4")
    got = built(config, start, stop, data)
    want, _ = load_stage(ck, start, stop, quantize="int4")
    assert_same_stage(got, want)
    assert any(isinstance(m, Int4Linear) for m in got.modules())
    # the codes cross, not the floats: about a sixth of the float stream's bytes for the matrices
    assert len(data) < 0.5 * len(shard_bytes(ck, Shard(start, stop, 2)))


def test_a_stream_kept_for_a_spare_equals_a_fresh_one(q4_gguf):
    """What the starter keeps for a spare (ring/starter/stream_cache.py) is the stream."""
    from mdi.checkpoint.stream import shard_stream
    from mdi.ring.starter.stream_cache import StreamCache
    ck = open_checkpoint(str(q4_gguf))
    shard = Shard(1, 2, ck.config.n_layer)
    cache = StreamCache(limit=1 << 30)
    total, chunks = shard_stream(ck, shard, "int4")
    assert b"".join(cache.tee((1, 2), total, chunks)) == shard_bytes(ck, shard, "int4")
    kept_total, kept = cache.get((1, 2))
    assert kept_total == total and b"".join(kept) == shard_bytes(ck, shard, "int4")


def test_other_modes_and_float_sources_stream_floats(q4_gguf, tmp_path, make_model):
    from mdi.checkpoint.format import save_checkpoint
    ck = open_checkpoint(str(q4_gguf))
    shard = Shard(1, 2, 2)
    assert quantized_layers(ck, shard, "int8") == {} and quantized_layers(ck, shard, None) == {}
    # a coarser group than the file's: floats, quantized by the node as one device does
    assert {form for form, _ in quantized_layers(ck, shard, "int4-g64").values()} == {"int8"}
    got = built(ck.config, 1, 2, shard_bytes(ck, shard, "int4-g64"), "int4-g64")
    assert_same_stage(got, load_stage(ck, 1, 2, quantize="int4-g64")[0])
    # the head's int8 rows are made from the run's dtype, as the node would make them
    half = shard_bytes(ck, shard, "int4", torch.float16)
    assert half != shard_bytes(ck, shard, "int4")
    got = built(ck.config, 1, 2, half, dtype=torch.float16)
    assert_same_stage(got, load_stage(ck, 1, 2, dtype=torch.float16, quantize="int4")[0])
    ours = save_checkpoint(tmp_path / "ck", make_model(LLAMA, seed=1), None)
    assert quantized_layers(open_checkpoint(ours), Shard(1, 3, 3), "int4") == {}


def _stream(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def _parts(q4_gguf):
    """The tensors of stage [1, 2) as the starter streams them, by name."""
    ck = open_checkpoint(str(q4_gguf))

    async def read():
        b = StageBuilder(ck.config, 1, 2, quantize="int4")
        return {n: t async for n, t in iter_stream(_chunks(shard_bytes(ck, Shard(1, 2, 2), "int4")),
                                                   b.stream_want)}
    return ck.config, asyncio.run(read())


@pytest.mark.parametrize("case, change, error, match", [
    ("codes as float", lambda t: {"transformer.h.1.mlp.c_proj.int4_codes":
                                  t["transformer.h.1.mlp.c_proj.int4_codes"].float()},
     CheckpointError, r"'transformer.h.1.mlp.c_proj.int4_codes' has dtype torch.float32, expected "
                      r"torch.uint8"),
    ("infinite scale", lambda t: {"transformer.h.1.mlp.c_proj.int4_scale":
                                  t["transformer.h.1.mlp.c_proj.int4_scale"].index_fill(1, torch.tensor([0]),
                                                                                       float("inf"))},
     CheckpointError, r"'transformer.h.1.mlp.c_proj.int4_scale' holds non-finite values"),
    ("short codes", lambda t: {"transformer.h.1.mlp.c_proj.int4_codes":
                               t["transformer.h.1.mlp.c_proj.int4_codes"][:, :-1]},
     WeightsStreamError, r"'transformer.h.1.mlp.c_proj.int4_codes' has shape \(64, 127\)"),
    ("int8 rows as uint8", lambda t: {"transformer.h.1.attn.c_proj.weight":
                                      t["transformer.h.1.attn.c_proj.weight"].view(torch.uint8)},
     CheckpointError, r"'transformer.h.1.attn.c_proj.weight' has dtype torch.uint8, expected torch.int8"),
    ("a part missing", lambda t: {"transformer.h.1.mlp.c_proj.int4_zero": None},
     WeightsStreamError, r"missing tensor 'transformer.h.1.mlp.c_proj.int4_zero'"),
    ("uint8 for a norm", lambda t: {"transformer.h.1.ln_1.weight":
                                    t["transformer.h.1.ln_1.weight"].to(torch.uint8)},
     CheckpointError, r"'transformer.h.1.ln_1.weight' has dtype torch.uint8, expected floating"),
])
def test_bad_quantized_parts_are_refused_by_name(q4_gguf, case, change, error, match):
    config, tensors = _parts(q4_gguf)
    for name, t in change(tensors).items():
        if t is None:
            del tensors[name]
        else:
            tensors[name] = t
    with pytest.raises(error, match=match):
        built(config, 1, 2, _stream(tensors))


def test_a_node_builds_the_gguf_int4_stage_from_the_stream(q4_gguf):
    """NodeRuntime.init + load_weights (the node's own path) with the codes' stream."""
    from mdi.ring.cluster.nodes_config import NodeSpec
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime

    ck = open_checkpoint(str(q4_gguf))
    spec = NodeSpec(role="finisher", index=0, addr="127.0.0.1", port=3, port_in=1, port_out=2)

    async def main():
        rt = NodeRuntime(spec, "t" * 32)
        req = InitRequest(run_id=5, role="finisher", start=1, stop=2, model=ck.config.to_dict(),
                          groups=[[0, 2]], next={"addr": "127.0.0.1", "port": 9},
                          prev_addr="127.0.0.1", quantize="int4",
                          sampling={"temperature": 0.0, "top_k": None, "seed": 1})
        await rt.init(req)
        await rt.load_weights(5, _chunks(shard_bytes(ck, Shard(1, 2, 2), "int4"), 4096))
        return rt.run.stage

    stage = asyncio.run(main())
    want, _ = load_stage(ck, 1, 2, quantize="int4")
    assert isinstance(stage.transformer.h["1"].attn.c_proj, Int8Linear)
    sa, sb = stage.state_dict(), want.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_int4_checkpoint_of_a_gguf_keeps_the_files_codes(q4_gguf, tmp_path):
    """`mdi convert x.gguf --quantize int4` stores the file's Q4 codes as they are (the
    wider block formats as int8 rows), and its stages, loaded or streamed, equal the
    GGUF's loaded with --quantize int4."""
    from safetensors.torch import load_file

    from mdi.checkpoint.gguf_int4 import int4_from_blocks
    from mdi.checkpoint.sources import convert_to_ours

    ck = open_checkpoint(str(q4_gguf))
    out = convert_to_ours(ck, tmp_path / "q", quantize="int4")
    sd = load_file(out / "model.safetensors")
    t = {t.name: t for t in gguf.GGUFReader(q4_gguf).tensors}["blk.0.ffn_down.weight"]
    down = int4_from_blocks(t.data, "Q4_K", (64, 256), t.name)  # no permutation
    p = "transformer.h.0.mlp.c_proj"
    assert torch.equal(sd[f"{p}.int4_codes"], pack_codes(down.codes))
    assert torch.equal(sd[f"{p}.int4_scale"], down.scale) and torch.equal(sd[f"{p}.int4_zero"], down.zero)
    # a Q8_0 matrix: int8 rows, not a requantization to int4
    assert sd["transformer.h.1.attn.c_proj.weight"].dtype == torch.int8
    assert "transformer.h.1.attn.c_proj.int4_codes" not in sd
    for start, stop in [(0, 2), (0, 1), (1, 2)]:
        want, _ = load_stage(ck, start, stop, quantize="int4")
        assert_same_stage(load_stage(out, start, stop)[0], want)
        assert_same_stage(built(ck.config, start, stop, shard_bytes(out, Shard(start, stop, 2))), want)


@pytest.mark.slow
def test_gguf_int4_ring_equals_the_single_device_run(q4_gguf):
    """`mdi run --quantize int4` on a Q4 GGUF: the node gets the file's codes, so the
    ring's tokens equal one device's (requantizing the streamed floats did not)."""
    from test_e2e_ring import DIST, gen_args, mdi_json

    gen = gen_args(n_samples=2, n_tokens=20, prompts=("hello",), temperature=0.8, top_k=20,
                   seed=1) + ["--quantize", "int4"]
    base, _ = mdi_json("sample", "--ckpt", q4_gguf, *gen)
    out, _ = mdi_json("run", "--ckpt", q4_gguf, "--nodes", "2", *DIST, *gen)
    assert out["samples"] == base["samples"]
