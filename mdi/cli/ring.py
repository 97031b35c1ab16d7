"""Distributed commands: node, starter, split, run."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from tqdm import tqdm

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.sampling_defaults import sampling_defaults
from ..generate.sampling import SamplingConfig
from ..generate.stops import Stops
from ..ring.protocol.auth import resolve_token
from ..ring.cluster.nodes_config import NodesConfig, load_nodes_config
from ..ring.starter.driver import Starter
from ..ring.starter.options import NodeFailure, RunOptions
from ..results import GenerationResult, Texts
from ..tokenizer import Tokenizer
from ..engine.replay import DEFAULT_RECOVERY, RECOVERY_CHOICES
from .common import (RECOVERY_HELP, REPLAN_CHOICES, REPLAN_HELP, CKPT_HELP, NO_RECOVER_HELP, NODES_CONFIG_HELP, NODES_HELP, PARTITION_HELP,
                     RING_TIMEOUT_HELP, SPARES_HELP, THREADS_HELP, TOKEN_FILE_HELP, TOKEN_HELP,
                     UsageError, add_generation_options, check_counts, check_prompt_lengths,
                     compute_info, emit, encode_prompts, read_prompts, sampling_config,
                     set_threads, stops_of)
from .preflight import check_local_nodes
from .stream import StreamPrinter

if TYPE_CHECKING:
    from ..ring.cluster.local_cluster import LocalCluster

log = logging.getLogger("mdi")
DEFAULT_TIMEOUT = RunOptions.timeout  # 10 s
DEFAULT_IDLE_TIMEOUT = 60.0  # node.DEFAULT_IDLE_TIMEOUT, without importing the node runtime here


def _token_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument("--token-file", help=TOKEN_FILE_HELP)


def cmd_node(args: argparse.Namespace) -> int:
    from ..ring.plan.limits import parse_size
    from ..ring.node.runtime import NodeRuntime
    from ..ring.node.process import run_node

    set_threads(args.threads)
    _check_timeout(args.timeout)
    token = resolve_token(args.token, args.token_file)
    spec = load_nodes_config(args.nodes_config).find(args.role, args.index)
    if spec.role == "starter":
        raise UsageError("the starter runs `mdi starter`, not `mdi node`")
    if args.idle_timeout < 0:
        raise UsageError(f"--idle-timeout must be 0 (never) or a positive number of seconds, "
                         f"got {args.idle_timeout:g}")
    try:
        max_memory = parse_size(args.max_memory) if args.max_memory else None
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    rt = NodeRuntime(spec, token, chunk_dir=args.chunk, timeout=args.timeout, bind_any=args.bind_any,
                     max_memory=max_memory, idle_timeout=args.idle_timeout)
    run_node(rt)
    return 0


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout:g}")


@dataclass
class _Job:
    """A ring run, prepared and checked before any node process starts."""
    ck: Checkpoint
    tok: Tokenizer
    ids: list[list[int]]
    prompts: list[str]
    sampling: SamplingConfig
    n_tokens: int
    stops: Stops


def _prepare(args: argparse.Namespace, ck: Checkpoint) -> _Job:
    """Everything a run needs that no node does: the tokenizer, the sampling settings,
    the prompts encoded, the stops (each bad value one UsageError)."""
    check_counts(args)
    run_options(args)  # --compile refused before a node starts
    prompts = read_prompts(args.prompt, args.n_samples)
    tok = ck.tokenizer()
    ids = encode_prompts(tok, prompts, chat=args.chat)
    if not args.resend_context:  # the no-cache mode has no window: it feeds the whole context
        check_prompt_lengths(ids, ck.config.block_size, args.max_context, args.truncate)
    if args.chat:  # the answer starts on a line of its own
        prompts = [p + "\n" for p in prompts]
    if args.resend_context:  # the original system's no-cache mode runs the full budget
        if args.stop:
            raise UsageError("--stop needs the KV-cache ring; it does not work with --resend-context")
        stops = Stops()
    else:
        stops = stops_of(args, tok)
    sampling, n_tokens = sampling_config(args, sampling_defaults(ck, tok))
    return _Job(ck, tok, ids, prompts, sampling, n_tokens, stops)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The ring's options from the command line (run, starter, chat)."""
    if getattr(args, "compile", False):
        raise UsageError("--compile is single-device only for now (mdi sample, mdi chat, mdi serve "
                         "without --nodes): the ring's stages decode eagerly")
    return RunOptions(device=args.device, dtype=args.dtype, timeout=args.timeout,
                      n_groups=getattr(args, "micro_batches", None),
                      resend_context=getattr(args, "resend_context", False),
                      quantize=args.quantize, batch_invariant=args.batch_invariant,
                      max_context=args.max_context, kv_dtype=args.kv_dtype,
                      partition=args.partition,
                      recover=not args.no_recover, prefill_chunk=args.prefill_chunk,
                      recovery=args.recovery, replan=args.replan == "on")


