"""`mdi bench --vs-transformers`: mdi against Hugging Face `transformers` on the
same weights, at several numbers of concurrent sequences, in one process.

Both engines run the *same* random-weight (or trained) checkpoint: our GPT's
weights are copied into a `transformers.GPT2LMHeadModel` (its Conv1D layers
hold the transposed Linear weight; `activation_function="gelu"` is the exact
GELU our blocks use), and a test checks the two give the same logits. Every
configuration generates `n_tokens` new tokens greedily for `n` copies of the
same prompt, with the same torch thread count; the runs interleave
configuration by configuration so that a noisy machine slows all alike.
`transformers` is a test/bench dependency: imported inside the functions.
"""
from __future__ import annotations

import csv
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import Checkpoint, LoadOptions, load_model
from ..generate.local import generate_timed
from ..generate.sampling import SamplingConfig
from ..model import GPT
from ..model.quant import configure_stage
from .models import random_checkpoint

log = logging.getLogger(__name__)

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)
CSV_FIELDS = ["timestamp", "engine", "n_seqs", "run", "n_tokens", "threads", "gen_time_s",
              "tokens_per_s", "same_tokens_as_mdi"]


@dataclass
class VsConfig:
    ckpt: str | None = None
    model_size: str | None = "gpt2"
    seqs: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    n_tokens: int = 24
    runs: int = 3
    threads: int = 2
    out: str = "bench-vs-transformers"
    # Extra mdi variants besides plain "mdi", by name (see VARIANTS).
    variants: list[str] = field(default_factory=lambda: ["int8", "batch-invariant"])

    def __post_init__(self) -> None:
        if (self.ckpt is None) == (self.model_size is None):
            raise ValueError("give exactly one of --ckpt and --model-size")
        if not self.seqs or any(n < 1 for n in self.seqs):
            raise ValueError(f"--seqs must list positive counts, got {self.seqs}")
        for name in ("n_tokens", "runs", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown mdi variant(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(VARIANTS)}")


# Variant name -> how its model differs from plain mdi (fp32, batched decode,
# prepacked linears): configure_stage's arguments, and "packed_linears".
VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"quantize_mode": "int8"},
    "batch-invariant": {"batch_invariant": True},
    "dense": {"packed_linears": False},  # the plain nn.Linear (MKL) instead of oneDNN's packed
}


def variant_model(ckpt: str | Checkpoint, name: str) -> GPT:
    """The checkpoint's model (a spec, or the Checkpoint opened once) configured as variant `name`."""
    options = dict(VARIANTS[name])
    packed = options.pop("packed_linears", True)
    return configure_stage(load_model(ckpt, LoadOptions(pack=packed)).model.eval(), pack=packed,
                           **options)


