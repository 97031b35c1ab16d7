"""One entry point for every `--ckpt`: `open_checkpoint(spec)`.

A spec is
  - our checkpoint directory (config.json with "format": "mdi-checkpoint"),
  - a Hugging Face model directory (config.json with "architectures"),
  - `hf:ORG/NAME[@REV]`, resolved through huggingface_hub's cache,
  - a `.gguf` file or a shipped model's name (checkpoint/shipped.py), read by
    checkpoint/gguf.py.
The result has the same face whatever the kind: `.path`, `.config`,
`.training`, `.kind` ("mdi" | "hf"), `.tokenizer()`; load_stage reads only a
stage's tensors from it, and checkpoint.stream / checkpoint.chunks serve it to
nodes in our names.

A command opens its checkpoint once and passes the opened object down (every
function here takes a Checkpoint as well as a spec); `load_model(spec, options)`
is the one way to get a whole model with its tokenizer.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from tqdm import tqdm

from ..model import GPT
from ..tokenizer import Tokenizer
from ..model.compiled import cache_dir as compiled_cache_dir
from ..model.quant import configure_stage
from .format import (CONFIG, CheckpointError, CheckpointInfo, build_stage, expected_shapes, read_info,
                     run_mode, save_checkpoint)
from .format import load_stage_dir
from .hf import HFCheckpoint, hf_dir_source, hub_snapshot, is_hf_dir
from .hf_source import Rows
from .quant_store import write_quantized
from .shipped import is_shipped_name, shipped_path

log = logging.getLogger(__name__)

Checkpoint = Union[CheckpointInfo, HFCheckpoint]


def _gguf(spec: str) -> HFCheckpoint:
    path = (shipped_path(spec) if is_shipped_name(spec) else Path(spec)).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise CheckpointError(f"{spec}: cannot read the GGUF file: {e.strerror or e}") from None
    return _gguf_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _gguf_cached(path: Path, mtime_ns: int, size: int) -> HFCheckpoint:
    """Parsing a GGUF's metadata takes seconds (SmolLM2: ~100k tokenizer strings), and one
    command opens its checkpoint several times (tokenizer, config, stage): parse once per
    file version. Tensors stay memory-mapped and are dequantized when read."""
    from .gguf import gguf_source  # imports the gguf package only when a GGUF is asked for

    return HFCheckpoint.from_source(gguf_source(path), path)


@functools.lru_cache(maxsize=4)
def _hub_dir(spec: str) -> Path:
    """A hub name's local snapshot, asked of huggingface_hub once per process (each ask
    is a round trip to the hub unless HF_HUB_OFFLINE)."""
    return hub_snapshot(spec)


def open_checkpoint(spec: str | Path | Checkpoint) -> Checkpoint:
    """The checkpoint `spec` names (see the module docstring); errors name the spec."""
    if isinstance(spec, (CheckpointInfo, HFCheckpoint)):
        return spec
    text = str(spec)
    if is_shipped_name(text) or text.endswith(".gguf"):
        return _gguf(text)
    if text.startswith("hf:"):
        return HFCheckpoint.from_source(hf_dir_source(_hub_dir(text)))
    path = Path(spec)
    if path.is_dir() and is_hf_dir(path):
        return HFCheckpoint.from_source(hf_dir_source(path), path)
    if not path.exists():
        raise CheckpointError(_not_found(text))
    return read_info(path)


def _not_found(spec: str) -> str:
    """The error for a --ckpt that names nothing, with the names it may have meant."""
    from .catalog import closest_names

    parent = Path(spec).parent
    near = closest_names(spec, [parent] if parent.is_dir() else [])
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return (f"checkpoint directory not found: {spec}{hint} (`mdi models` lists what can be "
            "named)")


def load_stage(spec: str | Path | Checkpoint, start: int = 0, stop: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: str | None = None, batch_invariant: bool = False,
               max_context: int | None = None, pack: bool = True,
               kv_dtype: torch.dtype | None = None, compile: bool = False
               ) -> tuple[GPT, Checkpoint]:
    """Blocks [start, stop) of any checkpoint (the whole model by default), reading
    only that stage's tensors, configured for the run (model/quant.py:configure_stage;
    pack: CPU float32 weights prepacked now, not on the first forward).

    Weights keep their stored dtype unless `dtype`. quantize="int8": each weight
    is quantized as it is read (peak: the int8 stage plus one float tensor); a
    quantized checkpoint (`mdi convert --quantize`) gives its own mode, and
    another `quantize` is an error (checkpoint_mode).
    """
    ck = open_checkpoint(spec)
    quantize = checkpoint_mode(ck, quantize)
    if compile:  # Inductor's graphs kept on disk for the next start (before any compile)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compiled_cache_dir(os.environ))
    if isinstance(ck, CheckpointInfo):
        stage, _ = load_stage_dir(ck.path, start, stop, device=device, dtype=dtype, quantize=quantize)
    else:  # a GGUF dequantizes, a hub model may be large: a bar on a terminal, a line after
        t0 = time.perf_counter()
        with tqdm(total=len(expected_shapes(ck.config, start, stop)), unit="tensor", leave=False,
                  desc=f"loading {Path(ck.source.origin or ck.path).name}", disable=None) as bar:
            def get(name: str) -> torch.Tensor | Rows | None:
                t = ck.get(name, rows=True)  # int8 rows made a block of rows at a time
                bar.update(1)
                return t
            stage = build_stage(ck.config, start, stop, get, device=device, dtype=dtype,
                                where=ck.source.origin, quantize=quantize)
        log.info("loaded %s layers [%d, %d) in %.1f s", ck.source.origin or ck.path, start,
                 ck.config.n_layer if stop is None else stop, time.perf_counter() - t0)
    stage = configure_stage(stage, quantize, batch_invariant, max_context, pack,
                            kv_dtype=kv_dtype, compile=compile)
    if compile:
        stage.compiled_decode.on_graph = _log_graph
    return stage, ck


def _log_graph(rows: int, uniform: bool, seconds: float) -> None:
    log.info("--compile: the decode step for %d rows%s ready in %.1f s (compiled, or read from "
             "%s)", rows, "" if uniform else " at several positions", seconds,
             os.environ.get("TORCHINDUCTOR_CACHE_DIR"))


def checkpoint_mode(spec: str | Path | Checkpoint, quantize: str | None) -> str | None:
    """The --quantize mode a run of the checkpoint takes, on one device or a ring:
    a quantized checkpoint's own (an explicit other one is a CheckpointError naming
    both), else `quantize`."""
    ck = open_checkpoint(spec)
    return run_mode(getattr(ck, "quantized", None), quantize, ck.path)


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded for a run (the commands' --device, --dtype, --quantize,
    --batch-invariant, --max-context); see load_stage."""
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None    # None: as stored
    quantize: str | None = None         # "int8" | "int4"
    batch_invariant: bool = False
    max_context: int | None = None
    pack: bool = True                   # CPU float32 weights prepacked at load
    kv_dtype: torch.dtype | None = None  # what the KV caches store (None: the compute dtype)
    compile: bool = False               # decode through a compiled step (model/compiled.py)


