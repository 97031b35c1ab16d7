"""A node process imports nothing it does not use (issue 20.6): what `mdi node` loads
before any run leaves out the model-import, plotting, tokenizer and template libraries."""
from __future__ import annotations

import subprocess
import sys

import pytest

NOT_IN_A_NODE = ("transformers", "matplotlib", "jinja2", "tokenizers", "gguf", "huggingface_hub",
                 "pandas", "scipy", "sentencepiece")


@pytest.mark.slow
def test_an_idle_node_imports_no_model_import_plotting_or_template_library():
    code = ("import sys, mdi.cli.main, mdi.ring.node.process\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "torch" in loaded and "uvicorn" in loaded      # what a node does need
    assert not loaded & set(NOT_IN_A_NODE), sorted(loaded & set(NOT_IN_A_NODE))
