"""docs/architecture.md stays true: every module it names exists, and every
`module.py:Name` (or `module.py:Class.method`) it points at is defined there."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
REF = re.compile(r"`((?:[a-z_]+/)*[a-z_]+\.py)(?::([A-Za-z_][\w.]*))?")


def _module(path: str) -> Path:
    return REPO / path if path.startswith("tests/") else REPO / "mdi" / path


def _defines(source: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]", source, re.M) is not None


def test_every_module_and_name_in_the_architecture_page_exists():
    refs = REF.findall(DOC.read_text())
    assert len(refs) > 50  # the pattern still reads the page
    missing = []
    for path, name in refs:
        module = _module(path)
        if not module.is_file():
            missing.append(path)
        elif name and not all(_defines(module.read_text(), part) for part in name.split(".")):
            missing.append(f"{path}:{name}")
    assert not missing, f"docs/architecture.md names what is not there: {sorted(set(missing))}"
