"""The API load benchmark against the in-process server over the fake engine."""
from __future__ import annotations

import csv

import pytest

from mdi.bench.serve_load import COLUMNS, LoadConfig, run_load, write_csv, write_plot
from mdi.serve import BackgroundServer, ServeConfig, create_app
from serve_fakes import FakeEngine


def test_serve_load_rows_csv_and_plot(char_tokenizer, tmp_path):
    app = create_app(lambda: FakeEngine(char_tokenizer, max_seqs=4, step_s=0.002), char_tokenizer,
                     ServeConfig(model_name="m", api_key="k"))
    with BackgroundServer(app) as srv:
        rows = run_load(LoadConfig(url=srv.url, model="m", api_key="k", concurrency=(1, 4),
                                   requests_per_client=2, max_tokens=8, prompt="a"))
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert [r["requests"] for r in rows] == [2, 8] and all(r["errors"] == 0 for r in rows)
    assert [r["tokens"] for r in rows] == [16, 64]
    for r in rows:
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["latency_p99_s"]
        assert 0 < r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["tokens_per_s"] > 0 and r["requests_per_s"] > 0
    path = write_csv(rows, tmp_path / "serve_load.csv")
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == COLUMNS and got[1]["requests"] == "8"
    assert write_plot(rows, tmp_path / "serve_load.png", "test").stat().st_size > 10000


def test_serve_load_counts_errors(char_tokenizer):
    app = create_app(lambda: FakeEngine(char_tokenizer), char_tokenizer, ServeConfig(model_name="m", api_key="k"))
    with BackgroundServer(app) as srv:
        rows = run_load(LoadConfig(url=srv.url, model="m", api_key="wrong", concurrency=(2,),
                                   requests_per_client=1, max_tokens=4))
    assert rows[0]["requests"] == 0 and rows[0]["errors"] == 2


