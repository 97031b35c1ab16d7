"""`mdi serve`: the OpenAI-compatible API and the chat page over the engine."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import open_checkpoint
from ..checkpoint.sampling_defaults import sampling_defaults
from ..engine.step_times import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_SHARE
from ..engine.replay import DEFAULT_RECOVERY, RECOVERY_CHOICES
from .common import (RECOVERY_HELP, REPLAN_CHOICES, REPLAN_HELP, BATCH_INVARIANT_HELP, CKPT_HELP,
                     DEVICE_HELP,
                     AUTO_DTYPE_HELP, DTYPE_CHOICES, NO_RECOVER_HELP,
                     NODES_CONFIG_HELP, NODES_HELP, PARTITION_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP,
                     RING_TIMEOUT_HELP, SPARES_HELP, THREADS_HELP, TOKEN_FILE_HELP, TOKEN_HELP,
                     UsageError, add_kv_dtype, add_max_context, add_prefill_chunk)
from .preflight import check_local_nodes

log = logging.getLogger("mdi")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_SEQS_HELP = "sequences generated together (the engine's slots)"


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, create_app, serve
    from ..serve.server import bind
    from ..serve.backend import open_backend
    from .common import set_threads

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.default_max_tokens <= 0:
        raise UsageError(f"--default-max-tokens must be positive, got {args.default_max_tokens}")
    options = backend_options(args)  # the options' own checks, before anything is opened
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template: cannot read {args.chat_template}: {e}") from None
    api_key = api_key_of(args)
    if api_key is None and args.host not in LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set MDI_API_KEY or --api-key-file)", args.host)
    set_threads(args.threads)
    name = args.model_name or Path(args.ckpt.rstrip("/")).name
    config = ServeConfig(model_name=name, api_key=api_key, default_max_tokens=args.default_max_tokens,
                         chat_template=template, strict_model_name=args.strict_model_name)
    ck = open_checkpoint(args.ckpt)
    if args.nodes_config is None and args.nodes != 1:  # before a port or a process is taken
        check_local_nodes(args, ck)
    bind(args.host, args.port).close()  # a taken port fails now, before the model loads (exit 4)
    with open_backend(options) as backend:
        config.sampling = sampling_defaults(ck, backend.tokenizer)
        log.info("requests that set no sampling values use the model's: %s",
                 config.sampling.describe())
        app = create_app(backend.factory, backend.tokenizer, config)
        ready = (f"{backend.description}; model {name!r} at http://{args.host}:{args.port}/ "
                 "(chat page) and /v1 (OpenAI API)")
        serve(announce_when_ready(app, ready), args.host, args.port,
              log_level="debug" if args.verbose else "info")
    return 0


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key-file or --api-key (which shows in `ps`), else MDI_API_KEY, else None."""
    path = getattr(args, "api_key_file", None)
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file: cannot read {path}: {e}") from None
        if not key:
            raise ValueError(f"--api-key-file: {path} is empty")
        return key
    key = args.api_key or os.environ.get("MDI_API_KEY") or None
    if args.api_key:
        log.warning("--api-key shows in the process list; prefer MDI_API_KEY or --api-key-file")
    return key


def announce_when_ready(app: Any, message: str) -> Any:
    """The ASGI app, logging `message` once its startup (where the engine starts and the
    ring forms) has completed: the URL is printed when it answers, not before."""
    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def send_and_announce(msg: dict) -> None:
            await send(msg)
            if msg.get("type") == "lifespan.startup.complete":
                log.info("%s", message)
        return await app(scope, receive, send_and_announce)
    return wrapped


