"""What a node failure costs: `python -m mdi.bench.recovery --ckpt C --nodes 3 --spares 1`.

On a LocalCluster, one uninterrupted greedy run, then the same run with one
node killed (or frozen) after a given number of tokens. Prints one JSON object:
both runs' tokens/s, whether the texts are equal, and the recovery record
(failed node, new ring and plan, seconds to recover).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time

import torch

from ..checkpoint import open_checkpoint
from ..generate.sampling import SamplingConfig
from ..ring.cluster.local_cluster import LocalCluster
from ..ring.starter.driver import Starter
from ..ring.starter.options import RunOptions

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--spares", type=int, default=0)
    p.add_argument("--victim", default="intermediate[0]", help="node name, e.g. finisher")
    p.add_argument("--signal", choices=sorted(SIGNALS), default="kill")
    p.add_argument("--at", type=int, default=50, help="tokens (all samples) before the signal")
    p.add_argument("--n-samples", type=int, default=3)
    p.add_argument("--n-tokens", type=int, default=100)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)  # the starter is a node like the others

    ck = open_checkpoint(args.ckpt)
    ids = ck.tokenizer().encode("\n")
    prompts = [ids] * args.n_samples
    greedy = SamplingConfig(temperature=0.0, top_k=None, seed=1)
    opts = RunOptions(timeout=args.timeout, batch_invariant=True)
    with LocalCluster(args.nodes, threads=args.threads, node_timeout=args.timeout,
                      spares=args.spares) as cluster:
        base = Starter(cluster.nodes, cluster.token, ck, opts).run(
            prompts, args.n_tokens, greedy)
        pids = {s.name: pid for s, pid in zip(cluster.members, cluster.pids)}
        made = 0

        def on_event(i, ev) -> None:
            nonlocal made
            made += 1
            if made == args.at:
                os.kill(pids[args.victim], SIGNALS[args.signal])

        t0 = time.perf_counter()
        try:
            hit = Starter(cluster.nodes, cluster.token, ck, opts, on_event=on_event).run(
                prompts, args.n_tokens, greedy)
        finally:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        wall = time.perf_counter() - t0
    print(json.dumps({"ckpt": args.ckpt, "nodes": args.nodes, "spares": args.spares,
                      "victim": args.victim, "signal": args.signal, "at_token": args.at,
                      "uninterrupted_tokens_per_s": round(base.tokens_per_s, 2),
                      "with_failure_tokens_per_s": round(hit.tokens_per_s, 2),
                      "wall_s": round(wall, 2), "equal": hit.tokens == base.tokens,
                      "longest_step_s": round(max(b - a for a, b in zip([0.0, *hit.step_times],
                                                                        hit.step_times)), 3),
                      "recoveries": hit.recoveries}, indent=1))
    return 0 if hit.tokens == base.tokens else 1


if __name__ == "__main__":
    raise SystemExit(main())
