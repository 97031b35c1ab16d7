"""Data preparation (train/val token files, tokenizer, meta) and batches."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mdi.data import DataError, Dataset, prepare, read_text, token_dtype
from mdi.tokenizer import load_tokenizer

FILES = {"train.bin", "val.bin", "tokenizer.json", "meta.json"}


def test_prepare_char_writes_the_data_set(char_data_dir, text_file, shakespeare_text):
    d = char_data_dir
    assert FILES <= {p.name for p in d.iterdir()}
    meta = json.loads((d / "meta.json").read_text())
    n = len(shakespeare_text)
    assert meta == {"vocab_size": len(set(shakespeare_text)), "tokenizer": "char", "dtype": "uint16",
                    "train_tokens": n - int(n * 0.1), "val_tokens": int(n * 0.1),
                    "source": str(text_file.resolve()), "characters": n}
    assert (d / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (d / "val.bin").stat().st_size == 2 * meta["val_tokens"]
    tok = load_tokenizer(d / "tokenizer.json")
    train = np.fromfile(d / "train.bin", dtype=np.uint16)
    val = np.fromfile(d / "val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == tok.encode(shakespeare_text)
    assert tok.decode(val.tolist()) == shakespeare_text[-meta["val_tokens"]:]


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_val_fraction_is_honoured(tmp_path, text_file, shakespeare_text, fraction):
    meta = prepare(text_file, tmp_path, "char", None, fraction)
    n = len(shakespeare_text)
    assert meta["val_tokens"] == int(n * fraction)
    assert meta["train_tokens"] == n - int(n * fraction)
    assert (tmp_path / "val.bin").stat().st_size == 2 * int(n * fraction)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(tmp_path, text_file, fraction):
    with pytest.raises(DataError, match="--val-fraction must be between 0 and 1"):
        prepare(text_file, tmp_path / "out", "char", None, fraction)
    assert not (tmp_path / "out").exists()


def test_prepare_bpe(tmp_path, text_file, shakespeare_text):
    meta = prepare(text_file, tmp_path, "bpe", 300, 0.1)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    ids = np.concatenate([np.fromfile(tmp_path / f, dtype=np.uint16) for f in ("train.bin", "val.bin")])
    assert len(ids) == meta["train_tokens"] + meta["val_tokens"] < len(shakespeare_text)
    assert tok.decode(ids.tolist()) == shakespeare_text


@pytest.mark.parametrize("vocab,dtype", [(1, np.uint16), (65, np.uint16), (65535, np.uint16),
                                         (65536, np.uint32), (100_000, np.uint32)])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_prepare_uses_uint32_for_a_huge_vocabulary(tmp_path):
    """70,000 distinct characters: ids past 65,535 must survive the round trip."""
    alphabet = "".join(chr(0x10000 + i) for i in range(70_000))
    src = tmp_path / "wide.txt"
    src.write_text(alphabet + alphabet[::-1], encoding="utf-8")
    meta = prepare(src, tmp_path / "data", "char", None, 0.5)
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    assert (tmp_path / "data" / "train.bin").stat().st_size == 4 * 70_000
    ds = Dataset.load(tmp_path / "data")
    assert ds.train.dtype == np.uint32
    assert ds.train.tolist() == list(range(70_000))
    assert ds.val.tolist() == list(range(69_999, -1, -1))
    x, y = ds.batch("val", 2, 69_999, np.random.default_rng(0))  # the only window: offset 0
    assert x.dtype == torch.int64 and int(x[0, 0]) == 69_999 and int(y[0, -1]) == 0
    assert torch.equal(y, x - 1)  # val counts down


def test_non_utf8_input(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("così è\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_unusable_input(tmp_path):
    with pytest.raises(DataError, match="input file not found: .*nope.txt"):
        prepare(tmp_path / "nope.txt", tmp_path / "out")
    with pytest.raises(DataError, match="input file not found"):
        read_text(tmp_path)  # a directory
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "short.txt").write_text("ab")
    with pytest.raises(DataError, match="too short"):
        prepare(tmp_path / "short.txt", tmp_path / "out")
    (tmp_path / "ok.txt").write_text("hello world\n" * 10)
    with pytest.raises(DataError, match="--vocab-size applies to --tokenizer bpe only"):
        prepare(tmp_path / "ok.txt", tmp_path / "out", "char", 500)
    with pytest.raises(DataError, match="unknown tokenizer 'word'"):
        prepare(tmp_path / "ok.txt", tmp_path / "out", "word")


@pytest.mark.parametrize("missing", sorted(FILES))
def test_load_names_the_missing_file(tmp_path, char_data_dir, missing):
    d = tmp_path / "data"
    shutil.copytree(char_data_dir, d)
    (d / missing).unlink()
    with pytest.raises(DataError, match=f"has no {missing}: run `mdi prepare` first"):
        Dataset.load(d)


def test_load_malformed_meta(tmp_path, char_data_dir):
    d = tmp_path / "data"
    shutil.copytree(char_data_dir, d)
    (d / "meta.json").write_text('{"vocab_size": 5}')
    with pytest.raises(DataError, match="meta.json is malformed"):
        Dataset.load(d)
    (d / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match="meta.json is malformed"):
        Dataset.load(d)


def test_load_and_batches(char_data_dir, shakespeare_text):
    ds = Dataset.load(char_data_dir)
    assert ds.tokenizer.vocab_size == ds.meta["vocab_size"] == len(set(shakespeare_text))
    assert len(ds.train) == ds.meta["train_tokens"] and len(ds.val) == ds.meta["val_tokens"]
    B, T = 5, 32
    for split, data in (("train", ds.train), ("val", ds.val)):
        x, y = ds.batch(split, B, T, np.random.default_rng(1))
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(data, np.int64), T + 1)
        for b in range(B):
            row = np.concatenate([x[b].numpy(), y[b, -1:].numpy()])
            assert (windows == row).all(axis=1).any(), f"{split} row {b} is not a slice of the split"
    a = ds.batch("train", B, T, np.random.default_rng(7))
    b = ds.batch("train", B, T, np.random.default_rng(7))
    c = ds.batch("train", B, T, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_batch_block_size_too_large(char_data_dir):
    ds = Dataset.load(char_data_dir)
    n = len(ds.val)
    with pytest.raises(DataError, match=f"the val split has {n} tokens.*--block-size"):
        ds.batch("val", 2, n, np.random.default_rng(0))
    x, _ = ds.batch("val", 2, n - 1, np.random.default_rng(0))  # the largest that fits
    assert x.shape == (2, n - 1)
    assert torch.equal(x[0], torch.from_numpy(np.asarray(ds.val[:-1], np.int64)))


def test_prepare_reports_paths(tmp_path, text_file):
    meta = prepare(text_file, tmp_path / "nested" / "out")
    assert Path(meta["source"]).is_absolute()
    assert FILES <= {p.name for p in (tmp_path / "nested" / "out").iterdir()}
