"""Quantized checkpoints (`mdi convert --quantize int8|int4|int4-g64|int4-g128`):
stored as parts (quant_parts.py), loaded, split into chunks and streamed to
nodes as those parts, each way equal to quantizing the float source at load
time, bit for bit; a bad or truncated part refused with the tensor's name; the
checkpoint's mode is the run's, on one device and on a ring alike."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdi.checkpoint import CheckpointError, LoadOptions, load_model, load_stage, read_info, save_checkpoint
from mdi.checkpoint import st_io
from mdi.checkpoint.chunks import load_chunk, read_chunk_info, write_chunks
from mdi.checkpoint.format import StageBuilder, stored_shapes
from mdi.checkpoint.sources import checkpoint_mode, convert_to_ours, open_checkpoint
from mdi.checkpoint.stream import iter_stream, shard_bytes, shard_stream
from mdi.model import GPTConfig
from mdi.model.int4 import Int4Linear, int4_kernel_available
from mdi.model.quant import Int8Linear
from mdi.ring.plan.partition import Shard
from mdi.ring.starter.options import RunOptions, with_mode
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model
from test_quant_load import assert_same_stage

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel")

# tied head, biases, n_embd 64: at group 128 the attention stays int8, the MLP's
# c_proj (K = 256) is int4: both kinds of layer in one checkpoint
GPT2 = GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=2, n_embd=64)
LLAMA = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=128,
                  intermediate_size=256, norm="rmsnorm", positions="rope", activation="swiglu",
                  bias=False, tie_embeddings=False)
RANGES = [(0, None), (0, 1), (1, 3), (2, None)]
CASES = [(GPT2, "int4"), (GPT2, "int4-g128"), (LLAMA, "int4"), (LLAMA, "int4-g64"),
         (LLAMA, "int4-g128")]
IDS = [f"{'tied' if c.tie_embeddings else 'untied'}-{m}" for c, m in CASES]


def _src(tmp_path, config: GPTConfig):
    tok = CharTokenizer([chr(48 + i) for i in range(config.vocab_size)])
    return save_checkpoint(tmp_path / "float", scaled_random_model(config, seed=5, std=0.1), tok)


def _header(path) -> dict:
    with st_io.open_file(path / "model.safetensors") as f:
        return st_io.read_header(f, int8=True)[0]


async def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def built(config, start, stop, data: bytes, mode: str):
    """What a node's stage_from_stream does: the stream parsed and put as it arrives."""
    async def main():
        b = StageBuilder(config, start, stop, quantize=mode)
        async for name, t in iter_stream(_chunks(data), b.stream_want):
            b.put(name, t)
        return b.finish()
    return asyncio.run(main())


@pytest.mark.parametrize("config, mode", CASES, ids=IDS)
def test_int4_checkpoint_gives_the_load_time_int4_stage(tmp_path, config, mode):
    src = _src(tmp_path, config)
    out = convert_to_ours(src, tmp_path / "q", quantize=mode)
    info = read_info(out)
    assert (info.quantized, info.float_dtype) == (mode, "float32")
    entries = _header(out)
    # stored as parts, never in the kernel's packed layout
    assert not any(n.endswith("scales_and_zeros") for n in entries)
    codes = [e for n, e in entries.items() if n.endswith(".int4_codes")]
    assert codes and all(e.dtype == torch.uint8 for e in codes)
    assert entries["transformer.wte.weight"].dtype == torch.int8  # the embedding: int8 rows
    assert "lm_head.weight" not in entries or not config.tie_embeddings
    ratio = (out / "model.safetensors").stat().st_size / (src / "model.safetensors").stat().st_size
    assert ratio < 0.3, ratio
    for start, stop in RANGES:
        got, _ = load_stage(out, start, stop)  # its own mode without being asked
        want, _ = load_stage(src, start, stop, quantize=mode)
        assert_same_stage(got, want)
        assert any(isinstance(m, Int4Linear) for m in got.modules())
    whole = load_model(out, LoadOptions(quantize=mode)).model
    assert_same_stage(whole, load_model(src, LoadOptions(quantize=mode)).model)


def test_int4_checkpoint_in_bfloat16(tmp_path):
    src = _src(tmp_path, GPT2)
    out = convert_to_ours(src, tmp_path / "q", dtype=torch.bfloat16, quantize="int4")
    assert read_info(out).float_dtype == "bfloat16"
    got = load_model(out).model
    assert_same_stage(got, load_model(src, LoadOptions(dtype=torch.bfloat16, quantize="int4")).model)
    # converting it again (in place, as `mdi convert ckpt.pt --quantize` does) keeps it
    again = convert_to_ours(out, out, overwrite=True)
    assert_same_stage(load_model(again).model, got)


