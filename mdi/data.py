"""Data sets: encode a text file into train/val token files, and draw batches.

Layout of a data directory (as nanoGPT): train.bin and val.bin hold the token
ids as raw uint16 (uint32 when the vocabulary exceeds 65,535); tokenizer.json;
meta.json with the vocabulary size, token counts, dtype and source.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set that is missing or cannot be used."""


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def prepare(input_path: str | Path, out_dir: str | Path, tokenizer: str = "char",
            vocab_size: int | None = None, val_fraction: float = 0.1) -> dict:
    """Encode input_path with a tokenizer trained on it; write out_dir. Returns meta."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    text = read_text(input_path)
    if not text:
        raise DataError(f"{input_path} is empty")
    if tokenizer == "char":
        if vocab_size is not None:
            raise DataError("--vocab-size applies to --tokenizer bpe only")
        tok: Tokenizer = CharTokenizer.train(text)
    elif tokenizer == "bpe":
        tok = BPETokenizer.train(text, vocab_size or 1000)
    else:
        raise DataError(f"unknown tokenizer {tokenizer!r} (choose char or bpe)")
    ids = np.array(tok.encode(text), dtype=token_dtype(tok.vocab_size))
    n_val = max(1, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise DataError(f"{input_path} is too short to split into train and val")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids[:-n_val].tofile(out / "train.bin")
    ids[-n_val:].tofile(out / "val.bin")
    save_tokenizer(tok, out / "tokenizer.json")
    meta = {"vocab_size": tok.vocab_size, "tokenizer": tok.kind, "dtype": ids.dtype.name,
            "train_tokens": int(len(ids) - n_val), "val_tokens": int(n_val),
            "source": str(Path(input_path).resolve()), "characters": len(text)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %d train / %d val tokens, vocabulary %d", out, meta["train_tokens"],
             meta["val_tokens"], tok.vocab_size)
    return meta


@dataclass
class Dataset:
    dir: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer

    @classmethod
    def load(cls, data_dir: str | Path) -> "Dataset":
        d = Path(data_dir)
        for name in ("meta.json", "train.bin", "val.bin", "tokenizer.json"):
            if not (d / name).is_file():
                raise DataError(f"{d} has no {name}: run `mdi prepare` first")
        try:
            meta = json.loads((d / "meta.json").read_text())
            dtype = np.dtype(meta["dtype"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{d / 'meta.json'} is malformed: {e}") from None
        train = np.memmap(d / "train.bin", dtype=dtype, mode="r")
        val = np.memmap(d / "val.bin", dtype=dtype, mode="r")
        return cls(d, meta, train, val, load_tokenizer(d / "tokenizer.json"))

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        if len(data) <= block_size:
            raise DataError(f"the {split} split has {len(data)} tokens, fewer than block_size+1 "
                            f"({block_size + 1}); use a smaller --block-size")
        ix = rng.integers(0, len(data) - block_size, size=batch_size)
        x = np.stack([data[i:i + block_size].astype(np.int64) for i in ix])
        y = np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix])
        return torch.from_numpy(x), torch.from_numpy(y)
