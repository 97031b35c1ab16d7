"""Hugging Face directories through the `mdi` commands: inspect, split, convert,
sample, and distributed runs on 2 and 3 local nodes giving transformers' greedy
tokens (the ring tests start real processes: slow)."""
from __future__ import annotations

import pytest
from hf_helpers import hf_greedy, hf_model, make_hf_dir
from test_e2e_ring import DIST, gen_args, mdi_json

from mdi.checkpoint import open_checkpoint
from mdi.cli.main import main

PROMPT = "ROMEO: But soft"
GREEDY = dict(n_samples=2, n_tokens=30, prompts=(PROMPT,), temperature=0.0, top_k=1, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("mistral"), "mistral", shard="20KB")


@pytest.fixture(scope="module")
def expected(hf_dir) -> str:
    tok = open_checkpoint(hf_dir).tokenizer()
    ids = tok.encode(PROMPT)
    return tok.decode(hf_greedy(hf_model(hf_dir), ids, 30))


def test_tokenizer_follows_its_config(hf_dir):
    tok = open_checkpoint(hf_dir).tokenizer()
    ids = tok.encode(PROMPT)
    assert ids[0] == tok.bos_id == 1 and ids.count(1) == 1   # add_bos_token: true
    assert tok.eos_ids == (2,)                               # generation_config, tokenizer_config
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert tok.decode(ids[1:]) == PROMPT


def test_inspect_split_convert_commands(hf_dir, tmp_path, capsys):
    assert main(["inspect", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "  positions: rope" in out
    assert "tokenizer: hf, vocabulary" in out
    assert main(["split", "--ckpt", str(hf_dir), "--nodes", "3", "--out", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["node0", "node1", "node2"]
    assert main(["convert", str(hf_dir), "--out", str(tmp_path / "ours")]) == 0
    assert "MistralForCausalLM checkpoint, 3 layers" in capsys.readouterr().out


@pytest.mark.slow
def test_sample_equals_transformers(hf_dir, expected):
    out, _ = mdi_json("sample", "--ckpt", hf_dir, *gen_args(**GREEDY))
    assert out["samples"] == [expected, expected]


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes", [2, 3])
def test_ring_equals_transformers(hf_dir, expected, n_nodes):
    out, _ = mdi_json("run", "--ckpt", hf_dir, "--nodes", n_nodes, *DIST, *gen_args(**GREEDY))
    assert out["n_nodes"] == n_nodes
    assert out["samples"] == [expected, expected]
