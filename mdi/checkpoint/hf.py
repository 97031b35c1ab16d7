"""Hugging Face model directories (and hub names) as checkpoints.

`hf_dir_source(path)` reads a directory written by `save_pretrained` (or
downloaded from the hub) into an HFSource: config.json, the safetensors
headers of `model.safetensors` or of the shards listed in
`model.safetensors.index.json`, and the tokenizer files. Tensors are read one
at a time, on request, with our one safetensors reader (st_io), so a node
reads only its stage's tensors and never maps or materialises the whole model.

`HFCheckpoint` puts an HFSource behind the same face as our own format
(config, tokenizer(), tensors under our names); hf_map.py holds the key tables.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import GPTConfig
from ..tokenizer import HFTokenizer, Tokenizer, TokenizerError
from . import hf_map, st_io
from .format import TIED_HEAD, CheckpointError, expected_shapes
from .gguf_int4 import fused_format
from .hf_source import HFSource, Rows
from .malloc import release_free_memory

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some exports keep beside the weights: causal masks, rotary tables.
IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def _json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent}: no {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json describes a Hugging Face model."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        index = _json(path / INDEX)
        files = sorted(set((index.get("weight_map") or {}).values()))
        if not files:
            raise CheckpointError(f"{path / INDEX}: empty weight_map")
        return [path / f for f in files]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} (only safetensors weights are read)")


def hf_dir_source(path: str | Path) -> HFSource:
    """An HFSource over a Hugging Face model directory; reads headers, not weights."""
    path = Path(path)
    config = _json(path / "config.json", required=True)
    where: dict[str, tuple[Path, st_io.Entry, int]] = {}
    for f in _weight_files(path):
        try:
            with st_io.open_file(f) as fh:
                entries, data_start = st_io.read_header(fh)
        except (st_io.SafetensorsFormatError, OSError) as e:
            raise CheckpointError(f"{f} is corrupt or unreadable: {e}") from None
        for name, e in entries.items():
            where[name] = (f, e, data_start)

    def read(name: str) -> torch.Tensor:
        f, e, data_start = where[name]
        try:
            with st_io.open_file(f) as fh:
                return st_io.read_tensor(fh, e, data_start)
        except (st_io.SafetensorsFormatError, OSError) as err:
            raise CheckpointError(f"{f} is corrupt or unreadable: {err}") from None

    tok_path = path / "tokenizer.json"
    return HFSource(config=config, shapes={n: w[1].shape for n, w in where.items()},
                    dtypes={n: w[1].dtype for n, w in where.items()}, read=read,
                    tokenizer_json=tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None,
                    tokenizer_config=_json(path / "tokenizer_config.json"),
                    generation_config=_json(path / "generation_config.json"), origin=str(path))


def hub_snapshot(spec: str) -> Path:
    """`hf:ORG/NAME[@REV]` -> a local directory, through huggingface_hub's cache.

    Honours HF_TOKEN and HF_HUB_OFFLINE (then only the cache is used).
    """
    name = spec.removeprefix("hf:")
    repo, _, rev = name.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{spec!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=rev or None, token=os.environ.get("HF_TOKEN"),
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # the hub raises many kinds (offline, 401, 404, network)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise CheckpointError(f"cannot get {repo}{'@' + rev if rev else ''} from the Hugging Face "
                              f"hub{hint}: {type(e).__name__}: {e}") from None
    return Path(local)


@dataclass
class HFCheckpoint:
    """A model in Hugging Face terms, seen under our names (the face of CheckpointInfo)."""
    path: Path
    source: HFSource
    config: GPTConfig
    family: str
    training: dict = field(default_factory=dict)
    kind: str = "hf"

    @classmethod
    def from_source(cls, source: HFSource, path: str | Path | None = None) -> "HFCheckpoint":
        where = f"{source.origin or path}/config.json"
        config, family = hf_map.config_from_hf(source.config, where)
        arch, _ = hf_map.architecture(source.config, where)
        ck = cls(Path(path or source.origin), source, config, family,
                 training={"imported_from": arch, "source": source.origin})
        ck._check_names()
        return ck

    def _have(self, name: str) -> bool:
        return name in self.source.shapes

    def _sources(self, ours: str) -> tuple[list[str], str]:
        if ours == TIED_HEAD and (self.config.tie_embeddings or not self._have("lm_head.weight")):
            if not self.config.tie_embeddings:
                raise CheckpointError(f"{self.source.origin}: tie_word_embeddings is false but there "
                                      "is no lm_head.weight")
            return [hf_map.embedding_name(self.family, self._have)], "copy"
        return hf_map.hf_sources(self.family, ours, self._have)

    def _check_names(self) -> None:
        used: set[str] = set()
        for ours in expected_shapes(self.config):
            used.update(self._sources(ours)[0])
        extra = sorted(n for n in self.source.shapes if n not in used and not IGNORED.search(n)
                       and n != "lm_head.weight")
        if extra:
            raise CheckpointError(f"{self.source.origin}: tensor(s) the config does not explain: "
                                  f"{', '.join(extra[:5])}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))

    def get(self, ours: str, rows: bool = False) -> torch.Tensor | Rows | None:
        """Our tensor `ours`, read (only its parts) from the source; None if absent.
        rows: as Rows where the source reads it a block of rows at a time (a GGUF's
        block-format matrices taken as they are), for a loader that quantizes rows."""
        names, how = self._sources(ours)
        if not all(self._have(n) for n in names):
            return None
        if rows and how == "copy" and self.source.rows is not None:
            lazy = self.source.rows(names[0])
            if lazy is not None:
                return lazy
        return hf_map.combine([self.source.read(n) for n in names], how)

    def block_format(self, ours: str) -> str | None:
        """A GGUF's block format of our tensor `ours` (a fused one: gguf_int4.fused_format,
        as hf_map.combine gives it); None for other sources and transposed tensors."""
        formats = getattr(self.source, "formats", None)
        names, how = self._sources(ours)
        if not formats or how == "t" or not all(n in formats for n in names):
            return None
        return fused_format([formats[n] for n in names])

    def dtype_of(self, ours: str) -> torch.dtype:
        names, _ = self._sources(ours)
        missing = [n for n in names if not self._have(n)]
        if missing:
            raise CheckpointError(f"{self.source.origin}: missing tensor {missing[0]!r} (for {ours!r})")
        return self.source.dtypes[names[0]]

    def tokenizer(self) -> Tokenizer:
        if not self.source.tokenizer_json:
            raise CheckpointError(f"{self.source.origin}: no tokenizer.json")
        src = self.source
        if src.tokenizer_built is not None:  # read-only in use: one object serves every caller
            return HFTokenizer(src.tokenizer_built, src.tokenizer_config, src.generation_config)
        try:
            tok = HFTokenizer.from_parts(src.tokenizer_json, src.tokenizer_config,
                                         src.generation_config)
        except TokenizerError as e:
            raise CheckpointError(f"{src.origin}: {e}") from None
        release_free_memory()  # the parse's temporaries (~25 MB for a 49k vocabulary)
        return tok


__all__ = ["HFCheckpoint", "hf_dir_source", "hub_snapshot", "is_hf_dir"]
