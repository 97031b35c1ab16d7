"""Character and byte-level BPE tokenizers: round trips, vocabulary sizes, JSON files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from mdi.tokenizer import (BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer,
                           save_tokenizer, tokenizer_from_json)

DATA = Path(__file__).resolve().parents[1] / "data"
TEXTS = {"divina": DATA / "divina_commedia.txt", "shakespeare": DATA / "tinyshakespeare.txt"}


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in TEXTS.items()}


@pytest.fixture(scope="module")
def bpe(texts):
    """Trained tokenizers, cached: (text name, vocab size) -> BPETokenizer."""
    cache: dict[tuple[str, int], BPETokenizer] = {}

    def get(name: str, vocab: int) -> BPETokenizer:
        if (name, vocab) not in cache:
            cache[name, vocab] = BPETokenizer.train(texts[name], vocab)
        return cache[name, vocab]
    return get


# -- char ---------------------------------------------------------------------------------------

def test_char_round_trip_and_ids():
    tok = CharTokenizer.train("hello, world\n")
    assert tok.itos == sorted(set("hello, world\n"))
    assert tok.vocab_size == 10
    assert tok.encode("hello") == [tok.stoi[c] for c in "hello"]
    assert tok.encode("\n ,") == [0, 1, 2]
    assert tok.decode(tok.encode("world, hello\n")) == "world, hello\n"
    assert tok.encode("") == [] and tok.decode([]) == ""


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="aàbè ,\n’«»", max_size=60))
def test_char_round_trip_property(text):
    tok = CharTokenizer(list("aàbè ,\n’«»"))
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text)


def test_char_unknown_character_is_named():
    tok = CharTokenizer.train("abc def")
    with pytest.raises(TokenizerError) as e:
        tok.encode("abc Zebra€")
    msg = str(e.value)
    assert "'Z'" in msg and "'€'" in msg and "'r'" in msg
    assert "7-character vocabulary" in msg and "offset 4" in msg


def test_char_decode_out_of_range_and_bad_vocab():
    tok = CharTokenizer.train("ab")
    with pytest.raises(TokenizerError, match="out of range for a vocabulary of 2"):
        tok.decode([0, 2])
    with pytest.raises(TokenizerError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(TokenizerError, match="distinct single characters"):
        CharTokenizer(["a", "bc"])


# -- BPE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["divina", "shakespeare"])
def test_bpe_round_trips_whole_text(texts, bpe, name):
    text = texts[name]
    tok = bpe(name, 1000)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges really compress the text
    assert max(ids) < tok.vocab_size


def test_bpe_round_trips_accents_punctuation_and_unseen_text(texts, bpe):
    tok = bpe("divina", 2000)
    text = texts["divina"]
    assert {"è", "ò", "ù"} <= set(text)  # the file holds accents the test relies on
    verse = ("  Nel mezzo del cammin di nostra vita\nmi ritrovai per una selva oscura\n"
             "ché la diritta via era smarrita.\n  Ahi quanto a dir qual era è cosa dura\n")
    assert verse in text
    ids = tok.encode(verse)
    assert tok.decode(ids) == verse
    # Byte-level: anything round-trips, even text the tokenizer never saw.
    for s in ["perché sì, così è!\n", "«Ahi!»; — ‘virtù’…\t\r\n", "日本語 🎉  two  spaces\n\n",
              " leading space", "trailing newline\n"]:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("name", ["divina", "shakespeare"])
@pytest.mark.parametrize("vocab", [500, 1000, 2000, 10000])
def test_bpe_vocabulary_size_is_honoured(texts, bpe, name, vocab):
    tok = bpe(name, vocab)
    # Both texts are large enough to support 10,000 merged tokens: exactly the request.
    assert tok.vocab_size == vocab
    assert len(json.loads(tok.to_json())["model"]["vocab"]) == vocab
    sample = texts[name][:20000]
    assert tok.decode(tok.encode(sample)) == sample


def test_bpe_larger_vocabulary_gives_fewer_tokens(texts, bpe):
    text = texts["divina"]
    counts = [len(bpe("divina", v).encode(text)) for v in (500, 1000, 2000, 10000)]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


def test_bpe_vocabulary_capped_by_a_short_text():
    """A text too short for the request stops when every word is one token:
    vocab = 256 byte tokens + the merges that exist, fewer than asked."""
    text = "the cat sat on the mat.\nthe dog sat.\n"
    tok = BPETokenizer.train(text, 1000)
    merges = json.loads(tok.to_json())["model"]["merges"]
    assert tok.vocab_size == 256 + len(merges) < 1000
    words = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    assert len(tok.encode(text)) == len(words) == 13
    assert tok.decode(tok.encode(text)) == text


def test_bpe_too_small_vocabulary_raises():
    with pytest.raises(TokenizerError, match=r"--vocab-size 256 is too small .*\(minimum 257\)"):
        BPETokenizer.train("some text", 256)
    with pytest.raises(TokenizerError, match="too small"):
        BPETokenizer.train("some text", 10)
    assert BPETokenizer.train("some text here, some text there", 257).vocab_size == 257


# -- JSON files ---------------------------------------------------------------------------------

def test_json_round_trip_char(tmp_path):
    tok = CharTokenizer.train("Nel mezzo, così è.\n«»")
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"type": "char", "vocab": tok.itos}
    loaded = load_tokenizer(path)
    assert isinstance(loaded, CharTokenizer) and loaded.kind == "char"
    assert loaded.itos == tok.itos
    assert loaded.encode("così è") == tok.encode("così è")


def test_json_round_trip_bpe(tmp_path, texts, bpe):
    tok = bpe("divina", 500)
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer) and loaded.kind == "bpe"
    assert loaded.vocab_size == 500
    sample = texts["divina"][:5000]
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.decode(loaded.encode(sample)) == sample


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"type": "char", "vocab": "abc"}', "'vocab' must be a list of strings"),
    ('{"type": "char", "vocab": ["a", 1]}', "'vocab' must be a list of strings"),
    ('{"type": "char", "vocab": ["ab"]}', "distinct single characters"),
    ('{"type": "char"}', "'vocab' must be a list of strings"),
    ('{"hello": "world"}', "not a char or Hugging Face tokenizer file"),
    ("[1, 2, 3]", "not a char or Hugging Face tokenizer file"),
])
def test_corrupt_tokenizer_json(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)


def test_truncated_bpe_json(bpe):
    text = bpe("shakespeare", 500).to_json()
    with pytest.raises(TokenizerError, match="not valid JSON"):
        tokenizer_from_json(text[: len(text) // 2])
    broken = json.loads(text)
    broken["model"]["merges"] = 5
    with pytest.raises(TokenizerError, match="not a char or Hugging Face tokenizer file"):
        tokenizer_from_json(json.dumps(broken))


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