@dataclass(frozen=True)
class Loaded:
    """A whole model, the checkpoint it came from, and (read when first asked) its tokenizer."""
    model: GPT
    checkpoint: Checkpoint

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """CheckpointError when the checkpoint has none (e.g. weights written by a test)."""
        return self.checkpoint.tokenizer()


def load_model(spec: str | Path | Checkpoint, options: LoadOptions = LoadOptions()) -> Loaded:
    """The whole model of any checkpoint, opened once, configured by `options`."""
    ck = open_checkpoint(spec)
    o = options
    model, _ = load_stage(ck, 0, None, device=o.device, dtype=o.dtype, quantize=o.quantize,
                          batch_invariant=o.batch_invariant, max_context=o.max_context, pack=o.pack,
                          kv_dtype=o.kv_dtype, compile=o.compile)
    return Loaded(model, ck)


def convert_to_ours(spec: str | Path | Checkpoint, out_dir: str | Path, overwrite: bool = False,
                    dtype: torch.dtype | None = None, quantize: str | None = None) -> Path:
    """Write any checkpoint (Hugging Face directory, hub name, GGUF, ours) in our format,
    with its tokenizer files; weights keep their stored dtype unless `dtype`.

    quantize (a --quantize mode): the weights are stored quantized as a load with
    that mode makes them (quant_store.py: int8 rows with scales, int4 codes with
    scales and zeros), tensor by tensor, so loading it gives that stage directly;
    out_dir may then be the source itself (read whole first). A quantized source
    is written in its own mode.
    """
    ck = open_checkpoint(spec)
    out = Path(out_dir)
    if (out / CONFIG).exists() and not overwrite:
        raise CheckpointError(f"{out} already holds a checkpoint; choose another --out "
                              "or pass --force")
    mode = checkpoint_mode(ck, quantize)
    try:
        tok = ck.tokenizer()
    except CheckpointError as e:
        log.warning("no tokenizer written: %s", e)
        tok = None
    if mode:
        return write_quantized(ck, out, mode, tok, dtype)
    model = load_model(ck, LoadOptions(dtype=dtype, pack=False)).model
    save_checkpoint(out, model, tok, dict(ck.training))
    return out
