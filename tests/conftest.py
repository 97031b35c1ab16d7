"""Shared tiny fixtures for the single-device tests.

Everything here is small on purpose (2 layers, n_embd 32, block_size 16 or 32,
a few KB of text): the tests run on one shared CPU core.
"""
from __future__ import annotations

import os
import signal
import subprocess

# One core: keep the Hugging Face tokenizers (Rust) from starting a thread pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
# --dtype auto (the default of sample, run, chat, serve, eval) is float32 in the
# suite, whatever the CPU: results must not depend on the CI machine's bfloat16
os.environ.setdefault("MDI_AUTO_DTYPE", "float32")
# A suite started in the background by a script (`cmd &`, no job control) inherits
# SIGINT ignored, and so would every process it starts: the tests that stop a
# chat, a run or a node with Ctrl-C (SIGINT) would then wait in vain.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402
from typing import Callable

import pytest
import torch

from mdi.checkpoint.format import save_checkpoint
from mdi.data import prepare
from mdi.model import GPT, GPTConfig
from mdi.tokenizer import CharTokenizer

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
N_CHARS = 6000  # of Shakespeare in the tiny data sets: ~60 distinct characters


def scaled_random_model(config: GPTConfig, seed: int = 0, std: float = 0.15) -> GPT:
    """A GPT with larger-than-init random weights, so logits are far from uniform and
    numerical comparisons are sharp (GPT-2 init gives logits of ~1e-2)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def split_model(model: GPT, cuts: list[int]) -> list[GPT]:
    """The model split at `cuts` (layer indices), each stage with its own copy of the weights."""
    bounds = [0, *cuts, model.config.n_layer]
    whole = model.state_dict()
    out = []
    for a, b in zip(bounds, bounds[1:]):
        s = GPT(model.config, a, b)
        s.load_state_dict({k: whole[k].clone() for k in s.state_dict()})
        out.append(s.eval())
    return out


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=48, block_size=16, n_layer=3, n_head=2, n_embd=32)


@pytest.fixture
def make_model() -> Callable[..., GPT]:
    return scaled_random_model


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:N_CHARS]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, shakespeare_text) -> Path:
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(shakespeare_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory, text_file) -> Path:
    """A prepared character-level data set (read-only for tests: copy before changing)."""
    out = tmp_path_factory.mktemp("char_data")
    prepare(text_file, out, "char", None, 0.1)
    return out


@pytest.fixture(scope="session")
def char_tokenizer(shakespeare_text) -> CharTokenizer:
    return CharTokenizer.train(shakespeare_text)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, char_tokenizer) -> Path:
    """A random (untrained) char-level checkpoint, block_size 16, saved in our format."""
    config = GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=16, n_layer=2,
                       n_head=2, n_embd=32)
    model = scaled_random_model(config, seed=1, std=0.1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, char_tokenizer,
                           {"note": "random weights for tests"})


# ---- the fast tier starts no process ---------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test not marked slow (setup, fixtures and teardown included) may not start a
    process: `make test-fast` must stay fast and in-process."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    original = subprocess.Popen.__init__

    def refuse(self, args, *a, **k):
        raise RuntimeError(f"{item.nodeid} starts a process ({args!r}): mark it "
                           "@pytest.mark.slow")

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original
