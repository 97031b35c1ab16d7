"""Sliding-window perplexity (mdi.eval) and `mdi eval`, against direct computations."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mdi.checkpoint import load_model
from mdi.cli.main import main
from mdi.eval import perplexity, windows

from conftest import REPO, SHAKESPEARE


@pytest.mark.parametrize("n,window,stride,want", [
    (10, 4, 2, [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]),
    (10, 4, 4, [(0, 4, 3), (4, 8, 3), (8, 10, 1)]),       # non-overlapping: chunk heads unscored
    (10, 16, 8, [(0, 10, 9)]),                            # one forward over the whole text
    (5, 3, 1, [(0, 3, 2), (1, 4, 1), (2, 5, 1)]),
])
def test_windows_table(n, window, stride, want):
    assert windows(n, window, stride) == want


@pytest.mark.parametrize("n,window,stride", [(100, 16, 8), (33, 16, 1), (64, 16, 15), (17, 16, 3)])
def test_overlapping_windows_score_every_token_but_the_first_once(n, window, stride):
    plan = windows(n, window, stride)
    assert sum(k for _, _, k in plan) == n - 1
    assert plan[-1][1] == n


@pytest.mark.parametrize("bad", [dict(window=1, stride=1), dict(window=8, stride=0),
                                 dict(window=8, stride=9)])
def test_bad_window_or_stride_is_refused(bad):
    with pytest.raises(ValueError, match="window|stride"):
        windows(100, **bad)


def test_one_window_equals_cross_entropy_over_the_text(tiny_config, make_model):
    model = make_model(tiny_config, seed=3)
    ids = torch.randint(0, tiny_config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, window=16)
    with torch.no_grad():
        ce = F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum").item()
    assert r.n_windows == 1 and r.n_scored == 15
    assert r.nll_sum == pytest.approx(ce, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(ce / 15), rel=1e-6)


def test_stride_one_equals_scoring_each_token_with_its_last_window(tiny_config, make_model):
    """Independent loop: token t scored from the (window - 1) tokens before it."""
    model = make_model(tiny_config, seed=4)
    ids = torch.randint(0, tiny_config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    window = tiny_config.block_size
    want = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - (window - 1)):t]
            want -= F.log_softmax(model(ctx[None])[0, -1], -1)[ids[t]].item()
    r = perplexity(model, ids, window=window, stride=1)
    assert r.n_scored == len(ids) - 1
    assert r.nll_sum == pytest.approx(want, rel=1e-5)


def test_overlap_lowers_perplexity_of_the_bundled_model():
    loaded = load_model(REPO / "models" / "shakespeare-char")
    model, info = loaded.model, loaded.checkpoint
    ids = info.tokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8")[:1500])
    chunks = perplexity(model, ids, window=128, stride=128)
    sliding = perplexity(model, ids, window=128, stride=32)
    assert sliding.ppl < chunks.ppl < 6  # trained: well below the 65-character vocabulary


def test_cli_json_equals_the_library(capsys):
    ckpt = REPO / "models" / "shakespeare-char"
    assert main(["eval", "--ckpt", str(ckpt), "--data", str(SHAKESPEARE), "--max-tokens", "600",
                 "--window", "64", "--stride", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    loaded = load_model(ckpt)
    model, info = loaded.model, loaded.checkpoint
    ids = info.tokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8"))[:600]
    r = perplexity(model, ids, window=64, stride=16)
    assert (out["n_scored"], out["n_windows"], out["window"], out["stride"]) == (599, r.n_windows, 64, 16)
    assert out["nll_sum"] == r.nll_sum and out["ppl"] == r.ppl


def test_cli_refuses_a_window_past_the_context(capsys):
    ckpt = REPO / "models" / "shakespeare-char"
    rc = main(["eval", "--ckpt", str(ckpt), "--data", str(SHAKESPEARE), "--window", "4096"])
    assert rc == 2 and "exceeds the model's context of 128" in capsys.readouterr().err
