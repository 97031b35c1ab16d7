"""Tokenizers: character-level and byte-level BPE (Hugging Face `tokenizers`).

Both are stored as JSON, never pickled. A char tokenizer file is
{"type": "char", "vocab": [...]}; a BPE file is the Hugging Face tokenizer JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class TokenizerError(ValueError):
    """Text or a tokenizer file that cannot be used."""


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_json(self) -> str: ...


class CharTokenizer:
    kind = "char"

    def __init__(self, vocab: list[str]) -> None:
        if len(set(vocab)) != len(vocab) or any(len(c) != 1 for c in vocab):
            raise TokenizerError("a char vocabulary must be a list of distinct single characters")
        self.itos = list(vocab)
        self.stoi = {c: i for i, c in enumerate(vocab)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self.stoi})
            where = text.index(bad[0])
            raise TokenizerError(
                f"character(s) {', '.join(repr(c) for c in bad[:10])} not in the "
                f"{self.vocab_size}-character vocabulary (first at offset {where})") from None

    def decode(self, ids: list[int]) -> str:
        try:
            return "".join(self.itos[i] for i in ids)
        except IndexError:
            raise TokenizerError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def to_json(self) -> str:
        return json.dumps({"type": "char", "vocab": self.itos}, ensure_ascii=False)


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise TokenizerError(
                f"--vocab-size {vocab_size} is too small for byte-level BPE (minimum {len(alphabet) + 1})")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                      show_progress=False, special_tokens=[])
        # Feed the text in line chunks so the trainer can work in parallel.
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)] or [text]
        tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer file is not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("type") == "char":
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab):
            raise TokenizerError("char tokenizer field 'vocab' must be a list of strings")
        return CharTokenizer(vocab)
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # the library raises bare Exceptions on bad files
        raise TokenizerError(f"not a char or Hugging Face tokenizer file: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    return tokenizer_from_json(path.read_text(encoding="utf-8"))


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(tok.to_json(), encoding="utf-8")
