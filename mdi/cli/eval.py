"""`mdi eval`: sliding-window perplexity of a checkpoint on a text file."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import LoadOptions, load_model
from ..eval import perplexity
from .common import (AUTO_DTYPE_HELP, CKPT_HELP, DEVICE_HELP, DTYPE_CHOICES, DTYPES, KV_DTYPES,
                     QUANTIZE_CHOICES, QUANTIZE_HELP, THREADS_HELP, UsageError, add_kv_dtype,
                     set_threads)




def cmd_eval(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    try:
        text = Path(args.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --data {args.data}: {e}") from None
    kv_dtype = KV_DTYPES[args.kv_dtype] if args.kv_dtype else None
    loaded = load_model(args.ckpt, LoadOptions(device=args.device, dtype=DTYPES[args.dtype],
                                               quantize=args.quantize, kv_dtype=kv_dtype))
    model, tok, context = loaded.model, loaded.tokenizer, loaded.model.config.block_size
    ids = tok.encode(text)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")
        ids = ids[:args.max_tokens]
    window = args.window or context
    if window > context:
        raise UsageError(f"--window {window} exceeds the model's context of {context} tokens")
    stride = args.stride or max(1, window // 2)
    if kv_dtype is not None:  # each window goes through a cache: one as long as the window
        model.max_context = window
    t0 = time.perf_counter()
    with tqdm(unit="window", disable=None, desc="perplexity", leave=False) as bar:
        def progress(i: int, n: int) -> None:
            bar.total = n
            bar.update(1)
        try:
            result = perplexity(model if kv_dtype is None else through_cache(model), ids, window,
                                stride, device=args.device, on_window=progress)
        except ValueError as e:
            raise UsageError(str(e)) from None
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**result.to_dict(), "seconds": seconds, "ckpt": args.ckpt,
                          "data": args.data, "dtype": args.dtype,
                          "kv_dtype": args.kv_dtype}))
    else:
        print(f"perplexity {result.ppl:.4f} (nll {result.nll:.4f} nats/token) over "
              f"{result.n_scored} tokens of {args.data}; window {window}, stride {stride}, "
              f"{result.n_windows} forwards, {seconds:.1f} s")
    return 0


def through_cache(model):
    """--kv-dtype: each window is a prefill into a fresh cache of that dtype, so
    attention reads the keys and values as the cache stores them."""
    def logits(x):
        pos = torch.arange(x.shape[1], device=x.device)[None]
        return model(x, pos, model.new_cache(1))
    return logits


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint on a text file (sliding window)")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward (default: the model's context length)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts "
                   "(default: window // 2; window = non-overlapping)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    add_kv_dtype(p)  # given: each window is scored through a cache of that dtype
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)
