"""matplotlib figures in one style (files only, no display)."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def finish_figure(fig, ax, path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tokens_time(series: dict[str, tuple[list[float], list[float]]], path: str | Path,
                     title: str = "") -> Path:
    """series: label -> (tokens, seconds). Time on y as in the original system's plot."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (tokens, seconds) in series.items():
        ax.plot(tokens, seconds, label=label)
    return finish_figure(fig, ax, path, title or "generation time", "tokens generated", "time (s)")


def plot_loss(csv_path: str | Path, path: str | Path) -> Path:
    rows = list(csv.DictReader(Path(csv_path).open()))
    it = [int(r["iter"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(it, [float(r["train_loss"]) for r in rows], label="train")
    ax.plot(it, [float(r["val_loss"]) for r in rows], label="val")
    return finish_figure(fig, ax, path, "loss", "iteration", "cross-entropy loss")
