"""The `mdi` command: parse, call a library function, print."""
from __future__ import annotations

import argparse
import logging
import sys

from . import bench, convert, ring, serve, workflow
from . import eval as eval_cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdi", description="Model-distributed inference for GPT models")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    workflow.register(sub)
    convert.register(sub)
    ring.register(sub)
    bench.register(sub)
    eval_cmd.register(sub)
    serve.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
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
