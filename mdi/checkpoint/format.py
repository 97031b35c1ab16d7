"""Our checkpoint format: a directory with

    config.json        {"format": "mdi-checkpoint", "version": 1, "model": GPTConfig,
                        "training": {...metadata...}}
    model.safetensors  the weights, nanoGPT names; the tied lm_head.weight is not stored
    tokenizer.json     the tokenizer (see mdi.tokenizer)
    train_state.pt     optional, for `mdi train --resume`; loads with weights_only=True

Stages load only the tensors of their own layer range.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..model import GPT, GPTConfig
from ..tokenizer import Tokenizer, TokenizerError, load_tokenizer, save_tokenizer
from . import st_io

FORMAT = "mdi-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAIN_STATE = "train_state.pt"
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"
ALIGN = 64  # bytes; what torch's CPU allocator gives


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match its config."""


@dataclass
class CheckpointInfo:
    path: Path
    config: GPTConfig
    training: dict = field(default_factory=dict)
    kind: str = "mdi"

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def tokenizer(self) -> Tokenizer:
        try:
            return load_tokenizer(self.path / TOKENIZER)
        except TokenizerError as e:
            raise CheckpointError(f"{self.path}: {e}") from None


def storable_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to write: contiguous tensors, the tied head left out."""
    sd = model.state_dict()
    if model.has_embeddings and model.has_head and model.config.tie_embeddings:
        sd.pop(TIED_HEAD, None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer | None,
                    training: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_file(storable_state_dict(model), str(tmp), metadata={"format": FORMAT})
    tmp.replace(path / WEIGHTS)  # atomic: a crash never leaves half a file
    cfg = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
           "training": training or {}}
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, path / TOKENIZER)
        # A pretrained model's tokenizer keeps its special-token settings beside it.
        for name in ("tokenizer_config", "generation_config"):
            extra = getattr(tokenizer, name, None)
            if extra is not None:
                (path / f"{name}.json").write_text(json.dumps(extra, indent=2) + "\n")
    return path


def read_info(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not an mdi checkpoint: no {CONFIG}")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not an mdi checkpoint config (format field)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: unsupported version {data.get('version')!r}")
    try:
        config = GPTConfig.from_dict(data.get("model"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    training = data.get("training") or {}
    if not isinstance(training, dict):
        raise CheckpointError(f"{cfg_path}: the training field must be an object")
    return CheckpointInfo(path, config, training)


def expected_shapes(config: GPTConfig, start: int = 0, stop: int | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a stage, without allocating it."""
    with torch.device("meta"):
        stage = GPT(config, start, stop)
    return {k: tuple(v.shape) for k, v in stage.state_dict().items()}


def build_stage(config: GPTConfig, start: int, stop: int | None,
                get: Callable[[str], torch.Tensor | None], names: set[str] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                where: str = "weights") -> GPT:
    """Build a stage from tensors fetched by name, checking every name and shape.

    `get(name)` returns a tensor or None when absent. `names`, when given, is
    the set of names the source holds: anything the stage does not use but
    belongs to its layer range is an error (wrong config).
    """
    want = expected_shapes(config, start, stop)
    tied = config.tie_embeddings
    sd: dict[str, torch.Tensor] = {}
    for name, shape in want.items():
        if name == TIED_HEAD and tied and EMBEDDING in sd:
            sd[name] = sd[EMBEDDING]  # tied: one tensor, read once (re-tied below)
            continue
        t = get(name)
        if t is None and name == TIED_HEAD and tied:
            t = get(EMBEDDING)  # tied to the token embedding
        if t is None:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, the config needs {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        t = t.to(device=device, dtype=dtype or t.dtype)
        # On some CPUs the per-row GEMM's low bits depend on the operand's
        # address; a tensor inside a file or a stream sits at whatever offset the
        # format gave it. Copy those into allocator-aligned memory (only those:
        # a second copy of every weight would double the peak memory).
        sd[name] = t.clone() if t.data_ptr() % ALIGN else t
    if names is not None:
        whole = set(expected_shapes(config)) | {TIED_HEAD}
        unknown = sorted(names - whole)
        if unknown:
            raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unknown[:5])}")
    with torch.device("meta"):
        stage = GPT(config, start, stop)
    stage.load_state_dict(sd, assign=True, strict=True)
    if stage.has_embeddings and stage.has_head and tied:
        stage.lm_head.weight = stage.transformer.wte.weight
    return stage.eval()


def load_stage(path: str | Path, start: int = 0, stop: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[GPT, CheckpointInfo]:
    """Load blocks [start, stop) of the checkpoint at path (the whole model by default).

    Only the stage's tensors are read, each once, into fresh buffers (see st_io).
    """
    info = read_info(path)
    if not info.weights_path.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    return read_stage_file(info.weights_path, info.config, start, stop, device, dtype), info


def read_stage_file(weights: str | Path, config: GPTConfig, start: int = 0, stop: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build a stage from a safetensors file (a checkpoint's or a chunk's)."""
    try:
        with st_io.open_file(weights) as f:
            entries, data_start = st_io.read_header(f)
            return build_stage(config, start, stop,
                               lambda n: st_io.read_tensor(f, entries[n], data_start) if n in entries else None,
                               names=set(entries), device=device, dtype=dtype, where=str(weights))
    except (st_io.SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GPT, CheckpointInfo]:
    return load_stage(path, 0, None, device=device, dtype=dtype)
