"""load_model(spec, options): one open per command, the tokenizer with the model, and a hub
name resolved once however many times a command opens it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cluster_helpers import run_cli
from hf_helpers import make_hf_dir
from mdi.checkpoint import LoadOptions, Loaded, load_model, open_checkpoint, sources

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"


def test_load_model_gives_model_checkpoint_and_tokenizer():
    loaded = load_model(BUNDLED, LoadOptions(max_context=16))
    assert isinstance(loaded, Loaded)
    assert loaded.model.config.n_layer == loaded.checkpoint.config.n_layer == 6
    assert loaded.tokenizer is loaded.tokenizer  # read once, when first asked
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("ROMEO:")) == "ROMEO:"
    ids = torch.tensor([loaded.tokenizer.encode("ROMEO:")])
    assert torch.equal(loaded.model(ids)[0], load_model(BUNDLED).model(ids)[0])


def test_an_opened_checkpoint_is_not_read_again(monkeypatch):
    ck = open_checkpoint(BUNDLED)
    monkeypatch.setattr(sources, "read_info", lambda *a: pytest.fail("config.json read again"))
    assert load_model(ck).checkpoint is ck


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download replaced by a counter over a local tiny Llama."""
    local = make_hf_dir(tmp_path / "snap", "gpt2")
    calls = []

    def snapshot_download(repo, **kw):
        calls.append(repo)
        return str(local)

    fake = type(sys)("huggingface_hub")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    sources._hub_dir.cache_clear()
    yield calls
    sources._hub_dir.cache_clear()


def test_a_hub_name_is_resolved_once_per_command(hub):
    rc, out, err = run_cli("sample", "--ckpt", "hf:org/tiny", "--n-samples", "2", "--n-tokens", "3",
                           "--prompt", "ab", "--json")
    assert rc == 0, err
    assert hub == ["org/tiny"]
    open_checkpoint("hf:org/tiny")
    load_model("hf:org/tiny")
    assert hub == ["org/tiny"]
