"""The model's own sampling settings: read from generation_config.json (Hugging Face's
meaning of do_sample), GGUF's general.sampling.*, our directory's generation_config.json,
else mdi's defaults by kind of model; used by the commands unless the user sets them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster_helpers import run_cli
from hf_helpers import make_hf_dir
from mdi.checkpoint import open_checkpoint
from mdi.checkpoint.sampling_defaults import (CHAT_MODEL, PLAIN_MODEL, SamplingDefaults,
                                              sampling_defaults)
from mdi.checkpoint.inspect import inspect_checkpoint

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2")


def with_generation_config(hf_dir: Path, tmp_path: Path, gc: dict) -> Path:
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    (d / "generation_config.json").write_text(json.dumps(gc))
    return d


@pytest.mark.parametrize("gc, expected", [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9},
     SamplingDefaults(0.6, 50, 0.9, None, "generation_config.json")),  # HF's top_k default: 50
    ({"do_sample": True, "top_k": 0, "max_new_tokens": 77},
     SamplingDefaults(1.0, None, None, 77, "generation_config.json")),
    ({"temperature": 0.6, "top_p": 0.9},  # no do_sample: transformers decodes greedily
     SamplingDefaults(0.0, None, None, None, "generation_config.json: do_sample false")),
    ({"do_sample": False, "max_new_tokens": 12},
     SamplingDefaults(0.0, None, None, 12, "generation_config.json: do_sample false")),
])
def test_hf_generation_config(hf_dir, tmp_path, gc, expected):
    assert sampling_defaults(open_checkpoint(with_generation_config(hf_dir, tmp_path, gc))) == expected


def test_without_settings_a_chat_model_is_greedy_and_a_plain_one_samples(hf_dir, tmp_path):
    chat = with_generation_config(hf_dir, tmp_path, {"eos_token_id": 2})  # hf_helpers: a chat template
    assert sampling_defaults(open_checkpoint(chat)) == CHAT_MODEL
    assert sampling_defaults(open_checkpoint(BUNDLED)) == PLAIN_MODEL
    assert PLAIN_MODEL.temperature == 0.8 and PLAIN_MODEL.top_k == 200 and CHAT_MODEL.temperature == 0


def test_our_directory_may_carry_a_generation_config(tmp_path):
    d = tmp_path / "ours"
    shutil.copytree(BUNDLED, d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5,
                                                          "top_k": 5, "max_new_tokens": 9}))
    assert sampling_defaults(open_checkpoint(d)) == SamplingDefaults(0.5, 5, None, 9,
                                                                     "generation_config.json")
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not readable JSON"):
        sampling_defaults(open_checkpoint(d))


def test_gguf_sampling_metadata(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra_kv={"general.sampling.temp": 0.25, "general.sampling.top_k": 7})
    assert sampling_defaults(open_checkpoint(path)) == SamplingDefaults(0.25, 7, None, None,
                                                                        "GGUF metadata")
    plain = tmp_path / "plain.gguf"
    write_tiny_gguf(plain)
    assert sampling_defaults(open_checkpoint(plain)) == CHAT_MODEL  # a chat template, no settings


def test_inspect_shows_them(tmp_path):
    assert inspect_checkpoint(BUNDLED).sampling == PLAIN_MODEL
    rc, out, _ = run_cli("inspect", BUNDLED)
    assert rc == 0 and "sampling defaults: temperature 0.8, top-k 200, no top-p (none in the" in out


def sample(ckpt, *extra) -> list[str]:
    rc, out, err = run_cli("sample", "--ckpt", ckpt, "--n-samples", 2, "--prompt", "ROMEO:",
                           "--json", *extra)
    assert rc == 0, err
    return json.loads(out)["samples"]


def test_commands_use_the_models_settings_unless_set(tmp_path):
    twelve = ("--n-tokens", "12")
    assert sample(BUNDLED, *twelve) == sample(BUNDLED, *twelve, "--temperature", "0.8", "--top-k", "200")
    d = tmp_path / "greedy"
    shutil.copytree(BUNDLED, d)
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 5}))
    greedy = sample(d)
    assert greedy == sample(BUNDLED, "--temperature", "0", "--n-tokens", "5")
    assert greedy[0] == greedy[1] and len(greedy[0]) == 5  # greedy, and the model's budget
    assert sample(d, "--temperature", "0.8", "--top-k", "200", *twelve) == sample(BUNDLED, *twelve)


@pytest.mark.slow
def test_smollm2_says_paris_without_sampling_flags():
    """The issue's first answer: no --temperature, SmolLM2 (no settings in its GGUF, a chat
    template) decodes greedily and answers with Paris, every sample."""
    from mdi.checkpoint.shipped import shipped_path

    try:
        shipped_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    rc, out, err = run_cli("sample", "--ckpt", "smollm2-135m-instruct", "--chat", "--prompt",
                           "What is the capital of France?", "--n-tokens", "40", "--json")
    assert rc == 0, err
    result = json.loads(out)
    samples = result["samples"]
    assert len(samples) == 3 and all("Paris" in s for s in samples), samples
    # the file's precision: its Q4_1 codes as int4 (the head's best logits in float32)
    assert any(k.startswith("int4") for k in result["compute"]["kernels"]), result["compute"]
