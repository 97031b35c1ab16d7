"""Training: the loss goes down, the best checkpoint is kept, resume is exact, LR schedule."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import mdi.train as train_mod
from mdi.checkpoint import CheckpointError, load_model
from mdi.data import Dataset
from mdi.model import GPTConfig
from mdi.train import TrainConfig, lr_at, train


def model_config(data_dir: Path, dropout: float = 0.0) -> GPTConfig:
    vocab = Dataset.load(data_dir).tokenizer.vocab_size
    return GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32,
                     dropout=dropout)


def train_config(**kw) -> TrainConfig:
    base = dict(batch_size=8, max_iters=20, lr=3e-3, min_lr=3e-4, warmup_iters=5,
                eval_interval=10, eval_iters=2, seed=3)
    return TrainConfig(**{**base, **kw})


def read_loss(out: Path) -> list[dict[str, str]]:
    with (out / "loss.csv").open() as f:
        return list(csv.DictReader(f))


def final_state(out: Path) -> dict:
    return torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)


def test_training_lowers_the_loss_and_keeps_the_best(tmp_path, char_data_dir):
    out = tmp_path / "ckpt"
    summary = train(char_data_dir, out, model_config(char_data_dir),
                    train_config(max_iters=40, eval_iters=4), plot=True, progress=False)
    assert summary["iter_num"] == 40
    rows = read_loss(out)
    assert list(rows[0]) == ["iter", "train_loss", "val_loss", "lr", "elapsed_s"]
    assert [int(r["iter"]) for r in rows] == [0, 10, 20, 30, 40]
    first, last = rows[0], rows[-1]
    vocab = Dataset.load(char_data_dir).tokenizer.vocab_size
    assert abs(float(first["train_loss"]) - math.log(vocab)) < 0.3  # starts near uniform
    assert float(last["train_loss"]) < float(first["train_loss"]) - 0.5
    assert float(last["val_loss"]) < float(first["val_loss"]) - 0.5
    assert float(rows[-1]["lr"]) == pytest.approx(3e-4, rel=1e-4)  # min_lr at max_iters

    # The best checkpoint is the evaluation with the lowest val loss.
    vals = [float(r["val_loss"]) for r in rows]
    best = min(range(len(rows)), key=vals.__getitem__)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["iter_num"] == int(rows[best]["iter"])
    assert training["best_val_loss"] == pytest.approx(vals[best], abs=1e-4)
    assert summary["best_val_loss"] == pytest.approx(vals[best], abs=1e-4)
    assert training["tokenizer"] == "char"
    loaded = load_model(out)
    model, info = loaded.model, loaded.checkpoint
    assert info.config == model_config(char_data_dir)
    assert (out / "tokenizer.json").is_file() and (out / "loss.png").stat().st_size > 1000
    if best == len(rows) - 1:  # best is also the last: same weights as the final state
        state = final_state(out)
        for name, t in model.state_dict().items():
            assert torch.equal(t, state["model"][name]), name


def assert_same_final_state(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa["iter_num"] == sb["iter_num"] == 20
    assert sa["model"].keys() == sb["model"].keys()
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), name
    assert sa["best_val_loss"] == sb["best_val_loss"]
    assert ([(r["iter"], r["train_loss"], r["val_loss"]) for r in read_loss(a)]
            == [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_loss(b)])


def test_resume_with_a_larger_max_iters_is_exact(tmp_path, char_data_dir):
    """10 iterations, then --resume to 20 == 20 straight. The schedule is flat
    (lr == min_lr, no warmup) because the cosine decay depends on max_iters."""
    mc = model_config(char_data_dir, dropout=0.1)  # dropout masks must repeat too
    flat = dict(lr=2e-3, min_lr=2e-3, warmup_iters=0)
    train(char_data_dir, tmp_path / "a", mc, train_config(max_iters=20, **flat), progress=False)
    train(char_data_dir, tmp_path / "b", mc, train_config(max_iters=10, **flat), progress=False)
    assert final_state(tmp_path / "b")["iter_num"] == 10
    torch.manual_seed(12345)  # a resume starts in a new process: the global RNG is elsewhere
    summary = train(char_data_dir, tmp_path / "b", None, train_config(max_iters=20, **flat),
                    resume=True, progress=False)
    assert summary["iter_num"] == 20
    assert_same_final_state(tmp_path / "a", tmp_path / "b")


def test_resume_after_an_interruption_is_exact(tmp_path, char_data_dir, monkeypatch):
    """A 20-iteration run with warmup + cosine, killed at iteration 20's eval
    (train_state.pt holds iteration 10), then resumed == the same run uninterrupted."""
    mc = model_config(char_data_dir, dropout=0.1)
    cfg = train_config(max_iters=20)
    train(char_data_dir, tmp_path / "a", mc, cfg, progress=False)

    real = train_mod.estimate_loss

    def dies_at_20(model, data, cfg, it, on_batch=None):
        if it == 20:
            raise KeyboardInterrupt
        return real(model, data, cfg, it, on_batch)

    monkeypatch.setattr(train_mod, "estimate_loss", dies_at_20)
    with pytest.raises(KeyboardInterrupt):
        train(char_data_dir, tmp_path / "b", mc, cfg, progress=False)
    monkeypatch.setattr(train_mod, "estimate_loss", real)
    assert final_state(tmp_path / "b")["iter_num"] == 10
    assert [r["iter"] for r in read_loss(tmp_path / "b")] == ["0", "10"]
    torch.manual_seed(12345)
    train(char_data_dir, tmp_path / "b", None, cfg, resume=True, progress=False)
    assert_same_final_state(tmp_path / "a", tmp_path / "b")


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, char_data_dir):
    mc = model_config(char_data_dir)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(char_data_dir, tmp_path / name, mc, train_config(max_iters=3, eval_interval=3,
                                                               seed=seed), progress=False)
    a, b, c = (final_state(tmp_path / n)["model"] for n in "abc")
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_train_errors(tmp_path, char_data_dir):
    with pytest.raises(CheckpointError, match="cannot resume: .*train_state.pt not found"):
        train(char_data_dir, tmp_path / "none", None, train_config(), resume=True, progress=False)
    with pytest.raises(ValueError, match="model config is needed"):
        train(char_data_dir, tmp_path / "x", None, train_config(), progress=False)
    wrong = GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="model vocab_size 7 != data vocabulary"):
        train(char_data_dir, tmp_path / "x", wrong, train_config(), progress=False)
    for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "grad_acc_steps"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be positive"):
            TrainConfig(**{name: 0})


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    warm = [lr_at(i, cfg) for i in range(11)]
    assert warm[0] == pytest.approx(1e-3 / 11)
    assert warm[5] == pytest.approx(6e-3 / 11)
    assert all(a < b for a, b in zip(warm, warm[1:]))  # ramps up
    assert warm[10] == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(1e-4)  # min_lr at max_iters
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # and stays there
    decay = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_iters=0, max_iters=50)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3)
    assert lr_at(50, no_warmup) == pytest.approx(2e-4)


def test_lr_decay_iters_keeps_the_schedule_when_max_iters_grows():
    base = TrainConfig(max_iters=110, warmup_iters=10, lr=1e-3, min_lr=1e-4)
    extended = TrainConfig(max_iters=300, warmup_iters=10, lr=1e-3, min_lr=1e-4, lr_decay_iters=110)
    assert [lr_at(i, extended) for i in range(300)] == [lr_at(i, base) for i in range(300)]
    assert lr_at(60, TrainConfig(max_iters=110, warmup_iters=10, lr_decay_iters=210)) > lr_at(60, base)
    with pytest.raises(ValueError, match="--lr-decay-iters must be positive"):
        TrainConfig(lr_decay_iters=0)

