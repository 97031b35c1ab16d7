"""The tokenizer a GGUF file describes (`tokenizer.ggml.*`), as a `tokenizers` Tokenizer.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges, token
types and special-token ids as metadata under llama.cpp's names. For the
byte-level BPE files ("gpt2", the family SmolLM2, Llama 3, Qwen2 use) this
builds the same tokenizer `transformers` builds from the file
(`integrations/gguf/gguf_tokenizer_mapping.py`: GPT2Tokenizer's BPE +
ByteLevel pieces, control tokens as special added tokens, user-defined ones as
plain added tokens, the pre-tokenizer split of the file's `tokenizer.ggml.pre`,
a post-processor adding BOS only when `tokenizer.ggml.add_bos_token` says so),
without importing transformers. tests/test_gguf.py compares the two.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from .format import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# `tokenizer.ggml.pre` -> the split regex its merges were learned with (those transformers knows).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **{k: _LLAMA3 for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{k: _QWEN2 for k in ("qwen2", "deepseek-r1-qwen")},
}
# Anything else ("smollm", "gpt2", "default", ...) gets GPT-2's ByteLevel regex, as in transformers.


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _array(reader: Any, key: str) -> list | None:
    value = reader.fields.get(key)
    return None if value is None else list(value)


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str | None
                    ) -> tuple[Any, dict[str, int]]:
    """The byte-level BPE tokenizer of a GGUF's vocabulary, merges, token types and
    pre-tokenizer name, and its vocabulary (token -> id)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (rare, e.g. a raw special) is respelled from its UTF-8 bytes.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) stay whole and are special; a "control" token spelled
    # outside the byte alphabet is a llama.cpp mislabel and is skipped, as transformers does.
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok, vocab


def build_tokenizer(reader: Any, meta: dict, path: Path) -> tuple[Any, dict, dict]:
    """(tokenizers.Tokenizer, tokenizer_config, ids) from a GGUF's metadata.

    ids holds `tokens` and the special ids; (None, {}, {}) when the file has no tokenizer.
    """
    from tokenizers import processors

    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None, {}, {}
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported "
                              "(only 'gpt2', byte-level BPE)")
    tokens = _array(reader, "tokenizer.ggml.tokens")
    merges = _array(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: a 'gpt2' tokenizer needs tokenizer.ggml.tokens and .merges")
    types = _array(reader, "tokenizer.ggml.token_type") or []

    tok, vocab = _byte_level_bpe(tokens, merges, types, meta.get("tokenizer.ggml.pre"))

    def special(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not 0 <= int(v) < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {v} is outside the vocabulary "
                                  f"of {len(tokens)}")
        return int(v)

    ids: dict[str, Any] = {"tokens": tokens, "bos_token_id": special("bos_token_id"),
                           "eos_token_id": special("eos_token_id"),
                           "unk_token_id": special("unknown_token_id"),
                           "pad_token_id": special("padding_token_id")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = tokens[ids["bos_token_id"]] if ids["bos_token_id"] is not None else None
    eos = tokens[ids["eos_token_id"]] if ids["eos_token_id"] is not None else None
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    # transformers' TokenizersBackend.update_post_processor, spelled out
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = ([(bos, ids["bos_token_id"])] if add_bos else []) \
        + ([(eos, ids["eos_token_id"])] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=specials)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos,
        "unk_token": tokens[ids["unk_token_id"]] if ids["unk_token_id"] is not None else None,
        "pad_token": tokens[ids["pad_token_id"]] if ids["pad_token_id"] is not None else None,
        "add_bos_token": add_bos, "add_eos_token": add_eos,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config, ids