def backend_options(args: argparse.Namespace):  # -> BackendOptions
    from ..serve.backend import BackendOptions

    try:  # BackendOptions checks its fields: a bad one is a bad option value
        return BackendOptions(
            ckpt=args.ckpt, nodes=args.nodes, nodes_config=getattr(args, "nodes_config", None),
            max_seqs=args.max_seqs, queue=getattr(args, "queue", None),
            batch_invariant=args.batch_invariant, device=args.device, dtype=args.dtype,
            token=getattr(args, "token", None), token_file=getattr(args, "token_file", None),
            timeout=args.timeout, threads=args.threads, quantize=getattr(args, "quantize", None),
            partition=getattr(args, "partition", None),
            recover=not getattr(args, "no_recover", False), spares=getattr(args, "spares", 0),
            recovery=getattr(args, "recovery", DEFAULT_RECOVERY),
            replan=getattr(args, "replan", "on") == "on",
            max_context=getattr(args, "max_context", None),
            kv_dtype=getattr(args, "kv_dtype", None),
            compile=getattr(args, "compile", False),
            stall_timeout=getattr(args, "stall_timeout", 30.0),
            prefill_chunk=getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK),
            prefill_share=getattr(args, "prefill_share", DEFAULT_PREFILL_SHARE))
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_serve_bench(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from ..bench.latency import prompt_ids
    from ..bench.serve_load import LoadConfig, run_load, write_csv, write_plot

    try:
        levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated counts, got {args.concurrency!r}") from None
    try:
        lengths = [int(x) for x in (args.prompt_tokens or "").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-tokens must be comma-separated counts, got "
                         f"{args.prompt_tokens!r}") from None
    if (lengths or args.long_prompt_tokens) and args.url and not args.tokenizer:
        raise ValueError("--prompt-tokens or --long-prompt-tokens with --url needs --tokenizer "
                         "CKPT (the served model's checkpoint, whose tokenizer makes the prompts)")
    if args.attack and args.url:  # before any level runs: it attacks what it is pointed at
        from urllib.parse import urlsplit

        from ..bench.abuse import check_loopback
        check_loopback(urlsplit(args.url).hostname or "")
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        if args.url:
            if not args.model_name:
                raise ValueError("--url needs --model-name (the id the server serves)")
            url, name, label = args.url.rstrip("/"), args.model_name, args.url
            tok = None
            if lengths or args.long_prompt_tokens:
                from ..checkpoint import open_checkpoint
                tok = open_checkpoint(args.tokenizer).tokenizer()
        else:  # our own server, in this process, on a free loopback port
            from ..serve import BackgroundServer, ServeConfig, create_app
            from ..serve.backend import open_backend

            backend = stack.enter_context(open_backend(backend_options(args)))
            name = args.model_name or Path(args.ckpt.rstrip("/")).name
            app = create_app(backend.factory, backend.tokenizer, ServeConfig(name))
            srv = stack.enter_context(BackgroundServer(app))
            url, label = srv.url, f"{name}, {args.nodes} node(s), max-seqs {args.max_seqs}"
            tok = backend.tokenizer
        cfg = LoadConfig(url=url, model=name, api_key=args.api_key or os.environ.get("MDI_API_KEY"),
                         concurrency=levels, requests_per_client=args.requests,
                         max_tokens=args.max_tokens, prompt=args.prompt,
                         token_prompts=tuple(tuple(prompt_ids(tok, n)) for n in lengths),
                         attack=(args.attack_slow, args.attack_unread) if args.attack else None,
                         long_prompt=tuple(prompt_ids(tok, args.long_prompt_tokens))
                         if args.long_prompt_tokens else (),
                         long_after_s=args.long_prompt_after)
        rows = run_load(cfg)
    files = [write_csv(rows, out / "serve_load.csv"),
             write_plot(rows, out / "serve_load.png", f"mdi serve: {label}")]
    (out / "serve_load.json").write_text(json.dumps(vars(args), default=str, indent=2) + "\n")
    print(f"{'prompt':>6} {'clients':>7} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'errors':>6}" + ("  attack" if args.attack else ""))
    for r in rows:
        print(f"{r['prompt_tokens']:>6} {r['concurrency']:>7} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f} {r['itl_p50_s']:>8.4f} "
              f"{r['itl_p99_s']:>8.4f} {r['errors']:>6}" + (f"  {r['attack'] or '-'}" if args.attack
                                                           else ""))
    for r in rows if args.long_prompt_tokens else ():
        print(f"a {r['long_prompt_tokens']}-token prompt arriving among {r['concurrency']} "
              f"stream(s): its TTFT {r['long_ttft_s']:.2f} s; the streams' ITL during its prefill "
              f"p50 {r['itl_long_p50_s']:.4f} s, p99 {r['itl_long_p99_s']:.4f} s "
              f"({r['itl_long_p99_s'] / r['itl_p50_s']:.1f}x their p50 over the level; "
              f"{r['itl_long_count']} gaps)")
    for calm, hit in zip(rows[::2], rows[1::2]) if args.attack else ():
        print(f"under attack: {hit['tokens_per_s'] / calm['tokens_per_s']:.2f}x the tokens/s at "
              f"{calm['concurrency']} client(s), prompt {calm['prompt_tokens']}")
    for f in files:
        print(f, file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


SERVE_COMPILE_HELP = (
    "compile the decode step ahead of time (AOTInductor; needs a C++ compiler): one package per "
    "row bucket of 1..--max-seqs rows (1, 2, 4, 8, ...; from 2 rows, one with every row at one "
    "position and one at several: 7 packages for 8 slots, 11 for 32), all loaded or built at "
    "start, before the server takes a request, so that no stream waits for one. A first start "
    "builds them, about a minute each on 2 cores (several minutes in all: the log says how "
    "long; a smaller --max-seqs builds fewer); later starts load them from "
    "~/.cache/mdi/inductor/mdi-aoti (MDI_CACHE_DIR moves it), a second or two each. Prefill "
    "stays eager. Single-device only; not with --batch-invariant (docs/benchmarks.md has its "
    "figures)")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    add_kv_dtype(p)
    add_max_context(p)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--timeout", type=float, default=10.0, help=RING_TIMEOUT_HELP)
    p.add_argument("--partition", choices=["auto", "even"], default=None, help=PARTITION_HELP)
    p.add_argument("--no-recover", action="store_true", help=NO_RECOVER_HELP)
    p.add_argument("--recovery", choices=RECOVERY_CHOICES, default=DEFAULT_RECOVERY,
                   help=RECOVERY_HELP)
    p.add_argument("--replan", choices=REPLAN_CHOICES, default="on", help=REPLAN_HELP)
    p.add_argument("--spares", type=int, default=0, help=SPARES_HELP)
    p.add_argument("--compile", action="store_true", help=SERVE_COMPILE_HELP)
    add_prefill_chunk(p)
    p.add_argument("--prefill-share", type=float, default=DEFAULT_PREFILL_SHARE, metavar="S",
                   help="while other requests decode, a prompt's chunk is cut to cost about S "
                        "decode steps (measured as it runs), so a long prompt slows the streams "
                        "around it instead of stopping them; 0: chunks of --prefill-chunk "
                        f"tokens; ignored with --batch-invariant (default {DEFAULT_PREFILL_SHARE:g})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API (completions, chat, streaming) and a chat page")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, default=1, help=NODES_HELP)
    where.add_argument("--nodes-config", metavar="FILE", help=NODES_CONFIG_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-seqs", type=int, default=8, help=MAX_SEQS_HELP)
    p.add_argument("--queue", type=int, default=None,
                   help="sequences waiting for a slot before requests get 429 (default: the engine's)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="FILE", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1, KEY read from FILE (or set "
                          "env MDI_API_KEY; default: no key)")
    key.add_argument("--api-key", default=None,
                     help="the key itself (shows in `ps`: prefer MDI_API_KEY or --api-key-file)")
    p.add_argument("--strict-model-name", action="store_true",
                   help="refuse requests whose model is not --model-name (default: any name is "
                        "accepted and answered as this model)")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="cancel a sequence whose client has read none of its tokens for this many "
                        "seconds, freeing its slots on every node (default 30)")
    p.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="chat completions without max_tokens stop after this many (default 256)")
    _engine_options(p)
    p.add_argument("--token", help=TOKEN_HELP)
    p.add_argument("--token-file", help=TOKEN_FILE_HELP)
    p.set_defaults(func=cmd_serve)

    b = sub.add_parser("serve-bench", help="load benchmark of the API: req/s, TTFT, ITL, tokens/s "
                                           "at several concurrencies (CSV + plot)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (with --model-name)")
    src.add_argument("--ckpt", help=CKPT_HELP)
    b.add_argument("--model-name", default=None,
                   help="the model id to ask for (needed with --url; default with --ckpt: the "
                        "directory name)")
    b.add_argument("--nodes", type=int, default=1, help=NODES_HELP)
    b.add_argument("--max-seqs", type=int, default=32, help=MAX_SEQS_HELP)
    b.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    _engine_options(b)
    b.add_argument("--api-key", default=None, help="for --url (default: env MDI_API_KEY)")
    b.add_argument("--concurrency", default="1,4,16,32", help="client counts (default 1,4,16,32)")
    b.add_argument("--requests", type=int, default=4, help="requests per client per level (default 4)")
    b.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    b.add_argument("--prompt", default="\n", help="the prompt of every request")
    b.add_argument("--prompt-tokens", metavar="LIST",
                   help="instead of --prompt, prompts of these token lengths (e.g. 128,2048: a "
                        "fixed passage in the model's tokenizer, repeated), every level at each: "
                        "TTFT and ITL by prompt length")
    b.add_argument("--tokenizer", metavar="CKPT",
                   help="with --url and --prompt-tokens: the checkpoint whose tokenizer makes the "
                        "prompts (the served model's)")
    b.add_argument("--long-prompt-tokens", type=int, default=None, metavar="N",
                   help="one more request with an N-token prompt arrives --long-prompt-after "
                        "seconds into each level: its TTFT and the other streams' ITL during its "
                        "prefill (does a long prompt freeze the others?)")
    b.add_argument("--long-prompt-after", type=float, default=1.0, metavar="S",
                   help="with --long-prompt-tokens: seconds into each level (default 1)")
    b.add_argument("--attack", action="store_true",
                   help="run every level again while slow-body sockets and never-read streams "
                        "attack the server (loopback only): tokens/s side by side")
    b.add_argument("--attack-slow", type=int, default=140, metavar="N",
                   help="with --attack: sockets sending a body one byte each 0.5 s (default 140)")
    b.add_argument("--attack-unread", type=int, default=16, metavar="N",
                   help="with --attack: streams that are never read (default 16)")
    b.add_argument("--out", required=True, help="output directory (serve_load.csv, serve_load.png)")
    b.set_defaults(func=cmd_serve_bench)
