"""What `mdi bench` writes: runs.csv, summary.md and the figures."""
from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

from ..generate.schedule import SampleState, accept, plan_step
from ..plots import finish_figure, plot_tokens_time, plt
from ..ring.protocol.wire import HEADER_SIZE
from .latency import LATENCY_FIELDS

CSV_FIELDS = ["timestamp", "config", "mode", "partition", "layers", "stage_ms", "node_cpu",
              "node_mem_mb",
              "n_nodes", "n_samples", "n_layer", "n_embd", "block_size", "params", "n_tokens",
              "quantize", "batch_invariant", "isolate", "hosts", "link_rate", "links", "run",
              "gen_time_s", "tokens_per_s", "first_token_s", "bytes_per_hop_per_token",
              "hop_overhead_us", "tokens_total", "prompt_tokens", "prefill_chunk", "temperature",
              *LATENCY_FIELDS, "tokens_sha", "replan", "slow_at", "tail_tokens_per_s", "replans",
              "paused_s", "moved", "fused_kernels"]


def fused_column(plan: dict | None) -> str:
    """A ring run's processes with the fused decode kernels, the starter first (--json's
    plan): y/n per process, ? where not known (ring/plan/fused_check.py); '' without a plan."""
    return "/".join({True: "y", False: "n"}.get(v, "?") for v in (plan or {}).get("fused_kernels", []))


def _links(rows: list[dict]) -> str:
    """What the ring runs' hops went over: "unix", "tcp", or both ("tcp+unix")."""
    kinds = sorted({k for r in rows for k in str(r.get("links") or "").split("/") if k})
    return "+".join(kinds) or "none"


