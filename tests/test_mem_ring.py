"""End to end (slow): --max-context and --quantize int8 through real `mdi` processes.

`mdi run` on 2 and 3 local nodes (each node told the cap in /init, each
quantizing its own stage as its weights stream in) prints exactly what
`mdi sample` prints with the same options: past the cap, the context window
moves on the same way on every node.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_e2e_ring import DIST, gen_args, mdi_json, tiny_checkpoint, tokenizer  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:  # noqa: F811
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt4"), tokenizer, n_layer=4, seed=0)


# each option set on one ring size (the suite's time: every case starts a ring)
@pytest.mark.parametrize("n_nodes, extra", [(2, ["--max-context", "12"]),
                                            (3, ["--max-context", "12", "--quantize", "int8"]),
                                            (2, ["--quantize", "int8"])],
                         ids=["2-cap12", "3-cap12-int8", "2-int8"])
def test_run_equals_sample_with_a_cap_and_int8(ckpt, n_nodes, extra):
    # 40 new tokens over a cap of 12 positions: the window moves on several times
    gen = dict(n_samples=3, n_tokens=40, prompts=("ROMEO:",), temperature=0.8, top_k=200, seed=5)
    base, _ = mdi_json("sample", "--ckpt", ckpt, *gen_args(**gen), *extra)
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", n_nodes, *DIST, *gen_args(**gen), *extra)
    assert out["samples"] == base["samples"]
    assert all(len(s) == 40 for s in out["samples"])
    if "--max-context" in extra:  # the cap changed the text: it was applied on both sides
        plain, _ = mdi_json("sample", "--ckpt", ckpt, *gen_args(**gen),
                            *[a for a in extra if a not in ("--max-context", "12")])
        assert plain["samples"] != base["samples"]
