"""`mdi convert`: import a nanoGPT, original-MDI, Hugging Face or GGUF checkpoint into our format."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import read_info
from ..checkpoint.imports import convert
from ..checkpoint.shipped import is_shipped_name
from ..checkpoint.sources import convert_to_ours
from ..model.dtypes import DTYPES
from ..model.quant import QUANT_MODES


def cmd_convert(args: argparse.Namespace) -> int:
    src = str(args.src)
    if Path(src).is_dir() or src.startswith("hf:") or src.endswith(".gguf") \
            or is_shipped_name(src):
        out = convert_to_ours(src, args.out, overwrite=args.force,
                              dtype=DTYPES[args.dtype] if args.dtype else None,
                              quantize=args.quantize)
    else:
        out = convert(args.src, args.out, meta=args.meta, overwrite=args.force)
        if args.quantize:  # the float checkpoint just written, re-stored quantized in place
            out = convert_to_ours(out, out, overwrite=True, quantize=args.quantize)
    info = read_info(out)
    print(f"wrote {out}: {info.training.get('imported_from') or info.kind} checkpoint, "
          f"{info.config.n_layer} layers, n_embd {info.config.n_embd}, vocabulary {info.config.vocab_size}"
          + (f", weights {info.quantized}" if info.quantized else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a nanoGPT / original-MDI ckpt.pt, a Hugging Face "
                       "model or a GGUF file into our format")
    p.add_argument("src", metavar="SRC",
                   help="ckpt.pt written by nanoGPT or the original MDI, a Hugging Face model "
                        "directory, hf:ORG/NAME[@REV], a .gguf file or smollm2-135m-instruct")
    p.add_argument("--meta", metavar="META.pkl", default=None,
                   help="char vocabulary (default: look for meta.pkl where those systems keep it)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="cast Hugging Face weights (default: keep their stored dtype)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="int8: store Linear and Embedding weights as int8 with a float32 scale per "
                        "row (a quarter of fp32). int4 (group 32; int4-g64, int4-g128): store "
                        "Linear weights as 4-bit codes with a float32 scale and zero per group (a "
                        "GGUF's Q4 codes as the file has them), and int8 where a --quantize int4 "
                        "load makes them int8. Loading gives, bit for bit, the model a load of SRC "
                        "with the same --quantize gives, and runs in that mode; `mdi split` and a "
                        "ring's weight upload send each node only its stage's stored parts")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint at --out")
    p.set_defaults(func=cmd_convert)
