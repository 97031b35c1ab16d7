"""nanoGPT-style training: AdamW (decay on 2-D params only), cosine LR with
warmup, gradient clipping and accumulation, periodic eval, best checkpoint
kept, exact resume.

Every random draw of iteration i (batch offsets, dropout) is seeded from
(seed, i), so a run resumed at iteration i continues exactly as if it had
never stopped.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint.format import TRAIN_STATE, CheckpointError, load_model_dir, save_checkpoint
from .data import Dataset
from .model import GPT, GPTConfig

log = logging.getLogger(__name__)
LOSS_CSV = "loss.csv"


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_acc_steps: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    # The cosine reaches min_lr here (default: max_iters). Set it to extend a
    # finished run with more iterations without changing its schedule.
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 50
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ValueError(f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        for name in ("batch_size", "grad_acc_steps", "max_iters", "eval_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (or max_iters), then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    span = max(1, (cfg.lr_decay_iters or cfg.max_iters) - cfg.warmup_iters)
    ratio = min(1.0, (it - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(cfg: TrainConfig):
    if cfg.dtype == "float32":
        return nullcontext()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=dtype)


def _loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


@torch.no_grad()
def estimate_loss(model: GPT, data: Dataset, cfg: TrainConfig, it: int,
                  on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Mean loss of eval_iters batches of each split; on_batch(done, total) after each
    batch (an evaluation takes as long as many iterations: the user sees it move)."""
    model.eval()
    out = {}
    total = 2 * cfg.eval_iters
    for k, split in enumerate(("train", "val")):
        rng = np.random.default_rng([cfg.seed, it, 7 + k])
        losses = []
        for i in range(cfg.eval_iters):
            x, y = data.batch(split, cfg.batch_size, model.config.block_size, rng)
            with _autocast(cfg):
                losses.append(_loss(model, x.to(cfg.device), y.to(cfg.device)).item())
            if on_batch is not None:
                on_batch(k * cfg.eval_iters + i + 1, total)
        out[split] = float(np.mean(losses))
    model.train()
    return out


def _step(model: GPT, opt: torch.optim.Optimizer, data: Dataset, cfg: TrainConfig, it: int
          ) -> float:
    """Iteration `it`: its learning rate, grad_acc_steps micro-batches drawn from
    (seed, it), clipping and one optimizer step. Returns the iteration's loss."""
    for group in opt.param_groups:
        group["lr"] = lr_at(it, cfg)
    rng = np.random.default_rng([cfg.seed, it])
    torch.manual_seed(cfg.seed * 1_000_003 + it)  # dropout masks of this iteration
    for _ in range(cfg.grad_acc_steps):
        x, y = data.batch("train", cfg.batch_size, model.config.block_size, rng)
        with _autocast(cfg):
            loss = _loss(model, x.to(cfg.device), y.to(cfg.device)) / cfg.grad_acc_steps
        loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item() * cfg.grad_acc_steps


def train(data_dir: str | Path, out_dir: str | Path, model_config: GPTConfig | None,
          cfg: TrainConfig, resume: bool = False, plot: bool = False,
          progress: bool = True) -> dict:
    """Train (or resume) and write the best checkpoint to out_dir. Returns a summary."""
    data = Dataset.load(data_dir)
    out = Path(out_dir)
    state = None
    if resume:
        state_path = out / TRAIN_STATE
        if not state_path.is_file():
            raise CheckpointError(f"cannot resume: {state_path} not found")
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        model, info = load_model_dir(out, device=cfg.device)
        model.load_state_dict(state["model"])
        model_config = info.config
    else:
        if model_config is None:
            raise ValueError("a model config is needed to train from scratch")
        torch.manual_seed(cfg.seed)
        model = GPT(model_config).to(cfg.device)
    if model_config.vocab_size != data.tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} != data vocabulary "
                         f"{data.tokenizer.vocab_size}")
    model.train()
    opt = make_optimizer(model, cfg)
    it, best_val = 0, float("inf")
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        it, best_val = int(state["iter_num"]), float(state["best_val_loss"])
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / LOSS_CSV
    if not resume or not csv_path.exists():
        csv_path.write_text("iter,train_loss,val_loss,lr,elapsed_s\n")
    tokens_per_iter = cfg.batch_size * cfg.grad_acc_steps * model_config.block_size
    log.info("training %.2fM parameters, %d tokens per iteration, from iteration %d",
             model.num_params() / 1e6, tokens_per_iter, it)
    bar = tqdm(total=cfg.max_iters, initial=it, disable=not progress, unit="it", dynamic_ncols=True)
    t0 = last = time.perf_counter()
    last_losses: dict[str, float] = {}
    start_it = it
    while it <= cfg.max_iters:
        evaluate = it % cfg.eval_interval == 0 or it == cfg.max_iters
        if evaluate and not (state is not None and it == start_it):  # evaluated before the stop
            last_losses = estimate_loss(model, data, cfg, it, lambda done, total: bar.set_postfix_str(
                f"evaluating: batch {done}/{total}"))
            with csv_path.open("a", newline="") as f:
                csv.writer(f).writerow([it, f"{last_losses['train']:.4f}", f"{last_losses['val']:.4f}",
                                        f"{lr_at(it, cfg):.6g}", f"{time.perf_counter() - t0:.1f}"])
            # stderr, with the bar: stdout is left to the command's result (JSON).
            bar.write(f"iter {it}: train {last_losses['train']:.4f}, val {last_losses['val']:.4f}",
                      file=sys.stderr)
            meta = {"iter_num": it, "best_val_loss": min(best_val, last_losses["val"]),
                    "train_loss": last_losses["train"], "val_loss": last_losses["val"],
                    "train_config": asdict(cfg), "data": str(data.dir),
                    "tokenizer": data.tokenizer.kind}
            if last_losses["val"] < best_val:
                best_val = last_losses["val"]
                save_checkpoint(out, model, data.tokenizer, meta)
            elif not (out / "config.json").exists():
                save_checkpoint(out, model, data.tokenizer, meta)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "iter_num": it, "best_val_loss": best_val}, out / TRAIN_STATE)
        if it == cfg.max_iters:
            break
        loss = _step(model, opt, data, cfg, it)
        it += 1
        now = time.perf_counter()
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_iter / max(now - last, 1e-9):,.0f}")
        last = now
        bar.update(1)
    bar.close()
    if plot:
        from .plots import plot_loss
        plot_loss(csv_path, out / "loss.png")
    return {"iter_num": it, "best_val_loss": best_val, "final": last_losses,
            "elapsed_s": time.perf_counter() - t0, "checkpoint": str(out)}
