"""`mdi convert`: import a nanoGPT or original-MDI checkpoint into our format."""
from __future__ import annotations

import argparse

from ..checkpoint import read_info
from ..checkpoint.imports import convert


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.out, meta=args.meta, overwrite=args.force)
    info = read_info(out)
    print(f"wrote {out}: {info.training.get('imported_from')} checkpoint, {info.config.n_layer} "
          f"layers, n_embd {info.config.n_embd}, vocabulary {info.config.vocab_size}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a nanoGPT or original-MDI ckpt.pt")
    p.add_argument("src", metavar="SRC.pt", help="checkpoint written by nanoGPT or the original MDI")
    p.add_argument("--meta", metavar="META.pkl", default=None,
                   help="char vocabulary (default: look for meta.pkl where those systems keep it)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint at --out")
    p.set_defaults(func=cmd_convert)
