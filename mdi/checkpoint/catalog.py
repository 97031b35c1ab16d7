"""What `--ckpt` can name, found without loading anything: `mdi models`, and the closest
names when a `--ckpt` names nothing.

Three places: the shipped models (checkpoint/shipped.py), the Hugging Face hub cache
(`hf:ORG/NAME`, through huggingface_hub's scan_cache_dir), and directories given by the
user (our checkpoints, Hugging Face model directories and .gguf files, one level deep).
Each entry says its size on disk, its family (architecture) and how its weights are
stored (a GGUF file type, int8, or the safetensors dtypes). Only headers are read: a
GGUF's metadata up to the keys needed (gguf_file.header_values: SmolLM2's whole
header, every tokenizer string, takes 0.4 s), a safetensors file's JSON header.
"""
from __future__ import annotations

import difflib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .format import CheckpointError
from .gguf_file import header_values
from .shipped import SHIPPED, shipped_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str                 # what --ckpt takes
    where: str                # "shipped" | "hf cache" | the file or directory
    size_bytes: int
    family: str               # e.g. llama, gpt2, mdi (nanoGPT-style)
    weights: str              # e.g. Q4_1, int8, float32, bfloat16


def list_models(dirs: Sequence[str | Path] = ()) -> list[ModelEntry]:
    """Every model that can be named: shipped, in the hub cache, in `dirs`."""
    return [*_shipped(), *_hub_cache(), *(e for d in dirs for e in _in_directory(Path(d)))]


def closest_names(name: str, dirs: Sequence[str | Path] = (), n: int = 3) -> list[str]:
    """Up to n names that `name` may have meant, compared by their last path component:
    names containing it first, then the most similar ones."""
    def last(s: str) -> str:
        return Path(s.rstrip("/")).name.lower()

    by_key: dict[str, list[str]] = {}
    for e in list_models(dirs):
        by_key.setdefault(last(e.name), []).append(e.name)
    key = last(name)
    keys = [k for k in by_key if key and key in k]
    keys += difflib.get_close_matches(key, list(by_key), n, 0.6)
    return list(dict.fromkeys(c for k in keys for c in by_key[k]))[:n]


def _shipped() -> Iterable[ModelEntry]:
    for name, entry in SHIPPED.items():
        try:
            path = shipped_path(name)
        except CheckpointError:
            continue  # its package is not installed
        family, weights = gguf_summary(path)
        yield ModelEntry(name, f"shipped ({entry.pip_name})", path.stat().st_size, family, weights)


def _hub_cache() -> Iterable[ModelEntry]:
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception as e:  # no cache yet, or an unreadable one: nothing to list there
        log.debug("no Hugging Face cache listed: %s", e)
        return
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        family, weights = _config_summary(snapshot)
        if family:
            yield ModelEntry(f"hf:{repo.repo_id}", "hf cache", repo.size_on_disk, family, weights)


def _in_directory(root: Path) -> Iterable[ModelEntry]:
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    for path in sorted([root, *root.iterdir()]):
        if path.is_file() and path.suffix.lower() == ".gguf":
            family, weights = gguf_summary(path)
            yield ModelEntry(str(path), str(path.parent), path.stat().st_size, family, weights)
        elif path.is_dir() and (path / "config.json").is_file():
            family, weights = _config_summary(path)
            if family:
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                yield ModelEntry(str(path), str(path.parent), size, family, weights)


def _config_summary(d: Path) -> tuple[str, str]:
    """(family, weights) of our directory or a Hugging Face one; ("", "") for neither."""
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "", ""
    if not isinstance(cfg, dict):
        return "", ""
    if cfg.get("format") == "mdi-checkpoint":
        imported = (cfg.get("training") or {}).get("imported_from")
        family = f"mdi ({imported})" if imported else "mdi (nanoGPT-style)"
        quant = cfg.get("quantize")
        return family, quant["mode"] if isinstance(quant, dict) and "mode" in quant else _st_dtypes(d)
    if "architectures" in cfg or "model_type" in cfg:
        quant = cfg.get("quantization_config")
        weights = (quant.get("quant_method", "quantized") if isinstance(quant, dict)
                   else _st_dtypes(d) or str(cfg.get("torch_dtype") or cfg.get("dtype") or "?"))
        return str(cfg.get("model_type") or cfg["architectures"][0]), weights
    return "", ""


def _st_dtypes(d: Path) -> str:
    """The dtypes in the directory's safetensors headers, e.g. "float32" or "bfloat16+float32"."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "F64": "float64"}
    found: set[str] = set()
    for f in sorted(d.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(n, 100_000_000)))
        except (OSError, ValueError, struct.error):
            continue
        found |= {names.get(v.get("dtype"), str(v.get("dtype")).lower())
                  for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    return "+".join(sorted(found)) or "?"


def gguf_summary(path: Path) -> tuple[str, str]:
    """(architecture, file type) from a GGUF's metadata, e.g. ("llama", "Q4_1")."""
    meta = gguf_metadata(path, {"general.architecture", "general.file_type"})
    arch = str(meta.get("general.architecture", "?"))
    ft = meta.get("general.file_type")
    try:
        from gguf import LlamaFileType

        weights = LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft is not None else "?"
    except (ImportError, ValueError):
        weights = f"file type {ft}"
    return arch, weights


def gguf_metadata(path: Path, keys: set[str]) -> dict:
    """The scalar metadata `keys` of a GGUF file, reading its header only as far as needed."""
    try:
        return header_values(path, keys)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # GGUFFormatError is a ValueError
        log.debug("%s: GGUF header unreadable: %s", path, e)
        return {}
