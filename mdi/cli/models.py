"""`mdi models`: what `--ckpt` can name (placeholder until the listing lands)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