def to_transformers(model: GPT) -> Any:
    """A transformers.GPT2LMHeadModel holding exactly `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if not (model.has_embeddings and model.has_head):
        raise ValueError("the comparison needs a whole model, not a stage")
    if not c.bias or c.head_bias or c.activation != "gelu":
        raise ValueError("transformers' GPT-2 needs biases, no head bias and GELU")
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                           n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu",
                           layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {}
    for key, value in ours.items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if key.startswith("transformer.h.") and key.endswith(conv1d):
            value = value.t()  # Conv1D stores (in, out)
        sd[key] = value.contiguous()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def hf_generate_timed(hf: Any, prompt: list[int], n_seqs: int, n_tokens: int
                      ) -> tuple[float, list[list[int]]]:
    """Greedy generation with transformers; returns (seconds, new tokens per sequence)."""
    ids = torch.tensor([prompt] * n_seqs, dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                          min_new_tokens=n_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        dt = time.perf_counter() - t0
    return dt, out[:, len(prompt):].tolist()


def mdi_generate_timed(model: GPT, prompt: list[int], n_seqs: int, n_tokens: int
                       ) -> tuple[float, list[list[int]]]:
    result = generate_timed(model, [prompt] * n_seqs, n_tokens, GREEDY)
    return result.gen_time_s, result.tokens


class VsTransformers:
    def __init__(self, cfg: VsConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = cfg.ckpt or str(random_checkpoint(cfg.model_size, self.out / "models"))

    def run(self) -> list[dict]:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        loaded = load_model(self.ckpt)  # opened once; the variants reuse the opened checkpoint
        base = loaded.model.eval()
        prompt = loaded.tokenizer.encode("\n")
        engines: dict[str, Callable[[int], tuple[float, list[list[int]]]]] = {}
        engines["mdi"] = lambda n: mdi_generate_timed(base, prompt, n, cfg.n_tokens)
        for name in cfg.variants:
            model = variant_model(loaded.checkpoint, name)
            engines[f"mdi-{name}"] = (lambda m: lambda n: mdi_generate_timed(
                m, prompt, n, cfg.n_tokens))(model)
        # from the plain weights (the packed stage above gave its plain copies up)
        hf = to_transformers(load_model(loaded.checkpoint, LoadOptions(pack=False)).model)
        engines["transformers"] = lambda n: hf_generate_timed(hf, prompt, n, cfg.n_tokens)
        # One untimed warm-up per engine (allocator, thread pool, lazy init).
        for fn in engines.values():
            fn(1)
        rows: list[dict] = []
        for run in range(cfg.runs):
            for n in cfg.seqs:
                mdi_tokens = None
                for name, fn in engines.items():
                    dt, tokens = fn(n)
                    if name == "mdi":
                        mdi_tokens = tokens
                    same = sum(a == b for a, b in zip(tokens, mdi_tokens)) / n
                    rows.append({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "engine": name,
                                 "n_seqs": n, "run": run, "n_tokens": cfg.n_tokens,
                                 "threads": cfg.threads, "gen_time_s": round(dt, 6),
                                 "tokens_per_s": round(n * cfg.n_tokens / dt, 3),
                                 "same_tokens_as_mdi": round(same, 3)})
                    log.info("%s n=%d run %d: %.1f tokens/s", name, n, run,
                             rows[-1]["tokens_per_s"])
        return rows


def medians(rows: list[dict]) -> dict[tuple[str, int], float]:
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        by.setdefault((r["engine"], r["n_seqs"]), []).append(r["tokens_per_s"])
    return {k: statistics.median(v) for k, v in by.items()}


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def summary_table(rows: list[dict]) -> str:
    """Markdown: one row per sequence count, tokens/s per engine, ratios to transformers."""
    med = medians(rows)
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    seqs = sorted({r["n_seqs"] for r in rows})
    mdis = [e for e in engines if e != "transformers"]
    head = ["seqs"] + [f"{e} tok/s" for e in engines] + [f"{e} / transformers" for e in mdis]
    head += ["mdi vs mdi at 1 seq"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in seqs:
        cells = [str(n)] + [f"{med[(e, n)]:.1f}" for e in engines]
        cells += [f"{med[(e, n)] / med[('transformers', n)]:.2f}x" for e in mdis]
        cells.append(f"{med[('mdi', n)] / med[('mdi', seqs[0])]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path, title: str) -> list[Path]:
    from ..plots import finish_figure, plt

    r0 = rows[0]
    text = [f"# {title}", "", f"Greedy, {r0['n_tokens']} new tokens per sequence, "
            f"{r0['threads']} torch threads, medians over {max(r['run'] for r in rows) + 1} runs.",
            "", summary_table(rows), ""]
    md = out / "summary.md"
    md.write_text("\n".join(text))
    med = medians(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seqs = sorted({r["n_seqs"] for r in rows})
    for e in dict.fromkeys(r["engine"] for r in rows):
        ax.plot(seqs, [med[(e, n)] for n in seqs], marker="o", label=e)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(n) for n in seqs])
    png = finish_figure(fig, ax, out / "vs_transformers.png", "decode throughput, same weights",
                  "concurrent sequences", "tokens/s (median)")
    return [write_csv(rows, out / "vs_transformers.csv"), md, png]
