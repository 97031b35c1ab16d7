"""`mdi serve`: the OpenAI-compatible API and the chat page over the engine."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..model.dtypes import DTYPES

log = logging.getLogger("mdi")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, create_app, serve
    from ..serve.backend import BackendOptions, engine_factory
    from .common import set_threads

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.default_max_tokens <= 0:
        raise ValueError(f"--default-max-tokens must be positive, got {args.default_max_tokens}")
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template: cannot read {args.chat_template}: {e}") from None
    api_key = args.api_key or os.environ.get("MDI_API_KEY") or None
    if api_key is None and args.host not in LOOPBACK:
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key or MDI_API_KEY)", args.host)
    set_threads(args.threads)
    opts = BackendOptions(ckpt=args.ckpt, nodes=args.nodes, nodes_config=args.nodes_config,
                          max_seqs=args.max_seqs, queue=args.queue,
                          batch_invariant=args.batch_invariant, device=args.device, dtype=args.dtype)
    factory, tokenizer = engine_factory(opts)
    name = args.model_name or Path(args.ckpt.rstrip("/")).name
    config = ServeConfig(model_name=name, api_key=api_key, default_max_tokens=args.default_max_tokens,
                         chat_template=template)
    app = create_app(factory, tokenizer, config)
    log.info("model %r: http://%s:%d/ (chat page), /v1 (OpenAI API)", name, args.host, args.port)
    serve(app, args.host, args.port, log_level="debug" if args.verbose else "info")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API (completions, chat, streaming) and a chat page")
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, default=1, help="local nodes of the ring (default 1: one device)")
    where.add_argument("--nodes-config", metavar="FILE", help="nodes file of an existing cluster")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-seqs", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--queue", type=int, default=None,
                   help="sequences waiting for a slot before requests get 429 (default: the engine's)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env MDI_API_KEY, else none)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a sequence's tokens do not depend on the others decoded with it")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="chat completions without max_tokens stop after this many (default 256)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_serve)
