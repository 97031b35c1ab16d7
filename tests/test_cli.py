"""The `mdi` command for the single-device workflow: prepare -> train -> sample ->
inspect, the output files, and one clear line on stderr for every bad input.

Most calls run `mdi.cli.main.main` in-process (importing torch per call would
cost seconds on a shared core); two run the real console script."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from cluster_helpers import run_cli
from mdi.model import GPT, GPTConfig

TRAIN_ARGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
              "--max-iters", "30", "--eval-interval", "10", "--eval-iters", "2",
              "--batch-size", "8", "--warmup-iters", "5"]
TIME_RUN_HEADER = ["timestamp", "mode", "n_nodes", "n_samples", "n_layers", "block_size",
                   "n_tokens", "gen_time_s", "tokens_per_s"]


def assert_clean_error(result: tuple[int, str, str], command: str, *needles: str) -> str:
    rc, out, err = result
    assert rc not in (0, None), (out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mdi {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert out == ""
    return lines[0]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, text_file) -> dict:
    """`mdi prepare` then `mdi train`, once for the module."""
    root = tmp_path_factory.mktemp("cli")
    data, ckpt = root / "data", root / "ckpt"
    prepared = run_cli("prepare", "--input", text_file, "--out", data)
    trained = run_cli("train", "--data", data, "--out", ckpt, *TRAIN_ARGS)
    return {"root": root, "data": data, "ckpt": ckpt, "prepare": prepared, "train": trained}


def sample_json(ckpt: Path, *extra: str) -> dict:
    rc, out, err = run_cli("sample", "--ckpt", ckpt, "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


def test_prepare_and_train(workflow, shakespeare_text):
    rc, out, _ = workflow["prepare"]
    assert rc == 0
    meta = json.loads(out)
    assert meta["vocab_size"] == len(set(shakespeare_text)) and meta["tokenizer"] == "char"
    assert meta["train_tokens"] + meta["val_tokens"] == len(shakespeare_text)
    assert json.loads((workflow["data"] / "meta.json").read_text()) == meta

    rc, out, err = workflow["train"]
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["iter_num"] == 30 and summary["checkpoint"] == str(workflow["ckpt"])
    assert "iter 30: train" in err  # progress on stderr, results on stdout
    rows = list(csv.DictReader((workflow["ckpt"] / "loss.csv").open()))
    assert [int(r["iter"]) for r in rows] == [0, 10, 20, 30]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_state.pt"):
        assert (workflow["ckpt"] / name).is_file()


def test_sample_json(workflow):
    n_samples, n_tokens = 3, 45  # more than block_size 32: the context window moves
    r = sample_json(workflow["ckpt"], "--n-samples", n_samples, "--n-tokens", n_tokens,
                    "--prompt", "ROMEO:", "--seed", "4")
    assert {"samples", "n_tokens", "gen_time_s", "tokens_per_s"} <= r.keys()
    assert r["n_tokens"] == n_tokens and r["n_samples"] == n_samples
    assert r["mode"] == "single" and r["n_nodes"] == 1
    assert len(r["samples"]) == n_samples
    assert [len(s) for s in r["samples"]] == [n_tokens] * n_samples  # char model: 1 char/token
    assert len(set(r["samples"])) == n_samples
    assert r["gen_time_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(n_samples * n_tokens / r["gen_time_s"], rel=1e-3)
    assert 0 < r["first_token_s"] <= r["gen_time_s"]


def test_sample_is_reproducible_and_grouping_free(workflow):
    args = ("--n-samples", "4", "--n-tokens", "20", "--temperature", "0.8", "--top-k", "20")
    a = sample_json(workflow["ckpt"], *args, "--seed", "7")["samples"]
    b = sample_json(workflow["ckpt"], *args, "--seed", "7", "--micro-batches", "3")["samples"]
    c = sample_json(workflow["ckpt"], *args, "--seed", "8")["samples"]
    assert a == b
    assert a != c


def test_sample_text_output_and_prompt_file(workflow, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\n\nMENENIUS:\n", encoding="utf-8")
    rc, out, err = run_cli("sample", "--ckpt", workflow["ckpt"], "--n-samples", "2",
                           "--n-tokens", "12", "--prompt", f"FILE:{prompts}")
    assert rc == 0, err
    blocks = out.split("\n---------------\n")
    assert blocks[-1] == "" and len(blocks) == 3
    assert blocks[0].startswith("First Citizen:") and len(blocks[0]) == len("First Citizen:") + 12
    assert blocks[1].startswith("MENENIUS:") and len(blocks[1]) == len("MENENIUS:") + 12
    assert "2 sample(s) x 12 tokens in" in err and "tokens/s (single, 1 node(s))" in err

    assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], "--n-samples", "3",
                               "--prompt", f"FILE:{prompts}"),
                       "sample", "got 2 prompts for --n-samples 3")


def test_inspect(workflow):
    rc, out, err = run_cli("inspect", workflow["ckpt"])
    assert rc == 0, err
    assert f"checkpoint: {workflow['ckpt']}" in out
    vocab = json.loads(workflow["prepare"][1])["vocab_size"]
    for line in ("  n_layer: 2", "  n_head: 2", "  n_embd: 32", "  block_size: 32",
                 f"  vocab_size: {vocab}", f"tokenizer: char, vocabulary {vocab}", "  iter_num: 30"):
        assert line in out.splitlines(), line
    listing = out.split("tensors:\n")[1].split("parameters:")[0]
    names = [line.split()[0] for line in listing.splitlines()]
    config = GPTConfig(**{k: v for k, v in json.loads(
        (workflow["ckpt"] / "config.json").read_text())["model"].items()})
    model = GPT(config)
    assert names == sorted(n for n in model.state_dict() if n != "lm_head.weight")  # tied: not stored
    assert f"parameters: {model.num_params(non_embedding=False):,} " in out


def test_time_run_appends_rows(workflow, tmp_path):
    path = tmp_path / "runs" / "time.csv"
    for n in (5, 7):
        r = sample_json(workflow["ckpt"], "--n-samples", "2", "--n-tokens", n, "--time-run", path)
    with path.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == TIME_RUN_HEADER
    assert len(rows) == 3
    for row, n in zip(rows[1:], (5, 7)):
        rec = dict(zip(TIME_RUN_HEADER, row))
        datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%S")
        assert (rec["mode"], rec["n_nodes"], rec["n_samples"], rec["n_layers"], rec["block_size"],
                rec["n_tokens"]) == ("single", "1", "2", "2", "32", str(n))
        assert float(rec["tokens_per_s"]) == pytest.approx(2 * n / float(rec["gen_time_s"]), rel=1e-3)
    assert float(rows[2][7]) == pytest.approx(r["gen_time_s"], abs=1e-5)  # same run as the JSON


def test_plots(workflow, tmp_path):
    out = tmp_path / "plots"
    r = sample_json(workflow["ckpt"], "--n-samples", "3", "--n-tokens", "6", "--plots", out)
    assert sorted(p.name for p in out.iterdir()) == ["tokens_time.csv", "tokens_time.png"]
    with (out / "tokens_time.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "tokens", "time_s"]
    assert [(int(a), int(b)) for a, b, _ in rows[1:]] == [(i, 3 * i) for i in range(1, 7)]
    times = [float(t) for _, _, t in rows[1:]]
    assert 0 < times[0] and times == sorted(times) and times[-1] <= r["gen_time_s"] + 1e-6
    assert (out / "tokens_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bad input: one line on stderr, no traceback ----------------------------------------------

@pytest.fixture
def corrupt_ckpt(workflow, tmp_path) -> Path:
    d = tmp_path / "corrupt"
    shutil.copytree(workflow["ckpt"], d, ignore=shutil.ignore_patterns("train_state.pt"))
    (d / "model.safetensors").write_bytes(os.urandom(64) + b"garbage" * 100)
    return d


def test_missing_checkpoint_dir(tmp_path):
    for cmd in (["sample", "--ckpt"], ["inspect"]):
        assert_clean_error(run_cli(*cmd, tmp_path / "nope"), cmd[0],
                           f"checkpoint directory not found: {tmp_path / 'nope'}")


def test_corrupt_checkpoint(corrupt_ckpt):
    weights = corrupt_ckpt / "model.safetensors"
    assert_clean_error(run_cli("sample", "--ckpt", corrupt_ckpt, "--n-tokens", "2"), "sample",
                       f"{weights} is corrupt or unreadable")
    assert_clean_error(run_cli("inspect", corrupt_ckpt), "inspect",
                       f"{weights} is corrupt or unreadable")
    weights.unlink()
    assert_clean_error(run_cli("inspect", corrupt_ckpt), "inspect", "has no model.safetensors")
    (corrupt_ckpt / "config.json").write_text("{not json")
    assert_clean_error(run_cli("sample", "--ckpt", corrupt_ckpt), "sample",
                       "config.json is not valid JSON")


def test_checkpoint_that_does_not_match_its_config(workflow, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(workflow["ckpt"], d, ignore=shutil.ignore_patterns("train_state.pt"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("sample", "--ckpt", d), "sample", "has shape", "the config needs")


def test_train_on_data_dir_without_train_bin(workflow, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(workflow["data"], d)
    (d / "train.bin").unlink()
    assert_clean_error(run_cli("train", "--data", d, "--out", tmp_path / "ck", *TRAIN_ARGS),
                       "train", f"{d} has no train.bin")
    assert not (tmp_path / "ck").exists()


def test_prompt_outside_the_vocabulary(workflow):
    line = assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], "--prompt", "€ naïve"),
                              "sample", "prompt 0:", "not in the")
    # in the prompt's order, the offset the first's ('€' sorts after 'ï')
    assert "character(s) '€', 'ï' not in the" in line and "(first at offset 0)" in line
    line = assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], "--prompt", "naïve €"),
                              "sample")
    assert "character(s) 'ï', '€' not in the" in line and "(first at offset 2)" in line
    assert "-character vocabulary" in line


@pytest.mark.parametrize("args,needle", [
    (["--n-samples", "0"], "--n-samples must be positive, got 0"),
    (["--n-tokens", "-1"], "--n-tokens must be positive, got -1"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-k", "-1"], "top_k must be a positive integer, got -1"),  # 0: no top-k cut
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--micro-batches", "-2"], "micro-batches must be positive, got -2"),
])
def test_bad_generation_options(workflow, args, needle):
    assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], *args), "sample", needle)


@pytest.mark.parametrize("args,needle", [
    (["--block-size", "0"], "block_size must be a positive integer, got 0"),
    (["--n-head", "3"], "n_embd (32) must be divisible by n_head (3)"),
    (["--max-iters", "0"], "--max-iters must be positive, got 0"),
])
def test_bad_train_options(workflow, tmp_path, args, needle):
    assert_clean_error(run_cli("train", "--data", workflow["data"], "--out", tmp_path / "ck",
                               *TRAIN_ARGS, *args), "train", needle)
    assert not (tmp_path / "ck").exists()


def test_resume_without_state(workflow, tmp_path):
    assert_clean_error(run_cli("train", "--data", workflow["data"], "--out", tmp_path, "--resume"),
                       "train", "cannot resume", "train_state.pt not found")


def test_prepare_bad_input(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"hello \xff\xfe world\n")
    assert_clean_error(run_cli("prepare", "--input", src, "--out", tmp_path / "d"), "prepare",
                       f"{src} is not UTF-8 text (bad byte at offset 6)")
    assert_clean_error(run_cli("prepare", "--input", tmp_path / "missing.txt", "--out", tmp_path / "d"),
                       "prepare", "input file not found")
    assert not (tmp_path / "d").exists()


# -- the real console script -------------------------------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_console_script_error(workflow):
    exe = Path(sys.executable).with_name("mdi")
    assert exe.is_file()
    p = subprocess.run([str(exe), "sample", "--ckpt", str(workflow["ckpt"]), "--prompt", "€"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2  # a prompt outside the vocabulary: a bad command-line value
    assert p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("mdi sample: error: prompt 0: character(s) '€' not in")


@pytest.mark.slow
def test_module_entry_point_sample(workflow):
    p = subprocess.run([sys.executable, "-m", "mdi.cli.main", "sample", "--ckpt", str(workflow["ckpt"]),
                        "--n-samples", "2", "--n-tokens", "10", "--seed", "3", "--json",
                        "--threads", "1"], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    # Another process, the same tokens as in-process.
    assert r["samples"] == sample_json(workflow["ckpt"], "--n-samples", "2", "--n-tokens", "10",
                                       "--seed", "3")["samples"]


def test_a_prompt_longer_than_the_context_is_refused_unless_truncated(workflow):
    long = "the " * 20  # 80 characters: more than block_size 32
    assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], "--prompt", long), "sample",
                       "prompt 0 is 80 tokens; the context holds 32 (the model's block_size)",
                       "--truncate left")
    assert_clean_error(run_cli("sample", "--ckpt", workflow["ckpt"], "--prompt", "the " * 3,
                               "--max-context", "8"), "sample",
                       "prompt 0 is 12 tokens; the context holds 8 (--max-context)", "raise --max-context")
    # --truncate left: the window keeps the prompt's last tokens, which is what the model sees
    gen = ["--n-samples", "1", "--n-tokens", "8", "--temperature", "0"]
    cut = sample_json(workflow["ckpt"], "--prompt", long, "--truncate", "left", *gen)
    tail = sample_json(workflow["ckpt"], "--prompt", long[-16:], *gen)  # the window's context//2
    assert cut["samples"] == tail["samples"] and len(cut["samples"][0]) > 0