def write_rows(rows: list[dict], path: Path, fields: list[str]) -> Path:
    """rows as CSV with these columns (the folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    prefixes = ("peak_rss_mb_node", "cpu_s_node", "hop_us_node")
    node_cols = sorted({k for r in rows for k in r if k.startswith(prefixes)},
                       key=lambda k: ([k.startswith(p) for p in prefixes].index(True),
                                      int(k.rsplit("node", 1)[1])))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + node_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _by_config(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["config"], []).append(r)
    return out


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def write_summary(rows: list[dict], path: Path, title: str) -> Path:
    groups = _by_config(rows)
    lines = [f"# {title}", "", "Medians over runs, (min–max) in brackets.", "",
             "| config | nodes | layers | tokens/s | gen time (s) | first token (s) | bytes/hop/token "
             "| hop overhead (µs/frame) | peak RSS per node (MB) | vs single |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        rss = []
        for i in range(rs[0]["n_nodes"]):
            vals = [r[f"peak_rss_mb_node{i}"] for r in rs]
            rss.append(f"{statistics.median(vals):.0f}")
        single = groups.get("single" + re.search(r"(-chunk\d+)?(-p\d+)?$", name).group(0))
        ratio = (f"{statistics.median(tps) / statistics.median(r['tokens_per_s'] for r in single):.2f}x"
                 if single else "n/a")  # against one device at the same prompt length and chunk
        layers = statistics.mode([r.get("layers") or "-" for r in rs])  # the usual plan
        lines.append(f"| {name} | {rs[0]['n_nodes']} | {layers} | {_stat(tps)} | "
                     f"{_stat([r['gen_time_s'] for r in rs])} | "
                     f"{_stat([r['first_token_s'] for r in rs])} | "
                     f"{statistics.median(r['bytes_per_hop_per_token'] for r in rs):.1f} | "
                     f"{statistics.median(r.get('hop_overhead_us', 0.0) for r in rs):.0f} | "
                     f"{' / '.join(rss)} | {ratio} |")
    r0 = rows[0]
    lines += ["", f"Model: {r0['n_layer']} layers, n_embd {r0['n_embd']}, block_size "
              f"{r0['block_size']}, {r0['params'] / 1e6:.2f}M parameters. {r0['n_samples']} samples x "
              f"{r0['n_tokens']} tokens; isolate={r0['isolate']}, hosts={r0['hosts']}, "
              f"link rate={r0['link_rate'] or 'unlimited'}, links={_links(rows)}"
              + (f", CPU share per node {r0['node_cpu']} (starter first)" if r0.get("node_cpu")
                 else "")
              + (f", memory limit per node {r0['node_mem_mb']} MiB (starter first)"
                 if r0.get("node_mem_mb") else "") + ".", ""]
    path.write_text("\n".join(lines + replan_lines(rows) + latency_lines(rows)))
    return path


def replan_lines(rows: list[dict]) -> list[str]:
    """With --slow-at or --replan: tokens/s over the last half of each run's steps, the
    re-plans and recoveries, how long the ring paused and which layers moved."""
    if not any(r.get("slow_at") or r.get("replan") for r in rows):
        return []
    slow = rows[0].get("slow_at")
    lines = ["## Re-planning", "",
             (f"`--slow-at {slow}` (token:node:share): " if slow else "")
             + "tokens/s over the last half of each run's steps (all samples), re-plans per "
             "run, seconds the ring paused (until tokens came again), layers at the end "
             "(the usual plan) and the layers moved (the last run's).", "",
             "| config | replan | tokens/s, last half | tokens/s, whole run | re-plans | paused (s) "
             "| layers at the end | moved |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in _by_config(rows).items():
        layers = statistics.mode([r.get("layers") or "-" for r in rs])
        lines.append(f"| {name} | {rs[0].get('replan') or 'default'} "
                     f"| {_stat([r['tail_tokens_per_s'] for r in rs])} "
                     f"| {_stat([r['tokens_per_s'] for r in rs])} "
                     f"| {statistics.median(r['replans'] for r in rs):g} "
                     f"| {_stat([r['paused_s'] for r in rs])} | {layers} "
                     f"| {rs[-1].get('moved') or '-'} |")
    return lines + [""]


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in rs)


def latency_lines(rows: list[dict]) -> list[str]:
    """The latency table: each configuration's TTFT and ITL by prompt length (medians over
    runs of each run's p50 and p99 over its samples), TTFT against the same configuration
    with --prefill-chunk 0 where that ran, and whether the tokens equal across configurations."""
    groups = _by_config(rows)
    lines = ["## Latency by prompt length", "",
             "Time to first token (TTFT, from submission) and inter-token latency (ITL): each "
             "run's p50 and p99 over its samples' tokens, median over runs.", "",
             "| config | prompt tokens | prefill chunk | TTFT p50 (s) | TTFT p99 (s) "
             "| ITL p50 (ms) | ITL p99 (ms) | TTFT vs chunk 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        chunk = rs[0].get("prefill_chunk", "")
        base = groups.get(name.replace(f"-chunk{chunk}", "-chunk0")) if chunk not in ("", 0) else None
        ratio = f"{_med(rs, 'ttft_p50_s') / _med(base, 'ttft_p50_s'):.2f}x" if base else "-"
        lines.append(f"| {name} | {rs[0]['prompt_tokens']} | {chunk if chunk != '' else 'default'} "
                     f"| {_med(rs, 'ttft_p50_s'):.3f} | {_med(rs, 'ttft_p99_s'):.3f} "
                     f"| {_med(rs, 'itl_p50_s') * 1e3:.1f} | {_med(rs, 'itl_p99_s') * 1e3:.1f} "
                     f"| {ratio} |")
    return lines + ["", tokens_note(rows), ""]


def token_mismatches(rows: list[dict]) -> list[str]:
    """Configurations whose tokens differ from the first configuration's at the same run and
    prompt length (runs of one index share their seed)."""
    first: dict[tuple, tuple[str, str]] = {}
    bad = []
    for r in rows:
        key = (r["run"], r["prompt_tokens"])
        _, sha = first.setdefault(key, (r["config"], r["tokens_sha"]))
        if r["tokens_sha"] != sha and r["config"] not in bad:
            bad.append(r["config"])
    return bad


def tokens_note(rows: list[dict]) -> str:
    bad = token_mismatches(rows)
    how = "greedy" if float(rows[0].get("temperature", 0.8)) == 0 else \
        f"sampled at temperature {rows[0].get('temperature')}, the same seed per run"
    if not bad:
        return f"Tokens ({how}): equal across all configurations of each run and prompt length."
    return (f"Tokens ({how}): differ from the run's first configuration in "
            f"{', '.join(bad)}.")


def mean_context(n_prompt: int, n_tokens: int, block_size: int) -> list[int]:
    """Context length seen at each decode step under the overflow policy."""
    s = SampleState.from_prompt([0] * n_prompt)
    out = []
    for _ in range(n_tokens):
        p = plan_step(s, block_size)
        out.append(p.position + 1)
        accept(s, 0)
    return out


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    groups = _by_config(rows)
    paths = []
    # 1. tokens against time, the median run of each configuration
    series = {}
    for name, rs in groups.items():
        med = sorted(rs, key=lambda r: r["gen_time_s"])[len(rs) // 2]
        n = med["n_samples"]
        series[name] = ([(i + 1) * n for i in range(len(med["step_times"]))], med["step_times"])
    paths.append(plot_tokens_time(series, out / "tokens_time.png", "tokens generated against time"))
    # 2. tokens/s against nodes
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in ("kv-cache", "resend-context"):
        pts = sorted((rs[0]["n_nodes"], [r["tokens_per_s"] for r in rs]) for rs in groups.values()
                     if rs[0]["mode"] in (mode, "single"))
        if len(pts) < 2 and mode == "resend-context":
            continue
        xs = [p[0] for p in pts]
        med = [statistics.median(p[1]) for p in pts]
        err = [[m - min(p[1]) for m, p in zip(med, pts)], [max(p[1]) - m for m, p in zip(med, pts)]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=mode)
    ax.set_xticks(sorted({r["n_nodes"] for r in rows}))
    paths.append(finish_figure(fig, ax, out / "tokens_per_s_vs_nodes.png", "throughput", "nodes",
                         "tokens/s (median, min-max)"))
    # 3. bytes per hop per token against context length: from the frame format,
    #    with each configuration's measured mean drawn at its mean context length
    r0 = rows[0]
    C, bs, n_tok = r0["n_embd"], r0["block_size"], r0["n_tokens"]
    ctx = list(range(1, bs + 1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    group = max(1, r0["n_samples"] // max(1, min(r0["n_samples"], max(r["n_nodes"] for r in rows))))
    ax.plot(ctx, [HEADER_SIZE / group + 4 * C] * len(ctx), label="KV cache: one token's activation")
    ax.plot(ctx, [HEADER_SIZE + 4 * C * L for L in ctx], label="resend context: whole context")
    lens = mean_context(1, n_tok, bs)
    for name, rs in groups.items():
        if rs[0]["n_nodes"] > 1:
            x = statistics.mean(lens)
            ax.scatter([x], [statistics.median(r["bytes_per_hop_per_token"] for r in rs)],
                       zorder=3, label=f"measured mean, {name}")
    ax.set_yscale("log")
    paths.append(finish_figure(fig, ax, out / "bytes_vs_context.png", "bytes one hop carries per token",
                         "context length (tokens)", "bytes (float32)"))
    # 4. time to first token by prompt length, a line per configuration
    paths.append(plot_ttft(rows, out / "ttft_by_prompt.png"))
    # 5. peak memory per node
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(groups)
    most = max(rs[0]["n_nodes"] for rs in groups.values())
    width = 0.8 / most
    for i in range(most):
        xs, hs = [], []
        for j, name in enumerate(names):
            rs = groups[name]
            k = rs[0]["n_nodes"]
            if i < k:
                xs.append(j + (i - (k - 1) / 2) * width)
                hs.append(statistics.median(r[f"peak_rss_mb_node{i}"] for r in rs))
        ax.bar(xs, hs, width=width, label="starter" if i == 0 else f"node {i}")
    ax.set_xticks(range(len(names)), names)
    paths.append(finish_figure(fig, ax, out / "memory_per_node.png", "peak RSS per node", "configuration",
                         "MB"))
    return paths


def plot_ttft(rows: list[dict], path: Path) -> Path:
    """Median TTFT p50 (line) and p99 (dashed) against prompt length, one colour per series."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r.get("series") or r["config"], []).append(r)
    for name, rs in series.items():
        lens = sorted({int(r["prompt_tokens"]) for r in rs})
        by = {n: [r for r in rs if int(r["prompt_tokens"]) == n] for n in lens}
        line, = ax.plot(lens, [_med(by[n], "ttft_p50_s") for n in lens], "o-", label=f"{name} p50")
        ax.plot(lens, [_med(by[n], "ttft_p99_s") for n in lens], "s--", color=line.get_color(),
                alpha=0.6)
    return finish_figure(fig, ax, path, "time to first token (p50 solid, p99 dashed)",
                         "prompt tokens", "seconds")