@pytest.mark.parametrize("config, mode", [(GPT2, "int8"), (GPT2, "int4"), (LLAMA, "int4-g64")],
                         ids=["tied-int8", "tied-int4", "untied-int4-g64"])
def test_split_quantized_chunks_equal_the_whole_checkpoint(tmp_path, config, mode):
    out = convert_to_ours(_src(tmp_path, config), tmp_path / "q", quantize=mode)
    whole_names = set(_header(out))
    shards = [Shard(0, 1, 3), Shard(1, 2, 3), Shard(2, 3, 3)]
    paths = write_chunks(out, shards, tmp_path / "chunks")
    x = torch.randint(0, config.vocab_size, (2, 7))
    h = x
    for path, shard in zip(paths, shards):
        assert read_chunk_info(path)["quantize"] == mode
        meta = json.loads((path / "config.json").read_text())
        assert meta["quantize"] == {"mode": mode, "dtype": "float32"}
        # only the stage's stored parts (the last one: the tied head as the embedding's rows)
        names = set(_header(path))
        assert names == set(stored_shapes(config, shard.start, shard.stop, mode, whole_names))
        assert names.isdisjoint({n for n in whole_names if ".h.0." in n} if shard.start else set())
        stage = load_chunk(path, config, shard.start, shard.stop)
        assert_same_stage(stage, load_stage(out, shard.start, shard.stop)[0])
        with torch.no_grad():
            h = stage(h)
    with torch.no_grad():
        assert torch.equal(h, load_model(out).model(x))
    with pytest.raises(CheckpointError, match=f"is an {mode} checkpoint.*--quantize int4-g128"):
        load_chunk(paths[1], config, 1, 2, quantize="int4-g128")


@pytest.mark.parametrize("config, mode", [(GPT2, "int8"), (GPT2, "int4"), (LLAMA, "int4-g128")],
                         ids=["tied-int8", "tied-int4", "untied-int4-g128"])
def test_a_streamed_stage_of_a_quantized_checkpoint_equals_the_loaded_one(tmp_path, config, mode):
    src = _src(tmp_path, config)
    out = convert_to_ours(src, tmp_path / "q", quantize=mode)
    for start, stop in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        shard = Shard(start, stop, 3)
        data = shard_bytes(out, shard)
        got = built(config, start, stop, data, mode)
        assert_same_stage(got, load_stage(out, start, stop)[0])
        # the stored parts cross, not floats: a fraction of the float stage's stream
        assert len(data) < 0.4 * len(shard_bytes(src, shard)), (start, stop)
    data = shard_bytes(out, Shard(2, 3, 3))
    header = st_io.parse_header(data[8:8 + st_io.header_length(data[:8])], int8=True)
    if config.tie_embeddings:  # the finisher's head: the embedding's int8 rows, not floats
        assert (header["lm_head.weight"].dtype, header["lm_head.scale"].dtype) == (torch.int8,
                                                                                  torch.float32)
    else:
        assert header["lm_head.int4_codes"].dtype == torch.uint8 and "lm_head.weight" not in header