def test_serve_bench_cli_against_a_url(char_tokenizer, tmp_path, capsys):
    from mdi.cli.main import main

    app = create_app(lambda: FakeEngine(char_tokenizer), char_tokenizer, ServeConfig(model_name="m"))
    with BackgroundServer(app) as srv:
        rc = main(["serve-bench", "--url", srv.url, "--model-name", "m", "--concurrency", "1,2",
                   "--requests", "1", "--max-tokens", "5", "--prompt", "a", "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "serve_load.csv").is_file() and (tmp_path / "serve_load.png").is_file()
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["prompt", "clients", "req/s", "tok/s"] and len(table) == 3


def test_serve_cli_refuses_bad_options(capsys):
    from mdi.cli.main import main

    assert main(["serve", "--ckpt", "models/shakespeare-char", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--ckpt", "models/shakespeare-char", "--nodes", "0"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ckpt", "models/shakespeare-char", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err
    assert main(["serve", "--ckpt", "models/shakespeare-char", "--max-seqs", "0"]) == 2
    assert "--max-seqs" in capsys.readouterr().err
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--ckpt", "models/shakespeare-char", "--port", port]) == 4
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve-bench", "--url", "http://127.0.0.1:1", "--out", "/tmp/x"]) == 1
    assert "--model-name" in capsys.readouterr().err


def test_serve_load_by_prompt_length(char_tokenizer, tmp_path):
    from mdi.bench.latency import prompt_ids

    app = create_app(lambda: FakeEngine(char_tokenizer, max_seqs=4, step_s=0.002), char_tokenizer,
                     ServeConfig(model_name="m"))
    prompts = tuple(tuple(prompt_ids(char_tokenizer, n)) for n in (3, 40))
    with BackgroundServer(app) as srv:
        rows = run_load(LoadConfig(url=srv.url, model="m", concurrency=(1, 2), requests_per_client=2,
                                   max_tokens=6, token_prompts=prompts))
    # every length at every level; the server's usage counts the prompt we sent
    assert [(r["prompt_tokens"], r["concurrency"]) for r in rows] == [(3, 1), (3, 2), (40, 1), (40, 2)]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 2 * r["concurrency"]
        assert r["ttft_count"] == r["requests"] and r["itl_count"] == r["requests"] * 5
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
    assert write_plot(rows, tmp_path / "p.png", "by length").stat().st_size > 10000


def test_serve_bench_cli_prompt_tokens(tmp_path, capsys):
    from mdi.checkpoint import open_checkpoint
    from mdi.cli.main import main

    tok = open_checkpoint("models/shakespeare-char").tokenizer()  # the served model's, as --tokenizer
    app = create_app(lambda: FakeEngine(tok), tok, ServeConfig(model_name="m"))
    with BackgroundServer(app) as srv:
        args = ["serve-bench", "--url", srv.url, "--model-name", "m", "--concurrency", "1",
                "--requests", "1", "--max-tokens", "3", "--prompt-tokens", "5,9", "--out", str(tmp_path)]
        assert main(args) == 1  # the tokenizer that makes the prompts is not known
        assert "--tokenizer" in capsys.readouterr().err
        assert main(args + ["--tokenizer", "models/shakespeare-char"]) == 0
    with open(tmp_path / "serve_load.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["prompt_tokens"] for r in got] == ["5", "9"]


@pytest.mark.slow  # the attacker is a process of its own
def test_serve_bench_attack_runs_each_level_beside_an_attack(char_tokenizer, tmp_path, capsys):
    """--attack: each level again while slow-body sockets and never-read streams hit the
    server; both rows in the CSV and the table, and the ratio of their tokens/s."""
    from mdi.cli.main import main

    app = create_app(lambda: FakeEngine(char_tokenizer, max_seqs=8, step_s=0.002), char_tokenizer,
                     ServeConfig(model_name="m"))
    with BackgroundServer(app) as srv:
        rc = main(["serve-bench", "--url", srv.url, "--model-name", "m", "--concurrency", "2",
                   "--requests", "2", "--max-tokens", "5", "--prompt", "a", "--attack",
                   "--attack-slow", "6", "--attack-unread", "2", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "serve_load.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["attack"] for r in rows] == ["", "6 slow + 2 unread"]
    assert all(r["requests"] == "4" and r["errors"] == "0" for r in rows)
    out = capsys.readouterr().out
    assert "6 slow + 2 unread" in out and "under attack: " in out and "x the tokens/s at 2" in out


def test_long_prefill_takes_the_gaps_that_overlap_its_window():
    from mdi.bench.serve_load import Timing, long_prefill

    long = Timing(ok=True, start=10.0, ttft_s=2.0)          # its prefill: 10 .. 12 s
    a = Timing(ok=True, itl_s=[0.5, 1.0, 0.4], itl_end=[9.5, 10.5, 12.5])  # 9-9.5, 9.5-10.5, 12.1-12.5
    b = Timing(ok=True, itl_s=[0.2, 0.3], itl_end=[11.0, 11.3])            # both inside
    got = long_prefill(long, [a, b], 2048)
    assert got["long_prompt_tokens"] == 2048 and got["long_ttft_s"] == 2.0
    assert got["itl_long_count"] == 3 and got["itl_long_p50_s"] == 0.3
    assert abs(got["itl_long_p99_s"] - 0.986) < 1e-9
    failed = long_prefill(Timing(ok=False, error="500"), [a], 10)
    assert failed["itl_long_count"] == 0 and failed["long_ttft_s"] != failed["long_ttft_s"]


def test_serve_bench_cli_long_prompt(tmp_path, capsys):
    from mdi.checkpoint import open_checkpoint
    from mdi.cli.main import main

    tok = open_checkpoint("models/shakespeare-char").tokenizer()
    app = create_app(lambda: FakeEngine(tok, max_seqs=4, step_s=0.01), tok, ServeConfig(model_name="m"))
    with BackgroundServer(app) as srv:
        assert main(["serve-bench", "--url", srv.url, "--model-name", "m", "--concurrency", "2",
                     "--requests", "1", "--max-tokens", "40", "--prompt", "a",
                     "--long-prompt-tokens", "30", "--long-prompt-after", "0.1",
                     "--tokenizer", "models/shakespeare-char", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "serve_load.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["long_prompt_tokens"] == "30" and float(row["long_ttft_s"]) > 0
    assert int(row["itl_long_count"]) >= 1 and float(row["itl_long_p99_s"]) > 0
    assert "a 30-token prompt arriving among 2 stream(s): its TTFT" in capsys.readouterr().out
