"""Facts about the package's shape that anyone can check: no module over
MAX_MODULE_LINES, no function over MAX_FUNCTION_LINES (but the model's forward).
Read from the source with ast. (The imports' direction: test_import_graph.py.)"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mdi"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_ALLOWED = {"model/gpt.py:forward"}  # the model's forward reads best as one piece


def test_modules_are_small():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_short():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_ALLOWED:
                    long[f"{rel}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"