def test_a_node_builds_its_stage_from_an_int4_checkpoints_stream(tmp_path):
    """NodeRuntime.init + load_weights (the node's own path), told the checkpoint's mode."""
    from mdi.ring.cluster.nodes_config import NodeSpec
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime

    out = convert_to_ours(_src(tmp_path, GPT2), tmp_path / "q", quantize="int4")
    opts = with_mode(RunOptions(), open_checkpoint(out))
    assert opts.quantize == "int4"
    spec = NodeSpec(role="finisher", index=0, addr="127.0.0.1", port=3, port_in=1, port_out=2)

    async def main():
        rt = NodeRuntime(spec, "t" * 32)
        req = InitRequest(run_id=5, role="finisher", start=1, stop=3, model=GPT2.to_dict(),
                          groups=[[0, 2]], next={"addr": "127.0.0.1", "port": 9},
                          prev_addr="127.0.0.1", quantize=opts.quantize,
                          sampling={"temperature": 0.0, "top_k": None, "seed": 1})
        await rt.init(req)
        await rt.load_weights(5, _chunks(shard_bytes(out, Shard(1, 3, 3), opts.quantize), 4096))
        return rt.run.stage

    stage = asyncio.run(main())
    assert isinstance(stage.lm_head, Int8Linear)
    want, _ = load_stage(out, 1, 3)
    sa, sb = stage.state_dict(), want.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_node_loads_its_stage_from_an_int4_chunk_of_the_runs_mode(tmp_path):
    """/init with weights "local" on a node started with an int4 chunk: the stage
    one device loads; a run of another mode is refused naming both."""
    from mdi.ring.cluster.nodes_config import NodeSpec
    from mdi.ring.node.control_messages import InitRequest
    from mdi.ring.node.runtime import NodeRuntime
    from mdi.ring.node.validate import InitError

    out = convert_to_ours(_src(tmp_path, GPT2), tmp_path / "q", quantize="int4")
    paths = write_chunks(out, [Shard(0, 1, 3), Shard(1, 3, 3)], tmp_path / "chunks")
    spec = NodeSpec(role="finisher", index=0, addr="127.0.0.1", port=3, port_in=1, port_out=2)

    async def main(quantize):
        rt = NodeRuntime(spec, "t" * 32, chunk_dir=paths[1])
        assert rt.chunk["quantize"] == "int4"  # what /health tells the starter
        req = InitRequest(run_id=5, role="finisher", start=1, stop=3, model=GPT2.to_dict(),
                          groups=[[0, 2]], next={"addr": "127.0.0.1", "port": 9},
                          prev_addr="127.0.0.1", quantize=quantize, weights="local",
                          sampling={"temperature": 0.0, "top_k": None, "seed": 1})
        await rt.init(req)
        return rt.run.stage

    stage = asyncio.run(main("int4"))
    want, _ = load_stage(out, 1, 3)
    sa, sb = stage.state_dict(), want.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(InitError, match="chunk cannot be loaded: .*is an int4 checkpoint.*--quantize int8"):
        asyncio.run(main("int8"))


def test_a_quantized_checkpoint_sets_the_runs_mode(tmp_path):
    src = _src(tmp_path, GPT2)
    out = convert_to_ours(src, tmp_path / "q", quantize="int4")
    int8 = convert_to_ours(src, tmp_path / "q8", quantize="int8")
    both = r"is an int4 checkpoint \(mdi convert --quantize int4\), it cannot run with --quantize int8"
    with pytest.raises(CheckpointError, match=both):
        load_model(out, LoadOptions(quantize="int8"))
    with pytest.raises(CheckpointError, match="is an int8 checkpoint.*--quantize int4"):
        load_stage(int8, 0, 2, quantize="int4")
    with pytest.raises(CheckpointError, match=both):
        shard_stream(out, Shard(1, 3, 3), "int8")
    with pytest.raises(CheckpointError, match=both):
        with_mode(RunOptions(quantize="int8"), open_checkpoint(out))
    with pytest.raises(CheckpointError, match=both):
        convert_to_ours(out, tmp_path / "again", quantize="int8")
    assert with_mode(RunOptions(), open_checkpoint(int8)).quantize == "int8"
    assert with_mode(RunOptions(quantize="int8"), open_checkpoint(src)).quantize == "int8"
    assert with_mode(RunOptions(), open_checkpoint(src)).quantize is None
    assert checkpoint_mode(out, "int4") == "int4" and checkpoint_mode(src, None) is None


def _tampered(tmp_path, change):
    out = convert_to_ours(_src(tmp_path, LLAMA), tmp_path / "q", quantize="int4")
    sd = load_file(out / "model.safetensors")
    change(sd)
    save_file(sd, out / "model.safetensors")
    return out


P = "transformer.h.1.mlp.c_proj"  # int4: codes (128, 128), scale and zero (128, 8)
BAD = [
    ("codes as int8", lambda sd: sd.update({f"{P}.int4_codes": sd[f"{P}.int4_codes"].view(torch.int8)}),
     rf"'{P}.int4_codes' has dtype torch.int8, expected torch.uint8"),
    ("scale as float16", lambda sd: sd.update({f"{P}.int4_scale": sd[f"{P}.int4_scale"].half()}),
     rf"'{P}.int4_scale' has dtype torch.float16, expected torch.float32"),
    ("short codes", lambda sd: sd.update({f"{P}.int4_codes": sd[f"{P}.int4_codes"][:, :-1].clone()}),
     rf"'{P}.int4_codes' has shape \(128, 127\), the config needs \(128, 128\)"),
    ("infinite zero", lambda sd: sd[f"{P}.int4_zero"].__setitem__((3, 1), float("inf")),
     rf"'{P}.int4_zero' holds non-finite values"),
    ("nan embedding scale", lambda sd: sd["transformer.wte.scale"].__setitem__(0, float("nan")),
     r"'transformer.wte.scale' holds non-finite values"),
    ("float embedding", lambda sd: sd.update({"transformer.wte.weight": sd["transformer.wte.weight"].float()}),
     r"'transformer.wte.weight' has dtype torch.float32, expected torch.int8"),
    ("a part missing", lambda sd: sd.pop(f"{P}.int4_zero"), rf"missing tensor '{P}.int4_zero'"),
    ("a packed weight", lambda sd: sd.update({f"{P}.scales_and_zeros": torch.zeros(2, 128, 2)}),
     rf"unexpected tensor\(s\) {P}.scales_and_zeros"),
]


