"""`mdi bench --profile`: aten calls per layer of one decode step (issue 21).

The whole model is loaded as a run loads it (stored dtype, `--quantize`,
prepacked float32 weights), prefills PROMPT positions for each of `rows`
sequences, decodes one warm-up step and then one step under torch.profiler.
Every aten event of that step is counted, nested ones included (an op and the
ops it calls), which is the count issue 21 quotes, and every call of mdi's own
kernels (`mdi_fused::`, model/csrc: the low-bit products are theirs); `per_layer` is the step's
count over the model's layers (the embedding and the head included), so it
falls as the layers' own work does. Counts, not times: they do not drift with
the machine's load.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..generate import step
from ..model import GPT, fused_ops
from .report import write_rows

PROMPT = 8  # positions each sequence holds before the profiled step
FIELDS = ["weights", "kernels", "rows", "aten_calls", "per_layer", "top"]


def count_decode(model: GPT, rows: int) -> tuple[int, Counter]:
    """The operator calls of one decode step of `rows` sequences (aten's, and mdi's
    own kernels', model/csrc: each is a call the step makes), and their names."""
    vocab = model.config.vocab_size
    cache = model.new_cache(rows)
    with torch.inference_mode():
        for r in range(rows):
            step.prefill(model, cache, r, [(r + i) % vocab for i in range(PROMPT)])
        step.decode(model, cache, [1 % vocab] * rows, [PROMPT] * rows)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step.decode(model, cache, [2 % vocab] * rows, [PROMPT + 1] * rows)
    names = Counter(e.name for e in prof.events() if e.name.startswith(("aten::", "mdi_fused::")))
    return sum(names.values()), names


def profile_rows(model: GPT, weights: str, rows: list[int]) -> list[dict]:
    # mdi's fused decode kernels or torch's operations (MDI_FUSED_OPS=0, no compiler)
    kernels = "fused" if fused_ops.ops() is not None else "torch"
    out = []
    for n in rows:
        total, names = count_decode(model, n)
        top = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in names.most_common(6))
        out.append({"weights": weights, "kernels": kernels, "rows": n, "aten_calls": total,
                    "per_layer": round(total / model.config.n_layer, 1), "top": top})
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    return write_rows(rows, path, FIELDS)


def table(rows: list[dict]) -> str:
    lines = [f"{'weights':<17} {'kernels':<7} {'rows':>5} {'op calls':>11} {'per layer':>10}  most called"]
    lines += [f"{r['weights']:<17} {r['kernels']:<7} {r['rows']:>5} {r['aten_calls']:>11} "
              f"{r['per_layer']:>10}  {r['top']}" for r in rows]
    return "\n".join(lines)
