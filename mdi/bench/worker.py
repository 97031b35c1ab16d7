"""One measured generation, run as its own process so that its peak RSS and CPU
time are its own: `python -m mdi.bench.worker ...` prints one JSON object."""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys

import torch

from ..checkpoint import LoadOptions, load_model, open_checkpoint
from ..cli.common import UsageError
from ..cli.preflight import check_fits_here
from ..ring.protocol.auth import resolve_token
from ..ring.cluster.nodes_config import load_nodes_config
from ..ring.starter.driver import Starter
from ..ring.starter.options import RunOptions
from ..engine.batch import generate_local
from ..engine.local import LocalEngine
from ..engine.scheduler import DEFAULT_PREFILL_CHUNK
from ..generate.sampling import SamplingConfig
from ..model.quant import QUANT_MODES
from .latency import latency_stats, prompt_ids


def _peak_rss_mb(usage) -> float:
    """This process's peak RSS: VmHWM where there is one (ru_maxrss carries over the
    forking parent's peak across fork and exec, and the runner's can be larger)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return usage.ru_maxrss / 1024


def _slow_at(spec: str | None):
    """The on_step callback of --slow-at (None without it)."""
    if not spec:
        return None
    token, path, quota = spec.split(":")

    def on_step(k: int) -> None:
        if k + 1 == int(token):  # step k done: every sample has k + 1 tokens
            with open(path, "w") as f:
                f.write(quota)
    return on_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi.bench.worker")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--nodes-config")
    p.add_argument("--n-samples", type=int, required=True)
    p.add_argument("--n-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--resend-context", action="store_true")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None)
    p.add_argument("--batch-invariant", action="store_true")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--partition", choices=["auto", "even"], default=None)
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompts of this many tokens (default: one newline)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--compile", action="store_true", help="decode through a compiled step")
    p.add_argument("--join-prefill", choices=["batched", "each"], default="batched",
                   help="a step's prefill chunks as one frame (batched) or one frame each")
    p.add_argument("--replan", choices=["on", "off"], default="on")
    p.add_argument("--slow-at", metavar="TOKEN:FILE:QUOTA_US",
                   help="once every sample has TOKEN tokens, write QUOTA_US to FILE (a node's "
                        "cpu.cfs_quota_us; the bench's --slow-at)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampling = SamplingConfig(temperature=args.temperature, top_k=200, seed=args.seed)
    ck = open_checkpoint(args.ckpt)  # once: the ring's starter and the local model take it opened
    tok = ck.tokenizer()
    prompt = prompt_ids(tok, args.prompt_tokens) if args.prompt_tokens else tok.encode("\n")
    prompts = [prompt] * args.n_samples
    if args.nodes_config:
        starter = Starter(load_nodes_config(args.nodes_config), resolve_token(), ck,
                          RunOptions(timeout=args.timeout, resend_context=args.resend_context,
                                     quantize=args.quantize, batch_invariant=args.batch_invariant,
                                     max_context=args.max_context, partition=args.partition,
                                     n_groups=args.micro_batches,
                                     prefill_chunk=args.prefill_chunk,
                                     batch_prefill=args.join_prefill == "batched",
                                     replan=args.replan == "on"),
                          on_step=_slow_at(args.slow_at))
        result = starter.run(prompts, args.n_tokens, sampling)
    else:
        try:
            check_fits_here(ck, len(prompts), "float32", args.max_context, args.quantize)
        except UsageError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 2
        model = load_model(ck, LoadOptions(dtype=torch.float32,  # as the starter's default
                                           quantize=args.quantize, batch_invariant=args.batch_invariant,
                                           max_context=args.max_context,
                                           compile=args.compile)).model
        def engine() -> LocalEngine:  # as `mdi sample`, with the ring's prefill chunks
            e = LocalEngine(model, tok, max_seqs=len(prompts), prefill_chunk=args.prefill_chunk)
            e.batch_prefill = args.join_prefill == "batched"
            return e
        result = generate_local(engine, prompts, args.n_tokens, sampling)
        result.hops = []  # the same keys as a ring run's
    out = result.to_json()
    out.pop("samples", None)
    out["step_times"] = [round(t, 6) for t in result.step_times]
    out["tokens_total"] = sum(len(t) for t in result.tokens)
    out["prompt_tokens"] = len(prompt)
    out.update(latency_stats(result.sample_token_times()))
    # which tokens: configurations of one run (same seed) compare by this digest
    out["tokens_sha"] = hashlib.sha256(json.dumps(result.tokens).encode()).hexdigest()[:12]
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process is the starter node
    out["peak_rss_mb"] = _peak_rss_mb(usage)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    if args.compile and not args.nodes_config:  # the first call of each graph: compile or cache load
        out["compile_s"] = round(sum(model.compiled_decode.shapes.values()), 3)
        out["graphs"] = len(model.compiled_decode.shapes)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
