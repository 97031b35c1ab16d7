"""The command line explains itself: every option has help, every default is shown, and an
option that means the same in several commands has the same text in each."""
from __future__ import annotations

import argparse
from collections import defaultdict

import pytest

from mdi.cli.main import HelpFormatter, build_parser

# Options whose name is shared by commands where they mean different things (the reason).
DIFFERENT_MEANINGS = {
    "--api-key": "serve requires it of clients; serve-bench sends it",
    "--compile": "bench: off,on run side by side; elsewhere a flag",
    "--data": "train: a prepared data directory; eval: a text file",
    "--dtype": "convert casts the stored weights; elsewhere the compute dtype",
    "--json": "one object, or (models) one list",
    "--max-tokens": "eval: tokens scored; serve-bench: a request's max_tokens",
    "--micro-batches": "sample: batches on one device; ring: lanes; bench: lanes of every run",
    "--model-name": "serve: the id it serves; serve-bench: the id it asks for",
    "--n-tokens": "bench: per run, with its own default; chat: per answer",
    "--nodes": "bench: a list of counts; split: chunks",
    "--out": "what each command writes",
    "--partition": "bench: a list of partitions to compare",
    "--prefill-chunk": "bench: a list of values run side by side",
    "--prompt": "serve-bench: one request's prompt",
    "--prompt-tokens": "bench: each length a configuration; serve-bench: each length every level",
    "--quantize": "convert stores int8; elsewhere weights are quantized at load",
    "--replan": "run, starter, chat, serve: on or off; bench: a list run side by side",
    "--resend-context": "bench: also run that mode",
    "--temperature": "bench: every run's, with its own default",
    "--threads": "bench: its own default",
    "--tokenizer": "prepare: the kind to train; serve-bench: the checkpoint whose tokenizer it uses",
    "--timeout": "node: its own handshakes and connects; elsewhere the ring's failure detection",
}


def commands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options():
    for name, parser in commands().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                yield name, parser, action


def test_every_option_has_help():
    missing = [(name, a.option_strings) for name, _, a in options() if not a.help]
    assert missing == []


def test_every_default_is_shown():
    hidden = []
    for name, parser, action in options():
        text = HelpFormatter(parser.prog)._get_help_string(action)
        if action.default not in (None, False) and "default" not in text:
            hidden.append((name, action.option_strings))
    assert hidden == []
    text = commands()["split"].format_help()
    assert "--nodes NODES" in text and "one chunk each" in text


def test_the_same_option_has_the_same_help_everywhere():
    texts: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for name, _, action in options():
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in DIFFERENT_MEANINGS:
                texts[opt][action.help].add(name)
    differing = {opt: dict(by_text) for opt, by_text in texts.items() if len(by_text) > 1}
    assert differing == {}


@pytest.mark.parametrize("command", ["run", "serve", "chat"])
def test_nodes_defaults_to_one_device_everywhere(command):
    parser = commands()[command]
    nodes = next(a for a in parser._actions if "--nodes" in a.option_strings)
    assert nodes.default == 1
