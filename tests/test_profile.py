"""`mdi bench --profile`: the aten calls of one decode step, per layer (issue 21).

The bounds hold the counts of this change with ~10% to spare (GPT-2 form 122.7
per layer in float32, Llama form 140.3; int8 144.0 and 161.7): a change that
adds small operations to every layer fails here, whatever the machine's speed.
"""
from __future__ import annotations

import csv

import pytest

from mdi.bench.profile import count_decode
from mdi.model import fused_ops
from mdi.model.config import GPTConfig
from mdi.model.quant import configure_stage

LLAMA = dict(norm="rmsnorm", positions="rope", activation="swiglu", n_kv_head=1, bias=False)


@pytest.mark.parametrize("form, quantize, bound", [
    ({}, None, 135), (LLAMA, None, 155), ({}, "int8", 160), (LLAMA, "int8", 178),
])
def test_a_decode_step_stays_within_its_aten_calls_per_layer(make_model, form, quantize, bound):
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=64, **form)
    model = configure_stage(make_model(config, seed=1), quantize, False, None, True)
    counts = {rows: count_decode(model, rows) for rows in (1, 4)}
    for rows, (total, names) in counts.items():
        assert total / config.n_layer <= bound, (rows, names.most_common(8))
        assert names["aten::addmm"] + names["aten::mm"] + names["aten::linear"] + \
            names["aten::_int_mm"] + names["aten::_weight_int8pack_mm"] + \
            names["aten::mkldnn_linear"] + names["aten::_mkl_linear"] + \
            names["mdi_fused::int8_mm"] > 0  # it did decode
    # the count is per step, not per row: 4 rows cost the calls of 1 (within a few)
    assert abs(counts[4][0] - counts[1][0]) <= 3 * config.n_layer


def test_bench_profile_prints_and_writes_the_counts(tmp_path, capsys):
    from mdi.cli.main import main

    assert main(["bench", "--profile", "--ckpt", "models/shakespeare-char", "--seqs", "1,2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "per layer" in out and "float32" in out
    with open(tmp_path / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["rows"] for r in rows] == ["1", "2"]
    assert all(r["weights"] == "float32" and 20 < float(r["per_layer"]) < 135 for r in rows)
    # which path the counts are of: mdi's fused kernels, or torch's operations without them
    assert {r["kernels"] for r in rows} == {"fused" if fused_ops.ops() is not None else "torch"}
