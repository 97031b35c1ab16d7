"""What a node failure costs: `python -m mdi.bench.recovery --ckpt C --nodes 3 --spares 1
--recovery replay,reprefill`.

On a LocalCluster, one uninterrupted greedy run, then for each recovery mode the
same run on a fresh cluster with one node killed (or frozen) after a given number
of tokens. Prints one JSON object: the runs' tokens/s, whether each text equals
the uninterrupted one, the pause (the longest wait for a token among the 3 x
n_samples that follow the signal: detection, recovery and the first step of the
healed ring; per sequence too: the longest wait for one of its own next 3 tokens,
and their mean), and the
recovery record (failed node, new ring and plan, how, seconds to recover).
`--prompt-len N` gives every sample a prompt of N tokens (distinct per sample),
so the context a recovery must rebuild is long.
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
from ..cli.common import QUANTIZE_CHOICES, resolve_quantize
from ..engine.replay import RECOVERY_CHOICES
from ..generate.sampling import SamplingConfig
from ..ring.cluster.local_cluster import LocalCluster
from ..ring.node.replay_threads import ENV_VAR as REPLAY_THREADS
from ..ring.starter.driver import Starter
from ..ring.starter.options import RunOptions

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
FILLER = ("The quick brown fox jumps over the lazy dog, and the watchman counts the hours "
          "until morning; ")  # letters only: every character vocabulary has them


def prompts_of(tok, n_samples: int, prompt_len: int) -> list[list[int]]:
    """n_samples prompts of prompt_len tokens each, all different (a newline when 0)."""
    if prompt_len <= 0:
        return [tok.encode("\n")] * n_samples
    out = []
    for s in range(n_samples):
        ids: list[int] = []
        while len(ids) < prompt_len + 7 * s:
            ids += tok.encode(FILLER)
        out.append(ids[7 * s:7 * s + prompt_len])
    return out


def killed_run(args, ck, prompts, greedy, recovery: str) -> dict:
    """The run on a fresh cluster with args.victim signalled at token args.at."""
    opts = RunOptions(timeout=args.timeout, batch_invariant=True, recovery=recovery,
                      quantize=args.quantize)
    env = {REPLAY_THREADS: str(args.replay_threads)} if args.replay_threads else None
    with LocalCluster(args.nodes, threads=args.threads, node_timeout=args.timeout,
                      spares=args.spares, extra_env=env) as cluster:
        pids = {s.name: pid for s, pid in zip(cluster.members, cluster.pids)}
        made, after = 0, []  # the signal's time, then the events' that follow it
        per_seq: dict[int, list[float]] = {}  # sample -> the signal's time, its next 3 tokens'

        def on_event(i, ev) -> None:
            nonlocal made
            made += 1
            now = time.perf_counter()
            if after and len(after) <= 3 * len(prompts):
                after.append(now)
            if after and len(per_seq.setdefault(i, [after[0]])) <= 3:
                per_seq[i].append(now)
            if made == args.at:
                os.kill(pids[args.victim], SIGNALS[args.signal])
                after.append(time.perf_counter())

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
    # the pause: the longest wait for a token from the signal on (tokens of steps past
    # the lost node still arrive at once; the ring's recovery is the long wait after)
    pause = max((b - a for a, b in zip(after, after[1:])), default=None)
    # per sequence: the longest wait for one of its own next 3 tokens (lanes resume in turn)
    seq = [round(max(b - a for a, b in zip(t, t[1:])), 3) for _, t in sorted(per_seq.items())
           if len(t) > 1]
    return {"result": hit, "wall_s": round(wall, 2),
            "pause_s": round(pause, 3) if pause is not None else None, "seq_pause_s": seq}


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
    p.add_argument("--prompt-len", type=int, default=0, help="tokens per prompt (0: a newline)")
    p.add_argument("--recovery", default="reprefill",
                   help=f"comma-separated modes to measure, of {', '.join(RECOVERY_CHOICES)}")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="as the commands' (default: a GGUF file's own precision; none: float)")
    p.add_argument("--replay-threads", type=int, default=0,
                   help="threads of the spare's replay (0: every CPU it may use; 1: its --threads)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.recovery.split(",") if m.strip()]
    if not modes or any(m not in RECOVERY_CHOICES for m in modes):
        p.error(f"--recovery: modes of {', '.join(RECOVERY_CHOICES)}, got {args.recovery!r}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)  # the starter is a node like the others
    resolve_quantize(args)

    ck = open_checkpoint(args.ckpt)
    prompts = prompts_of(ck.tokenizer(), args.n_samples, args.prompt_len)
    greedy = SamplingConfig(temperature=0.0, top_k=None, seed=1)
    with LocalCluster(args.nodes, threads=args.threads, node_timeout=args.timeout) as cluster:
        base = Starter(cluster.nodes, cluster.token, ck,
                       RunOptions(timeout=args.timeout, batch_invariant=True,
                                  quantize=args.quantize)).run(
            prompts, args.n_tokens, greedy)
    runs = {m: killed_run(args, ck, prompts, greedy, m) for m in modes}
    out = {"ckpt": args.ckpt, "quantize": args.quantize or "none",
           "replay_threads": args.replay_threads or "all CPUs", "nodes": args.nodes, "spares": args.spares,
           "victim": args.victim, "signal": args.signal, "at_token": args.at,
           "n_samples": args.n_samples, "prompt_len": [len(q) for q in prompts][0],
           "uninterrupted_tokens_per_s": round(base.tokens_per_s, 2), "runs": {}}
    for m, r in runs.items():
        hit = r["result"]
        out["runs"][m] = {
            "pause_s": r["pause_s"], "seq_pause_s": r["seq_pause_s"],
            "seq_pause_mean_s": round(sum(r["seq_pause_s"]) / len(r["seq_pause_s"]), 3)
            if r["seq_pause_s"] else None,
            "wall_s": r["wall_s"], "equal": hit.tokens == base.tokens,
            "with_failure_tokens_per_s": round(hit.tokens_per_s, 2),
            "longest_step_s": round(max(b - a for a, b in zip([0.0, *hit.step_times],
                                                              hit.step_times)), 3),
            "recoveries": hit.recoveries}
    pauses = {m: r["pause_s"] for m, r in out["runs"].items()}
    if pauses.get("replay") and pauses.get("reprefill"):
        out["pause_replay_over_reprefill"] = round(pauses["replay"] / pauses["reprefill"], 3)
    means = {m: r["seq_pause_mean_s"] for m, r in out["runs"].items()}
    if means.get("replay") and means.get("reprefill"):
        out["seq_pause_mean_replay_over_reprefill"] = round(means["replay"] / means["reprefill"], 3)
    print(json.dumps(out, indent=1))
    return 0 if all(r["equal"] for r in out["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
