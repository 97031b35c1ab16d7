"""`mdi convert --quantize` writes tensor by tensor (checkpoint/st_write.py).

The streamed file holds exactly the tensors a whole-model conversion held in memory
(quant_store.quantized_tensors), bit for bit; safetensors' own reader reads it; no
stored tensor outlives its write by more than its layer's other parts; the checkpoint
loads as the load-time quantization of its source, giving the same logits; and a
failed conversion leaves the old checkpoint as it was.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file

from mdi.checkpoint import CheckpointError, LoadOptions, load_model, save_checkpoint
from mdi.checkpoint import quant_store, st_io
from mdi.checkpoint.quant_store import quantized_tensors
from mdi.checkpoint.sources import convert_to_ours, open_checkpoint
from mdi.checkpoint.st_write import TensorFileWriter
from mdi.model import GPTConfig
from mdi.model.int4 import int4_kernel_available
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model

LLAMA = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=128,
                  intermediate_size=256, norm="rmsnorm", positions="rope", activation="swiglu",
                  bias=False, tie_embeddings=False)
GPT2 = GPTConfig(vocab_size=48, block_size=32, n_layer=3, n_head=2, n_embd=64)
MODES = ["int8"] + (["int4", "int4-g64"] if int4_kernel_available() else [])


def _src(tmp_path, config: GPTConfig, dtype=torch.float32):
    tok = CharTokenizer([chr(48 + i) for i in range(config.vocab_size)])
    model = scaled_random_model(config, seed=5, std=0.1).to(dtype)
    return save_checkpoint(tmp_path / "float", model, tok)


def test_the_writer_writes_what_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randint(-128, 127, (4, 4), dtype=torch.int8, generator=g),
               "d": torch.randint(0, 255, (2, 3), dtype=torch.uint8, generator=g),
               "empty": torch.zeros(0, 4), "e": torch.randn(4, 6, generator=g).half()[:, ::2]}
    with TensorFileWriter(tmp_path / "x.safetensors", {"format": "test"}) as w:
        for k, v in tensors.items():
            w.add(k, v)
    got = load_file(tmp_path / "x.safetensors")  # safetensors' own reader
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with st_io.open_file(tmp_path / "x.safetensors") as f:  # ours: checked, in order
        entries, start = st_io.read_header(f, int8=True)
        st_io.in_order(entries)
        assert torch.equal(st_io.read_tensor(f, entries["e"], start), tensors["e"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no side files


def test_the_writer_refuses_a_name_twice_and_an_abort_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="tensor 'a' written twice"):
        with TensorFileWriter(path) as w:
            w.add("a", torch.ones(2))
            w.add("a", torch.ones(2))
    with pytest.raises(ValueError, match=r"tensor 'z' has dtype torch.float64"):
        with TensorFileWriter(path) as w:
            w.add("z", torch.ones(2, dtype=torch.float64))
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["tied", "untied"])
def test_the_streamed_file_holds_the_whole_conversions_tensors(tmp_path, config, mode):
    src = _src(tmp_path, config)
    want = quantized_tensors(open_checkpoint(src), mode)
    out = convert_to_ours(src, tmp_path / "q", quantize=mode)
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # the same model as quantizing at load: same logits, exactly
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    stored = load_model(out).model
    loaded = load_model(src, LoadOptions(quantize=mode)).model
    with torch.inference_mode():
        assert torch.equal(stored(ids)[0], loaded(ids)[0])


@pytest.mark.parametrize("mode", MODES)
def test_no_stored_tensor_is_held_after_its_layer_is_written(tmp_path, monkeypatch, mode):
    """At each write, the tensors written before it are gone but for the parts of the
    layer being written (an int4 layer's codes, scale and zero come together)."""
    src = _src(tmp_path, LLAMA)
    alive_at_add: list[int] = []
    refs: list[weakref.ref] = []

    class Watched(TensorFileWriter):
        def add(self, name, t):
            alive_at_add.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(t))
            super().add(name, t)

    monkeypatch.setattr(quant_store, "TensorFileWriter", Watched)
    convert_to_ours(src, tmp_path / "q", quantize=mode)
    assert len(refs) > 20 and max(alive_at_add) <= 2, alive_at_add


def test_an_in_place_conversion_in_bfloat16_and_a_failed_one(tmp_path, monkeypatch):
    src = _src(tmp_path, LLAMA, torch.bfloat16)
    before = (src / "model.safetensors").read_bytes()

    def broken(self, name, t):
        raise CheckpointError(f"weights: tensor {name!r} is bad")

    with monkeypatch.context() as m:
        m.setattr(quant_store.StoreBuilder, "_keep", broken)
        with pytest.raises(CheckpointError, match="tensor 'transformer.wte.weight' is bad"):
            convert_to_ours(src, src, overwrite=True, quantize=MODES[-1])
    assert (src / "model.safetensors").read_bytes() == before  # the source untouched
    assert sorted(p.name for p in src.iterdir() if "tmp" in p.name) == []
    ref = load_model(src, LoadOptions(quantize=MODES[-1])).model
    out = convert_to_ours(src, src, overwrite=True, quantize=MODES[-1])  # in place
    assert open_checkpoint(out).quantized == MODES[-1]
    assert open_checkpoint(out).float_dtype == "bfloat16"
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        assert torch.equal(load_model(out).model(ids)[0], ref(ids)[0])
