"""Incremental text with stop strings, nucleus sampling, and the streaming printer."""
from __future__ import annotations

import io

import pytest
import torch

from mdi.cli.stream import StreamPrinter
from mdi.engine.api import Event
from mdi.engine.text import TextStream
from mdi.generate.sampling import SamplingConfig, sample_token, top_p_filter

CHARS = "abcdefghijs<>/ "


def char_decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


def push_all(stream: TextStream, text: str) -> list[tuple[str, bool]]:
    return [stream.push(CHARS.index(c)) for c in text]


def test_text_is_released_as_it_comes_without_stop_strings():
    s = TextStream(char_decode)
    assert push_all(s, "abc") == [("a", False), ("b", False), ("c", False)]
    assert s.flush() == ""


def test_a_possible_stop_string_start_is_held_back():
    s = TextStream(char_decode, ("</s>",))
    out = push_all(s, "ab</")
    assert [t for t, _ in out] == ["a", "b", "", ""]
    assert s.push(CHARS.index("a")) == ("</a", False)   # not the stop string after all
    out = push_all(s, "c</s>d")
    assert out[:4] == [("c", False), ("", False), ("", False), ("", False)]
    assert out[4] == ("", True)
    assert s.text[:s.released] == "ab</ac"


def test_stop_string_inside_one_token():
    words = ["hello", " wor", "ld!", "x"]
    s = TextStream(lambda ids: "".join(words[i] for i in ids), ("rl",))
    assert s.push(0) == ("hello", False)
    assert s.push(1) == (" wo", False)     # "r" may begin "rl"
    assert s.push(2) == ("", True)         # "world!" contains "rl": the text ends before it
    assert s.text[:s.released] == "hello wo"


def test_incomplete_character_is_held_back():
    data = "é€".encode()
    s = TextStream(lambda ids: bytes(data[i] for i in ids).decode("utf-8", errors="replace"))
    outs = [s.push(i)[0] for i in range(len(data))]
    assert outs == ["", "é", "", "", "€"]


def test_a_budget_that_ends_inside_a_character_never_releases_half_of_it():
    """Issue 25.5: max_tokens ending inside a multi-byte character gave U+FFFD at the end;
    the incomplete bytes are held back for good (the text ends before that character)."""
    data = "é€".encode()
    s = TextStream(lambda ids: bytes(data[i] for i in ids).decode("utf-8", errors="replace"))
    outs = [s.push(i)[0] for i in range(3)]             # é, then 1 of the 3 bytes of €
    assert outs == ["", "é", ""] and s.flush() == "" and s.text == "é"


def test_flush_releases_held_text_at_the_end():
    s = TextStream(char_decode, ("abc",))
    push_all(s, "jab")
    assert s.text[:s.released] == "j" and s.flush() == "ab"


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1e-9) == [True, False, False, False]
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.6)).tolist() == [False, True, False, True]


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_k=None, seed=0, top_p=0.7)
    draws = {sample_token(logits, cfg, g) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    assert "top_p" not in SamplingConfig().to_dict()  # the fixed-batch /init body is unchanged


def test_stream_printer_writes_what_the_batch_output_writes():
    out = io.StringIO()
    p = StreamPrinter(["P0:", "P1:"], out)
    p(1, Event(3, "x"))
    assert out.getvalue() == "P0:"
    p(0, Event(1, "ab"))
    p(1, Event(4, "y"))
    p(0, Event(None, "c", "length"))
    assert out.getvalue() == "P0:abc\n---------------\nP1:xy"
    p(1, Event(None, "", "length"))
    assert out.getvalue() == "P0:abc\n---------------\nP1:xy\n---------------\n"
