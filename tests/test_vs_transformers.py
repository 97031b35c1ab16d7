"""The transformers comparison runs identical weights: logits and greedy tokens
equal; the report has every engine at every sequence count."""
from __future__ import annotations

import csv
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mdi.bench.vs_transformers import (GREEDY, VsConfig, VsTransformers, summary_table,  # noqa: E402
                                       to_transformers, write_report)
from mdi.cli.main import main  # noqa: E402
from mdi.generate.local import generate  # noqa: E402
from mdi.model import GPTConfig  # noqa: E402


def test_transformers_copy_gives_the_same_logits_and_tokens(make_model):
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = make_model(config, std=0.1)
    hf = to_transformers(model)
    x = torch.randint(0, 50, (3, 17))
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    prompt = [1, 2, 3]
    want = generate(model, [prompt], 10, GREEDY)[0]
    with torch.no_grad():
        got = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 3:].tolist()
    assert got == want


def test_vs_transformers_report(tmp_path):
    cfg = VsConfig(model_size="tiny", seqs=[1, 3], n_tokens=4, runs=2, threads=1,
                   out=str(tmp_path), variants=[])
    rows = VsTransformers(cfg).run()
    assert {(r["engine"], r["n_seqs"]) for r in rows} == {
        (e, n) for e in ("mdi", "transformers") for n in (1, 3)}
    assert len(rows) == 8 and all(r["tokens_per_s"] > 0 for r in rows)
    table = summary_table(rows)
    assert "| seqs | mdi tok/s | transformers tok/s | mdi / transformers |" in table
    files = write_report(rows, tmp_path, "t")
    assert [f.name for f in files] == ["vs_transformers.csv", "summary.md", "vs_transformers.png"]
    assert len(list(csv.DictReader(files[0].open()))) == 8


def test_cli_vs_transformers(tmp_path, capsys):
    rc = main(["bench", "--vs-transformers", "--model-size", "tiny", "--seqs", "1,2",
               "--n-tokens", "3", "--runs", "1", "--threads", "1", "--out", str(tmp_path),
               "--mdi-variants", ""])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mdi vs transformers" in out and "| 2 |" in out
    assert (tmp_path / "vs_transformers.png").is_file()
