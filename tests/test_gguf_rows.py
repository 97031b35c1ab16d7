"""What a GGUF load keeps, and what it does not hold at once.

A GGUF's block-format matrices read a block of rows at a time (hf_source.Rows): the
int8 rows a load makes from them (the embedding, a tied head, int8 Linears, a wider
format under --quantize int4) equal those of the tensor read whole, bit for bit, and
the embedding is never dequantized whole (SmolLM2's Q8_0 table: 113 MB of float32).
The tokenizer built when the file is opened serves the run (not parsed again from its
text), and the header's vocabulary arrays are not kept beside it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
from tests.test_gguf import TEXTS, write_tiny_gguf  # noqa: E402

from mdi.checkpoint.format import build_stage  # noqa: E402
from mdi.checkpoint.hf_source import Rows  # noqa: E402
from mdi.checkpoint.sources import load_stage, open_checkpoint  # noqa: E402
from mdi.model.quant import configure_stage  # noqa: E402
from mdi.tokenizer import HFTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "untied.gguf"
    write_tiny_gguf(path, tied=False, seed=3)
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "tied.gguf"
    write_tiny_gguf(path, tied=True, seed=4)
    return path


def test_rows_equal_the_whole_read_bit_for_bit(untied):
    src = open_checkpoint(untied).source
    n = 0
    for name in src.shapes:
        rows = src.rows(name)
        if rows is None:  # float tensors and vectors are read whole
            assert len(src.shapes[name]) == 1 or src.formats[name] in ("F32", "F16", "BF16")
            continue
        whole = src.read(name)
        assert rows.shape == whole.shape and rows.mdi_format == src.formats[name]
        pieces = torch.cat([rows[a:a + 7] for a in range(0, rows.shape[0], 7)])
        assert torch.equal(pieces.view(torch.int32), whole.view(torch.int32)), name
        n += 1
    assert n >= 10  # the embedding, the head, q/k (rows un-permuted) and the block formats


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_a_load_from_rows_equals_one_from_whole_tensors(mode, which, request, monkeypatch):
    """load_stage (Rows, quantized 5 rows at a time) == build_stage over whole tensors,
    for the whole model and a last stage (a tied head without its embedding)."""
    path = request.getfixturevalue(which)
    ck = open_checkpoint(path)
    monkeypatch.setattr("mdi.model.quant.ROWS_AT_ONCE", 5)
    whole_reads = []
    read_whole = Rows.whole
    monkeypatch.setattr(Rows, "whole", lambda self: whole_reads.append(self.shape) or read_whole(self))
    pieces = []
    read_rows = Rows.__getitem__
    monkeypatch.setattr(Rows, "__getitem__", lambda self, s: pieces.append(
        (self.shape[0], s.stop - s.start)) or read_rows(self, s))
    idx = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])
    for start, stop in ((0, None), (1, None)):
        got, _ = load_stage(ck, start, stop, quantize=mode, pack=False)
        ref = configure_stage(build_stage(ck.config, start, stop, ck.get, quantize=mode), mode,
                              pack=False)
        a, b = got.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        with torch.no_grad():
            x = idx if start == 0 else torch.randn(1, 7, ck.config.n_embd,
                                                   generator=torch.Generator().manual_seed(0))
            assert torch.equal(got(x), ref(x))
    vocab = ck.config.vocab_size
    # the embedding and the head (int8 rows in both modes) came 5 rows at a time, never whole
    assert all(s[0] != vocab for s in whole_reads), whole_reads
    assert {n for n, _ in pieces} >= {vocab} and max(k for _, k in pieces) == 5


def test_the_tokenizer_built_at_open_is_the_one_its_text_describes(tied):
    ck = open_checkpoint(tied)
    src = ck.source
    tok = ck.tokenizer()
    ref = HFTokenizer.from_parts(src.tokenizer_json, src.tokenizer_config, src.generation_config)
    assert tok.tok is src.tokenizer_built and ck.tokenizer().tok is tok.tok
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text) and tok.decode(ids) == ref.decode(ids)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (ref.bos_id, ref.eos_ids, ref.add_bos)
    fields = src.read.__self__.reader.fields
    assert fields["general.architecture"] == "llama"
    assert not [k for k, v in fields.items() if isinstance(v, list)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_stored_quantized_checkpoint_from_rows_equals_one_from_whole_tensors(mode, untied):
    """`mdi convert --quantize` reads Rows too: the tensors it stores are unchanged."""
    from mdi.checkpoint.quant_store import StoreBuilder, quantized_tensors

    ck = open_checkpoint(untied)
    got = quantized_tensors(ck, mode)
    ref = build_stage(ck.config, 0, None, ck.get, quantize=mode, make=StoreBuilder)
    assert got.keys() == ref.keys()
    for k in got:
        assert torch.equal(got[k], ref[k]), k
