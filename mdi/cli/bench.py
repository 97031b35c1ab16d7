"""`mdi bench`: timings of a matrix of configurations to CSV, summary and plots."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (BATCH_INVARIANT_HELP, CKPT_HELP, DTYPE_CHOICES, QUANTIZE_CHOICES,
                     QUANTIZE_HELP, SEED_HELP, add_max_context)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.cgroup import CgroupUnavailable, parse_mem_limits, parse_shares, parse_slow_at
    from ..bench.netns import NetnsUnavailable
    from ..bench.report import write_csv, write_plots, write_summary
    from ..bench.runner import Bench, BenchConfig

    if args.vs_transformers:
        return cmd_vs_transformers(args)
    if args.vs_llamacpp:
        return cmd_vs_llamacpp(args)
    if args.profile:
        return cmd_profile(args)
    if args.compile:
        return cmd_compile_bench(args)
    nodes = _counts(args.nodes, "--nodes")
    cfg = BenchConfig(ckpt=args.ckpt, model_size=args.model_size, nodes=nodes,
                      n_samples=args.n_samples, n_tokens=args.n_tokens or 500, runs=args.runs, out=args.out,
                      isolate=args.isolate, hosts=args.hosts, link_rate=args.link_rate,
                      resend_context=args.resend_context, seed=args.seed,
                      quantize=args.quantize, batch_invariant=args.batch_invariant,
                      max_context=args.max_context, node_cpu=parse_shares(args.node_cpu) if args.node_cpu else None,
                      node_mem=parse_mem_limits(args.node_mem) if args.node_mem else None,
                      partitions=[x.strip() for x in (args.partition or "").split(",") if x.strip()],
                      micro_batches=args.micro_batches,
                      prompt_tokens=_counts(args.prompt_tokens or "", "--prompt-tokens"),
                      prefill_chunks=_counts(args.prefill_chunk or "", "--prefill-chunk"),
                      join_prefills=[x.strip() for x in (args.join_prefill or "").split(",")
                                     if x.strip()],
                      temperature=args.temperature,
                      slow_at=parse_slow_at(args.slow_at) if args.slow_at else None,
                      replans=[x.strip() for x in (args.replan or "").split(",") if x.strip()])
    try:
        bench = Bench(cfg)
        rows = bench.run()
    except (NetnsUnavailable, CgroupUnavailable) as e:
        print(f"mdi bench: skipped: {e}", file=sys.stderr)
        return 0
    out = Path(args.out)
    files = [write_csv(rows, out / "runs.csv"),
             write_summary(rows, out / "summary.md", f"mdi bench: {Path(bench.ckpt).name}")]
    files += write_plots(rows, out)
    (out / "bench.json").write_text(json.dumps(vars(args), default=str, indent=2) + "\n")
    print((out / "summary.md").read_text())
    for f in files:
        print(f, file=sys.stderr)
    return 0


def _llama_quantize(args: argparse.Namespace) -> str:
    """mdi's --quantize beside llama.cpp: "none" when asked outright, the file's
    precision ("auto") when not given."""
    return "none" if getattr(args, "quantize_none", False) else args.quantize or "auto"


def _counts(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of counts, got {text!r}") from None


def cmd_vs_llamacpp(args: argparse.Namespace) -> int:
    from ..bench.vs_llamacpp import LlamaCppConfig, format_summary, run_vs_llamacpp
    from ..checkpoint.shipped import is_shipped_name, shipped_path

    if not args.llama_bench:
        print("mdi bench --vs-llamacpp: no llama.cpp given (--llama-bench PATH): nothing to compare "
              "with; --vs-transformers compares with transformers", file=sys.stderr)
        return 2
    if not args.ckpt:
        raise ValueError("--vs-llamacpp needs --ckpt: a GGUF file or a shipped model's name")
    gguf = shipped_path(args.ckpt) if is_shipped_name(args.ckpt) else Path(args.ckpt)
    if gguf.suffix != ".gguf" or not gguf.is_file():
        raise ValueError(f"--vs-llamacpp: {args.ckpt} is not a GGUF file (llama.cpp reads only those)")
    cfg = LlamaCppConfig(gguf=str(gguf), llama_bench=args.llama_bench,
                         seqs=_counts(args.seqs if args.seqs != "1,4,16,64" else "1,4,16", "--seqs"),
                         n_tokens=args.n_tokens or 64, runs=min(args.runs, 2),
                         threads=args.threads or 2, quantize=_llama_quantize(args), out=args.out,
                         kv_dtype=args.llama_kv_dtype, prefill=args.llama_prefill,
                         dtypes=[d.strip() for d in args.llama_dtypes.split(",") if d.strip()])
    modes = [m.strip() for m in (args.compile or "off").split(",") if m.strip()]
    if not modes or set(modes) - {"off", "on"}:
        raise ValueError(f"--vs-llamacpp takes --compile off, on or off,on, got {args.compile!r}")
    cfg.compile = [m == "on" for m in dict.fromkeys(modes)]
    if cfg.prefill < 0:
        raise ValueError(f"--llama-prefill must be 0 (none) or a prompt length, got {cfg.prefill}")
    bad = [d for d in cfg.dtypes if d not in DTYPE_CHOICES]
    if bad or not cfg.dtypes:
        raise ValueError(f"--llama-dtypes: {bad or 'none'} (choose from {', '.join(DTYPE_CHOICES)})")
    cfg.tools()  # named now, before anything runs
    summary = run_vs_llamacpp(cfg)
    print(format_summary(summary))
    for name in ("runs.csv", "summary.csv", "tokens_per_s.png", "peak_rss.png"):
        print(Path(args.out) / name, file=sys.stderr)
    return 0


def cmd_compile_bench(args: argparse.Namespace) -> int:
    from ..bench.compile_bench import CompileBenchConfig, format_summary, run_compile_bench
    from ..bench.models import random_checkpoint

    ckpt = args.ckpt or random_checkpoint(args.model_size, Path(args.out) / "models")
    cfg = CompileBenchConfig(ckpt=str(ckpt), modes=[m.strip() for m in args.compile.split(",")],
                             seqs=_counts(args.seqs if args.seqs != "1,4,16,64" else "1,16",
                                          "--seqs"),
                             n_tokens=args.n_tokens or 64, threads=args.threads or 2,
                             quantize=args.quantize, out=args.out)
    print(format_summary(run_compile_bench(cfg)))
    print(Path(args.out) / "runs.csv", file=sys.stderr)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from ..bench.models import random_checkpoint
    from ..bench.profile import profile_rows, table, write_csv
    from ..checkpoint import LoadOptions, load_model

    ckpt = args.ckpt or random_checkpoint(args.model_size, Path(args.out) / "models")
    compiled = (args.compile or "off") == "on"
    if args.compile not in (None, "off", "on"):
        raise ValueError(f"--profile takes --compile off or on, got {args.compile!r}")
    model = load_model(ckpt, LoadOptions(quantize=args.quantize, max_context=args.max_context,
                                         compile=compiled)).model
    weights = args.quantize or str(model.first_param().dtype).removeprefix("torch.")
    weights += " compiled" if compiled else ""
    rows = profile_rows(model, weights, _counts(args.seqs if args.seqs != "1,4,16,64" else "1,16",
                                                "--seqs"))
    print(table(rows))
    print(write_csv(rows, Path(args.out) / "profile.csv"), file=sys.stderr)
    return 0


def cmd_vs_transformers(args: argparse.Namespace) -> int:
    from ..bench.vs_transformers import VsConfig, VsTransformers, write_report

    cfg = VsConfig(ckpt=args.ckpt, model_size=args.model_size, seqs=_counts(args.seqs, "--seqs"),
                   n_tokens=args.n_tokens or 24, runs=args.runs, threads=args.threads or 2,
                   out=args.out, variants=[v for v in args.mdi_variants.split(",") if v.strip()])
    bench = VsTransformers(cfg)
    rows = bench.run()
    out = Path(args.out)
    files = write_report(rows, out, f"mdi vs transformers: {Path(bench.ckpt).name}")
    (out / "bench.json").write_text(json.dumps(vars(args), default=str, indent=2) + "\n")
    print((out / "summary.md").read_text())
    for f in files:
        print(f, file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark single-device and distributed generation")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help=CKPT_HELP)
    src.add_argument("--model-size", help="random weights at a named size: tiny, bundled, gpt2, "
                                          "gpt2-medium, smollm2-135m, tinyllama-1.1b (the last two "
                                          "written as Hugging Face directories in bfloat16)")
    p.add_argument("--nodes", default="1,2,3", help="comma-separated node counts; 1 is single-device")
    p.add_argument("--n-samples", type=int, default=3, help="samples to generate")
    p.add_argument("--n-tokens", type=int, default=None,
                   help="new tokens per sample (default 500; 24 with --vs-transformers)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of every configuration")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--isolate", action="store_true", help="pin each node to its own core(s)")
    p.add_argument("--hosts", choices=["local", "netns"], default="local",
                   help="netns: each node in its own network namespace (needs root)")
    p.add_argument("--link-rate", help="cap every link with tc tbf, e.g. 100mbit (with --hosts netns)")
    p.add_argument("--resend-context", action="store_true",
                   help="also run the original system's no-cache mode for comparison")
    _ring_scenario_options(p)
    p.add_argument("--prompt-tokens", metavar="LIST",
                   help="prompts of these token lengths, each a configuration of its own, e.g. "
                        "128,2048 (a fixed passage in the model's tokenizer, repeated; default: "
                        "one newline); time to first token and inter-token latency by length")
    p.add_argument("--prefill-chunk", metavar="LIST",
                   help="run every configuration with each of these --prefill-chunk values side "
                        "by side, e.g. 0,256 (0: a prompt in one frame; default: the engine's)")
    p.add_argument("--join-prefill", metavar="LIST",
                   help="run every configuration with sequences that join a lane together "
                        "prefilled as one packed frame (batched) and/or one frame each (each), "
                        "side by side, e.g. batched,each (default: batched)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default 0.8; 0: greedy, so the summary's check "
                        "that tokens equal across configurations is exact)")
    p.add_argument("--seed", type=int, default=1337, help=SEED_HELP)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    p.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    add_max_context(p)
    v = p.add_argument_group("comparison with Hugging Face transformers (same weights, one process)")
    v.add_argument("--vs-transformers", action="store_true",
                   help="compare single-device mdi with transformers' generate, greedy")
    v.add_argument("--seqs", default="1,4,16,64", help="concurrent sequences (default 1,4,16,64)")
    v.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    v.add_argument("--mdi-variants", default="int8,batch-invariant",
                   help="mdi variants run beside plain mdi: int8, batch-invariant, dense (the plain "
                        "nn.Linear instead of prepacked weights; comma-separated, "
                        "may be empty)")
    p.add_argument("--profile", action="store_true",
                   help="count the operator calls (aten's and mdi's kernels') of one decode step at "
                        "each of --seqs rows (default 1,16 here), per layer, with --quantize's "
                        "weights (profile.csv)")
    p.add_argument("--compile", metavar="LIST",
                   help="off,on: single-device runs at each of --seqs (default 1,16 here), eager "
                        "and with the decode step compiled, this twice (a cold start with an empty "
                        "Inductor cache under --out, then a cached start), greedy, --n-tokens "
                        "(default 64); with --profile: on counts the calls of a compiled step; "
                        "with --vs-llamacpp: mdi's rows eager and/or compiled (packages built "
                        "in an untimed run first)")
    ll = p.add_argument_group("comparison with llama.cpp (the same GGUF file, one process each)")
    ll.add_argument("--vs-llamacpp", action="store_true",
                    help="compare single-device mdi with llama.cpp on --ckpt's GGUF file at each of "
                         "--seqs (default 1,4,16 here): tokens/s and peak RSS, with plots; mdi keeps "
                         "the file's precision (--quantize int4 for Q4 files, int8 for Q8_0)")
    ll.add_argument("--llama-kv-dtype", metavar="DTYPE", choices=("bfloat16", "float16"),
                    help="mdi's --kv-dtype in the comparison (llama.cpp's cache is float16; "
                         "default: mdi's compute dtype)")
    ll.add_argument("--llama-dtypes", metavar="LIST", default="auto",
                    help="mdi's --dtype in the comparison, each a row of its own beside the same "
                         "llama.cpp figure, e.g. auto,float32 (default: auto)")
    ll.add_argument("--llama-prefill", metavar="N", type=int, default=0,
                    help="also prompt processing, one sequence: llama-bench's ppN beside mdi's "
                         "N-token prompt (N / time to its first token), e.g. 128")
    ll.add_argument("--llama-bench", metavar="PATH",
                    help="llama.cpp's llama-bench (llama-batched-bench beside it), built by you; "
                         "see docs/benchmarks.md")
    p.set_defaults(func=cmd_bench)


def _ring_scenario_options(p: argparse.ArgumentParser) -> None:
    """The distributed runs' devices and plans: slow or small nodes, partitions."""
    p.add_argument("--node-cpu", metavar="SHARES",
                   help="CPU share of one core per node, starter first, e.g. 1,1,0.3: emulates "
                        "slow devices with cgroup v1 CPU quotas (needs root)")
    p.add_argument("--node-mem", metavar="SIZES",
                   help="memory limit per node, starter first, e.g. 700M,700M,700M: emulates "
                        "small devices with cgroup v1 memory limits (needs root); nodes plan with "
                        "what their group allows, and a process past it is killed by the kernel")
    p.add_argument("--slow-at", metavar="TOKEN:NODE:SHARE",
                   help="once every sample has TOKEN tokens, node NODE's CPU share (0: the "
                        "starter) becomes SHARE of a core, e.g. 100:2:0.2: a device that slows "
                        "down mid-run (needs --node-cpu; restored before the next run)")
    p.add_argument("--replan", metavar="LIST",
                   help="run every distributed configuration with live re-planning on and/or "
                        "off side by side, e.g. on,off (default: the starter's, on)")
    p.add_argument("--partition", metavar="LIST",
                   help="run each distributed configuration with these partitions side by side, "
                        "e.g. auto,even (default: the starter's own choice)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="lanes in flight on the ring (default: as many as the nodes can compute "
                        "at once, at most one per node)")