def _generate(args: argparse.Namespace, job: _Job, nodes, token: str) -> int:
    """Generate over the ring of `nodes` from the checkpoint the command opened (once)."""
    # text streams to stdout as it comes (but with --resend-context); --json prints at the end
    printer = None if args.json or args.resend_context else StreamPrinter(job.prompts)
    bar = tqdm(total=job.n_tokens, unit="tok", disable=None if printer is None else True,
               desc="generating", leave=False)
    starter = Starter(nodes, token, job.ck, run_options(args),
                      on_step=lambda i: bar.update(1), on_event=printer)
    try:
        result = starter.run(job.ids, job.n_tokens, job.sampling, Texts(job.tok, job.prompts),
                             job.stops)
        error = None
    except NodeFailure as e:
        if e.partial is None:
            raise
        result, error = e.partial, e  # the partial result names the failure itself
        if printer is not None:
            printer.finish()  # what the other samples produced before the failure
    finally:
        bar.close()
    result.compute = compute_info(args)  # one dtype for every node: the starter's choice
    emit(args, result, printed=printer is not None)
    if not args.json and error is None:
        _print_hops(result)
    if error is not None:
        print(f"mdi {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def _print_hops(result: GenerationResult) -> None:
    for h in result.hops or []:
        print(f"  {h.src} -> {h.dst}: {round(h.bytes_per_token, 3):.1f} bytes/token after prefill, "
              f"{h.prefill_bytes} bytes of prefill; per frame: wait "
              f"{h.per_frame_us(h.wait_s):.0f} us, compute {h.per_frame_us(h.compute_s):.0f} us, "
              f"overhead {h.overhead_us:.0f} us", file=sys.stderr)
    if result.n_nodes > 1:
        print(f"  bytes per hop per token (activations): {result.bytes_per_hop_per_token:.1f}",
              file=sys.stderr)


def cmd_starter(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    _check_timeout(args.timeout)
    nodes, token = _listed_nodes(args)
    return _generate(args, _prepare(args, open_checkpoint(args.ckpt)), nodes, token)


def _listed_nodes(args: argparse.Namespace) -> tuple[NodesConfig, str]:
    """The nodes of --nodes-config and the cluster token (a starter alone talks to nobody:
    no token needed)."""
    nodes = load_nodes_config(args.nodes_config)
    return nodes, resolve_token(args.token, args.token_file) if nodes.secondaries else ""


@contextlib.contextmanager
def nodes_and_token(args: argparse.Namespace) -> Iterator[tuple[NodesConfig, str]]:
    """The ring of add_ring_options: the nodes of --nodes-config, or --nodes N local ones
    (started here, ended on leaving)."""
    _check_timeout(args.timeout)
    if args.nodes_config is not None:
        yield _listed_nodes(args)
        return
    from ..ring.cluster.local_cluster import default_threads

    with local_cluster(args, args.threads or default_threads(args.nodes)) as cluster:
        yield cluster.nodes, cluster.token


def cmd_split(args: argparse.Namespace) -> int:
    from ..ring.cluster.split import write_chunks

    for path in write_chunks(args.ckpt, args.nodes, args.out):
        print(path)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..ring.cluster.local_cluster import default_threads

    _check_timeout(args.timeout)
    ck = open_checkpoint(args.ckpt)  # every check that needs no process, before one starts
    check_local_nodes(args, ck)
    job = _prepare(args, ck)
    threads = args.threads or default_threads(args.nodes)
    set_threads(threads)
    with local_cluster(args, threads) as cluster:
        return _generate(args, job, cluster.nodes, cluster.token)


@contextlib.contextmanager
def local_cluster(args: argparse.Namespace, threads: int) -> Iterator[LocalCluster]:
    """`--nodes N`: the N-1 node processes (and --spares), started with a status line and
    ended however the command ends: SIGTERM and SIGHUP unwind like Ctrl-C, so the
    cluster's __exit__ ends every child."""
    from ..ring.cluster.local_cluster import LocalCluster

    n = args.nodes - 1 + args.spares
    if n:
        log.info("starting %d local node process(es)", n)
    bar = tqdm(total=n, desc="starting nodes", unit="node", disable=None if n else True, leave=False)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with LocalCluster(args.nodes, threads=threads, node_timeout=args.timeout,
                          spares=args.spares,
                          on_ready=lambda ready, total: bar.update(ready - bar.n)) as cluster:
            bar.close()
            yield cluster
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def add_ring_options(p: argparse.ArgumentParser) -> None:
    """Where a ring comes from and how it behaves (chat; serve has its own copy in
    cli/serve.py with the same help texts)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, default=1, help=NODES_HELP)
    where.add_argument("--nodes-config", metavar="FILE", help=NODES_CONFIG_HELP)
    p.add_argument("--spares", type=int, default=0, help=SPARES_HELP)
    _fault_options(p)
    _token_options(p)


def _fault_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=RING_TIMEOUT_HELP)
    p.add_argument("--no-recover", action="store_true", help=NO_RECOVER_HELP)
    p.add_argument("--recovery", choices=RECOVERY_CHOICES, default=DEFAULT_RECOVERY,
                   help=RECOVERY_HELP)
    p.add_argument("--replan", choices=REPLAN_CHOICES, default="on", help=REPLAN_HELP)
    p.add_argument("--partition", choices=["auto", "even"], default=None, help=PARTITION_HELP)


def _dist_options(p: argparse.ArgumentParser) -> None:
    _fault_options(p)
    p.add_argument("--micro-batches", type=int, default=None,
                   help="groups of samples in flight (default min(n_samples, n_nodes), fewer "
                        "when nodes share a machine's cores: as many as can compute at once)")
    p.add_argument("--resend-context", action="store_true",
                   help="no KV cache: send the whole context every step, as the original system "
                        "did (for comparisons)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="serve as an intermediate or finisher node",
                       epilog="exit status: 0 after /shutdown, SIGTERM or SIGINT; 1 a bad nodes file or "
                              "token; 2 command-line syntax or a bad option value; 4 a port cannot be bound (taken, or not an "
                              "address of this host). 3 is the starter's, for a failed node.")
    p.add_argument("--nodes-config", required=True, help=NODES_CONFIG_HELP)
    p.add_argument("--role", required=True, choices=["intermediate", "finisher", "spare"],
                   help="the node's entry in the nodes file; a spare joins the ring only when "
                        "a node fails mid-generation")
    p.add_argument("--index", type=int, default=0, help="which intermediate or spare")
    p.add_argument("--chunk", help="a chunk directory from `mdi split` to load weights from")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds for a handshake, a connect, the next node to take a frame, "
                        "or a control client to send its request headers (default 10)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="the most a run may take on this node, weights plus KV caches, e.g. "
                        "512MB, 2GB, 2GiB (default: the free memory at /init); larger runs "
                        "are refused at /init")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                   help="drop a run whose previous node has sent no frame for this many "
                        "seconds while sequences are in flight (a starter frozen without "
                        "closing its link) and wait for the next one; an idle mdi serve ring "
                        "is not timed; 0: never "
                        f"(default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--bind-any", action="store_true",
                   help="listen on all interfaces instead of the address in the nodes file")
    _token_options(p)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("starter", help="configure the nodes and generate")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--nodes-config", required=True, help=NODES_CONFIG_HELP)
    add_generation_options(p)
    _dist_options(p)
    _token_options(p)
    p.set_defaults(func=cmd_starter)

    p = sub.add_parser("split", help="write per-node chunks of a checkpoint")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--nodes", type=int, required=True,
                   help="nodes of the ring, the starter included: one chunk each, even layer shares")
    p.add_argument("--out", required=True,
                   help="directory to write node0/, node1/, ... (one chunk directory per node, "
                        "for `mdi node --chunk`)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("run", help="start N local nodes and the starter in one command")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--nodes", type=int, default=1, help=NODES_HELP)
    p.add_argument("--spares", type=int, default=0, help=SPARES_HELP)
    add_generation_options(p)
    _dist_options(p)
    p.set_defaults(func=cmd_run)
