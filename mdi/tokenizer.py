"""Tokenizers: character-level, byte-level BPE (Hugging Face `tokenizers`), and
pretrained models' tokenizer.json with their special-token settings (HFTokenizer).

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
    eos_ids: tuple[int, ...]      # ids that end a sample (empty: none known)
    chat_template: str | None     # jinja2 source from tokenizer_config.json, if any

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_json(self) -> str: ...


class CharTokenizer:
    kind = "char"
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None

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
            bad = list(dict.fromkeys(c for c in text if c not in self.stoi))  # in the text's order
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
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None

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


class HFTokenizer(BPETokenizer):
    """A pretrained model's tokenizer.json, with what its config files say about
    special tokens: BOS added when the model expects it (`add_bos_token`, or the
    tokenizer's own post-processor), `eos_ids` (generation_config's
    eos_token_id and tokenizer_config's eos_token), and the `chat_template`."""
    kind = "hf"

    def __init__(self, tok, tokenizer_config: dict | None = None,
                 generation_config: dict | None = None) -> None:
        super().__init__(tok)
        self.tokenizer_config = dict(tokenizer_config or {})
        self.generation_config = dict(generation_config or {})
        tc, gc = self.tokenizer_config, self.generation_config
        self.bos_id = self._id(tc.get("bos_token"))
        if self.bos_id is None and isinstance(gc.get("bos_token_id"), int):
            self.bos_id = gc["bos_token_id"]
        self.add_bos = bool(tc.get("add_bos_token", False)) and self.bos_id is not None
        eos = gc.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        tok_eos = self._id(tc.get("eos_token"))
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        self.eos_ids: tuple[int, ...] = tuple(ids)
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None

    def _id(self, token) -> int | None:
        if isinstance(token, dict):  # AddedToken as saved: {"content": ..., ...}
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    @classmethod
    def from_parts(cls, tokenizer_json: str, tokenizer_config: dict | None = None,
                   generation_config: dict | None = None) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFTok

        try:
            tok = HFTok.from_str(tokenizer_json)
        except Exception as e:  # the library raises bare Exceptions on bad files
            raise TokenizerError(f"not a Hugging Face tokenizer.json: {e}") from None
        return cls(tok, tokenizer_config, generation_config)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids


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
    """The tokenizer at path; an HFTokenizer when tokenizer_config.json sits beside it."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    text = path.read_text(encoding="utf-8")
    configs = [path.parent / "tokenizer_config.json", path.parent / "generation_config.json"]
    if configs[0].is_file():
        try:
            tc, gc = (json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {} for p in configs)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path.parent}: tokenizer_config.json or generation_config.json "
                                 f"is not valid JSON: {e}") from None
        return HFTokenizer.from_parts(text, tc, gc)
    return tokenizer_from_json(text)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(tok.to_json(), encoding="utf-8")
