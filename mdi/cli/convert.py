"""`mdi convert`: import a nanoGPT or original-MDI checkpoint into our format; write a GGUF
as a Hugging Face directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import CheckpointError, read_info
from ..checkpoint.imports import convert
from ..checkpoint.shipped import hf_source_to_dir, source_for


def cmd_convert(args: argparse.Namespace) -> int:
    src = source_for(args.src)  # a .gguf file or a shipped model's name: an HF directory
    if src is not None:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.force:
            raise CheckpointError(f"{out} exists and is not empty (use --force to overwrite)")
        hf_source_to_dir(src, out)
        c = src.config
        print(f"wrote {out}: Hugging Face directory from {src.origin}, {c['num_hidden_layers']} "
              f"layers, hidden {c['hidden_size']}, vocabulary {c['vocab_size']}")
        return 0
    out = convert(args.src, args.out, meta=args.meta, overwrite=args.force)
    info = read_info(out)
    print(f"wrote {out}: {info.training.get('imported_from')} checkpoint, {info.config.n_layer} "
          f"layers, n_embd {info.config.n_embd}, vocabulary {info.config.vocab_size}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a nanoGPT or original-MDI ckpt.pt; a GGUF to an HF directory")
    p.add_argument("src", metavar="SRC", help="ckpt.pt written by nanoGPT or the original MDI, "
                   "or a .gguf file / shipped model name (written as a Hugging Face directory)")
    p.add_argument("--meta", metavar="META.pkl", default=None,
                   help="char vocabulary (default: look for meta.pkl where those systems keep it)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint at --out")
    p.set_defaults(func=cmd_convert)