@pytest.mark.parametrize("case, change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_quantized_tensors_are_refused_by_name(tmp_path, case, change, match):
    out = _tampered(tmp_path, change)
    with pytest.raises(CheckpointError, match=match):
        load_model(out)


def test_bad_parts_are_refused_by_name_in_a_chunk_and_a_stream(tmp_path):
    out = _tampered(tmp_path, BAD[3][1])
    with pytest.raises(CheckpointError, match=BAD[3][2]):
        built(LLAMA, 1, 3, shard_bytes(out, Shard(1, 3, 3)), "int4")
    write_chunks(out, [Shard(0, 1, 3), Shard(1, 3, 3)], tmp_path / "chunks")
    with pytest.raises(CheckpointError, match=BAD[3][2]):
        load_chunk(tmp_path / "chunks" / "node1", LLAMA, 1, 3)


def test_a_truncated_quantized_file_is_refused_naming_the_tensor(tmp_path):
    out = convert_to_ours(_src(tmp_path, LLAMA), tmp_path / "q", quantize="int4")
    last = max(_header(out).values(), key=lambda e: e.begin).name
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"corrupt or unreadable: file ends inside tensor '{last}'"):
        load_model(out)
    shard = Shard(0, 3, 3)
    with pytest.raises(CheckpointError, match=rf"ends inside tensor '{last}'"):
        shard_bytes(out, shard)


def test_convert_quantize_int4_on_the_command_line(tmp_path, capsys):
    from mdi.cli.main import main

    src = _src(tmp_path, GPT2)
    out = tmp_path / "q"
    assert main(["convert", str(src), "--out", str(out), "--quantize", "int4"]) == 0
    assert "weights int4" in capsys.readouterr().out
    assert read_info(out).quantized == "int4"
    gen = ["--n-tokens", "12", "--prompt", "ABC", "--temperature", "0", "--json", "--threads", "1"]
    assert main(["sample", "--ckpt", str(out), *gen]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert main(["sample", "--ckpt", str(src), "--quantize", "int4", *gen]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == stored["samples"]
    assert main(["sample", "--ckpt", str(out), "--quantize", "int8", *gen]) == 1
    assert "cannot run with --quantize int8" in capsys.readouterr().err


@pytest.mark.slow
def test_int4_checkpoint_ring_equals_the_single_device_run(tmp_path):
    """`mdi run` of an int4 checkpoint on 2 local nodes: the node gets its stage's
    stored parts and the run's mode from the checkpoint; greedy tokens equal one
    device's."""
    from test_e2e_ring import DIST, gen_args, mdi_json

    out = convert_to_ours(_src(tmp_path, GPT2), tmp_path / "q", quantize="int4")
    gen = gen_args(n_samples=2, n_tokens=20, prompts=("ABC",), temperature=0.0, top_k=1, seed=1)
    base, _ = mdi_json("sample", "--ckpt", out, *gen)
    ring, _ = mdi_json("run", "--ckpt", out, "--nodes", "2", *DIST, *gen)
    assert ring["samples"] == base["samples"]


def test_an_int4_checkpoint_is_inspected(tmp_path):
    from mdi.checkpoint.inspect import inspect_checkpoint

    src = _src(tmp_path, LLAMA)
    got = inspect_checkpoint(convert_to_ours(src, tmp_path / "q", quantize="int4"))
    assert got.n_params == inspect_checkpoint(src).n_params  # codes count, scales and zeros do not
    dtypes = {t.name: t.dtype for t in got.tensors}
    assert dtypes[f"{P}.int4_codes"] == "uint8" and dtypes[f"{P}.int4_scale"] == "float32"
