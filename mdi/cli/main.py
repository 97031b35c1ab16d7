"""The `mdi` command: parse, call a library function, print."""
from __future__ import annotations

import argparse
import logging
import sys

from . import bench, chat, convert, models, ring, serve, workflow
from . import eval as eval_cmd
from .common import resolve_quantize


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless its text already speaks of it or there
    is none to show (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdi", description="Model-distributed inference for GPT models")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    workflow.register(sub)
    chat.register(sub)
    models.register(sub)
    convert.register(sub)
    ring.register(sub)
    bench.register(sub)
    eval_cmd.register(sub)
    serve.register(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if getattr(args, "dtype", None) == "auto":  # one concrete dtype from here on
            from .auto_dtype import resolve

            args.dtype, args.dtype_from = resolve("auto", getattr(args, "device", "cpu"))
        if hasattr(args, "quantize") and args.command != "convert":
            resolve_quantize(args)  # a GGUF's own precision unless told
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mdi: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"mdi {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
