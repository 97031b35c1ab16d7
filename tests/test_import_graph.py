"""The package's imports run one way: no module of mdi/ imports (at module level or
inside a function) a module that imports it back, directly or through others."""
from __future__ import annotations

import ast
from pathlib import Path

import mdi

ROOT = Path(mdi.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of mdi/ that `name` imports (`from a import b`: a.b when it is a module)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            if not node.level:
                base = node.module or ""
            elif node.module:
                base = f"{base}.{node.module}"
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
    return {m for m in found if m in mods and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path now, 2: done

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [u, v] if v in path else [u, v]
            if v not in state and (found := visit(v, path + [u])):
                return found
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def test_no_import_circle_in_the_package():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert "mdi.ring.starter.ring_engine" in graph["mdi.ring.starter.driver"]  # the walk sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_circle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
