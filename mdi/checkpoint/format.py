"""Our checkpoint format: a directory with

    config.json        {"format": "mdi-checkpoint", "version": 1, "model": GPTConfig,
                        "training": {...metadata...}}
    model.safetensors  the weights, nanoGPT names; the tied lm_head.weight is not stored
    tokenizer.json     the tokenizer (see mdi.tokenizer)
    train_state.pt     optional, for `mdi train --resume`; loads with weights_only=True

A quantized checkpoint (`mdi convert --quantize int8|int4|int4-g64|int4-g128`)
says so in config.json ("quantize": {"mode", "dtype": its float tensors'}) and
stores each quantized layer in parts (quant_parts.py: int8 rows with scales,
int4 codes with scales and zeros), never in a kernel's packed layout; loading
it builds that mode's stage, and a run of it takes its mode (run_mode). Stages
load only the tensors of their own layer range.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..model import GPT, GPTConfig
from ..model.dtypes import DTYPES, dtype_name
from ..model.meta import on_meta
from ..model.int4 import Int4Linear, Int4Weight
from ..model.quant import (QUANT_MODES, Int8Embedding, Int8Linear, check_mode, is_quantized,
                           quantize_linears, quantize_rows)
from ..tokenizer import Tokenizer, TokenizerError, load_tokenizer, save_tokenizer
from . import st_io
from .gguf_int4 import int4_target
from .hf_source import Rows
from .malloc import mapped_allocations
from .quant_parts import QUANT_FLOATS, QuantParts, QuantPartsError, stored_float_dtype, stream_want

FORMAT = "mdi-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAIN_STATE = "train_state.pt"
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"
TIED_SCALE = "lm_head.scale"            # int8 checkpoints: the tied head's scale, not stored
EMBEDDING_SCALE = "transformer.wte.scale"
TIED_SOURCES = {TIED_HEAD: EMBEDDING, TIED_SCALE: EMBEDDING_SCALE}  # a tied head is stored so
ALIGN = 64  # bytes; what torch's CPU allocator gives
STORED_MODES = QUANT_MODES  # quantized checkpoints we write and read


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match its config."""


@dataclass
class CheckpointInfo:
    path: Path
    config: GPTConfig
    training: dict = field(default_factory=dict)
    kind: str = "mdi"
    quantized: str | None = None     # a --quantize mode: weights stored quantized (mdi convert --quantize)
    float_dtype: str = "float32"     # a quantized checkpoint's activation dtype (its float tensors')

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def tokenizer(self) -> Tokenizer:
        try:
            return load_tokenizer(self.path / TOKENIZER)
        except TokenizerError as e:
            raise CheckpointError(f"{self.path}: {e}") from None


def storable_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to write: contiguous tensors, the tied head (and its int8 scale) left out."""
    sd = model.state_dict()
    given_up = [k for k, v in sd.items() if v.is_meta]
    if given_up:
        raise CheckpointError(f"{given_up[0]}: this stage keeps only the packed copy of its "
                              f"weights (loaded with pack=True); load with pack=False to save it")
    if model.has_embeddings and model.has_head and model.config.tie_embeddings:
        sd.pop(TIED_HEAD, None)
        sd.pop(TIED_SCALE, None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer | None,
                    training: dict | None = None) -> Path:
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        raise CheckpointError("an int4 stage holds only its kernel's packed weights: write an "
                              "int4 checkpoint from the float source with `mdi convert --quantize "
                              "int4` (sources.convert_to_ours)")
    return write_checkpoint(path, storable_state_dict(model), model.config, tokenizer, training,
                            "int8" if is_quantized(model) else None)


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor] | None, config: GPTConfig,
                     tokenizer: Tokenizer | None, training: dict | None = None,
                     mode: str | None = None, float_dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory from its stored tensors (None: WEIGHTS is written, its
    floats in float_dtype); mode: their --quantize mode (quant_parts.py), None: float."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        tmp = path / (WEIGHTS + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        tmp.replace(path / WEIGHTS)  # atomic: a crash never leaves half a file
        float_dtype = stored_float_dtype({k: t.dtype for k, t in tensors.items()})
    cfg = {"format": FORMAT, "version": VERSION, "model": config.to_dict(),
           "training": training or {}}
    if mode:  # loaders build the quantized stage straight from the file
        cfg["quantize"] = {"mode": mode, "dtype": dtype_name(float_dtype or torch.float32)}
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
    quant = data.get("quantize")
    if quant is None:
        return CheckpointInfo(path, config, training)
    if (not isinstance(quant, dict) or quant.get("mode") not in STORED_MODES
            or quant.get("dtype") not in DTYPES):
        raise CheckpointError(f"{cfg_path}: the quantize field must be {{\"mode\": one of "
                              f"{', '.join(STORED_MODES)}, \"dtype\": one of {', '.join(DTYPES)}}}, "
                              f"got {quant!r}")
    return CheckpointInfo(path, config, training, quantized=quant["mode"], float_dtype=quant["dtype"])


def run_mode(stored: str | None, quantize: str | None, where: object = "the checkpoint") -> str | None:
    """The --quantize mode a run of a checkpoint stored in `stored` (None: float)
    takes: a quantized checkpoint's own, which an explicit other `quantize` may not
    contradict (single device, the starter and its nodes alike); a float one's
    `quantize`."""
    quantize = check_mode(quantize)
    if stored is None or quantize in (None, stored):
        return stored or quantize
    raise CheckpointError(f"{where} is an {stored} checkpoint (mdi convert --quantize {stored}), "
                          f"it cannot run with --quantize {quantize}: leave --quantize out (or give "
                          f"{stored}), or convert the float source with --quantize {quantize}")


def expected_shapes(config: GPTConfig, start: int = 0, stop: int | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a stage, without allocating it."""
    with on_meta():
        stage = GPT(config, start, stop)
    return {k: tuple(v.shape) for k, v in stage.state_dict().items()}


def quantized_skeleton(config: GPTConfig, start: int, stop: int | None, mode: str | bool | None) -> GPT:
    """A stage without storage: the skeleton a loader fills by name (quantized
    layers as placeholders when mode is a --quantize mode; True: int8)."""
    with on_meta():
        stage = GPT(config, start, stop)
        if mode:  # tied embedding and head share one placeholder
            quantize_linears(stage, mode="int8" if mode is True else mode)
    return stage


def stored_shapes(config: GPTConfig, start: int, stop: int | None, mode: str,
                  names: set[str]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a stage of a checkpoint stored in `mode` whose file
    holds `names`: each quantized layer in the form the file has it (quant_parts.py)."""
    return StageBuilder(config, start, stop, stored=mode).stream_want(names)


class StageBuilder:
    """A stage filled tensor by tensor, each checked (name, shape, dtype) as it comes.

    quantize="int8": every Linear and Embedding weight is quantized the moment it
    arrives and its float tensor dropped, so the peak is the int8 stage plus one
    float tensor (quantizing a finished float stage held both whole). The result
    equals building the float stage and quantizing it, bit for bit.
    stored=mode: the tensors are a quantized checkpoint's (quant_parts.py), taken
    as they are (int4 codes packed here); call stream_want with the file's names
    first. A stream may carry quantized layers too (stream_want). dtype: the float
    tensors' dtype (None: as stored).
    """

    def __init__(self, config: GPTConfig, start: int = 0, stop: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 quantize: str | None = None, stored: str | None = None,
                 where: str = "weights") -> None:
        self.mode = run_mode(check_mode(stored), quantize, where)
        if self.mode and self.mode.startswith("int4") and torch.device(device).type != "cpu":
            raise CheckpointError(f"--quantize {self.mode} runs on CPU only (torch's int4 kernel "
                                  f"is a CPU one), not on {device}; use int8 there")
        self.int8 = self.mode is not None
        self.stored = stored
        self.config, self.device, self.dtype, self.where = config, device, dtype, where
        self.stage = quantized_skeleton(config, start, stop, self.mode)
        self.want = expected_shapes(config, start, stop)
        s = self.stage
        self.tied = config.tie_embeddings and s.has_embeddings and s.has_head
        self.sd: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()
        self.parts: QuantParts | None = None  # the layers that come quantized (stream_want)

    def stream_want(self, names: set[str]) -> dict[str, tuple[int, ...]]:
        """What a weights stream or a file whose header names `names` must hold for
        this stage (now `want`): the float stage's tensors, with each quantized layer
        whose parts the header names (every one, from a stored checkpoint) in those
        parts (quant_parts.py)."""
        layers = {}
        for n, m in self.stage.named_modules():
            if isinstance(m, Int4Linear):
                layers[n] = (m.out_features, m.in_features, m.group)
            elif isinstance(m, Int8Linear):
                layers[n] = (m.out_features, m.in_features, 0)
            elif isinstance(m, Int8Embedding):
                layers[n] = (m.num_embeddings, m.embedding_dim, 0)
        if self.config.tie_embeddings and EMBEDDING_SCALE in names:
            names = names | {TIED_SCALE}  # a checkpoint stores a tied head as the embedding
        self.want, forms = stream_want(self.want, layers, names, stored=self.stored is not None)
        self.parts = QuantParts(forms, self.where)
        return self.want

    def names(self) -> list[str]:
        """What to put, in order; the tied head is the embedding, never read twice."""
        skip = {TIED_HEAD, TIED_SCALE} if self.tied else set()
        return [n for n in self.want if n not in skip]

    def _module(self, name: str) -> torch.nn.Module:
        return self.stage.get_submodule(name.rpartition(".")[0])

    def row_quantized(self, name: str, fmt: str | None = None) -> bool:
        """Is tensor `name` stored as int8 rows here (quantize_rows)? Those may come as
        Rows (hf_source.py), never whole in float. fmt: its GGUF block format."""
        if not self.int8 or not name.endswith(".weight") or name not in self.want:
            return False
        module = self._module(name)
        if isinstance(module, Int4Linear):  # a wider block format goes to int8 rows
            return fmt is not None and int4_target(fmt) == "int8"
        return isinstance(module, (Int8Linear, Int8Embedding))

    def put(self, name: str, t: torch.Tensor | Rows) -> None:
        """Take tensor `name` (the caller drops its reference afterwards); Rows are
        quantized a block of rows at a time where row_quantized, else read whole."""
        if name not in self.want:
            raise CheckpointError(f"{self.where}: tensor {name!r} is not part of this stage")
        if tuple(t.shape) != self.want[name]:
            raise CheckpointError(f"{self.where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"the config needs {self.want[name]}")
        if isinstance(t, Rows) and (self.parts is not None and self.parts.owns(name)
                                    or not self.row_quantized(name, t.mdi_format)):
            t = t.whole()
        self.seen.add(name)
        if self.parts is not None and self.parts.owns(name):
            try:
                done = self.parts.take(name, t)
            except QuantPartsError as e:
                raise CheckpointError(str(e)) from None
            if done is not None:
                self._put_parts(*done)
            return
        if not t.is_floating_point():
            raise CheckpointError(f"{self.where}: tensor {name!r} has dtype {t.dtype}, expected "
                                  "floating point")
        module = self._module(name)
        if isinstance(module, Int4Linear) and name.endswith(".weight"):
            self._put_int4(name, t, module.group)
            return
        if isinstance(module, (Int8Linear, Int8Embedding)) and name.endswith(".weight"):
            if isinstance(module, Int8Embedding):
                module.out_dtype = self.dtype or t.dtype
            # rounded to the run's dtype a block of rows at a time, inside quantize_rows:
            # a whole float32 copy of a bfloat16 embedding was a node's load peak
            q, scale = quantize_rows(t if isinstance(t, Rows) else t.to(self.device),
                                     self.dtype or t.dtype)
            self._keep(name, q.to(self.device))
            self._keep(name[:-len("weight")] + "scale", scale.to(self.device))
            return
        t = t.to(device=self.device, dtype=self.dtype or t.dtype)
        # On some CPUs the per-row GEMM's low bits depend on the operand's
        # address; a tensor inside a file or a stream sits at whatever offset the
        # format gave it. Copy those into allocator-aligned memory (only those:
        # a second copy of every weight would double the peak memory).
        self._keep(name, t.clone() if t.data_ptr() % ALIGN else t)

    def _put_int4(self, name: str, t: torch.Tensor, group: int) -> None:
        """An int4 weight: the file's own codes where it has them at this group size
        (a GGUF Q4_0/Q4_1/Q4_K tensor: `t.mdi_int4`, exact), else quantized from t."""
        w: Int4Weight | None = getattr(t, "mdi_int4", None)
        fmt = getattr(t, "mdi_format", None)  # a GGUF tensor's block format
        if w is None and fmt is not None and int4_target(fmt) == "int8":
            # a wider block format (Q5_x, Q6_K, Q8_0): int8, not a requantization to int4
            rows = t if isinstance(t, Rows) else t.to(self.device, torch.float32)
            self._put_parts(name[:-len(".weight")], quantize_rows(rows))
            return
        if w is None or w.group != group:  # quantized and packed a block of rows at a time
            packed = Int4Linear.from_float(t, group)
            self._keep(name, packed.weight)
            self._keep(name[:-len("weight")] + "scales_and_zeros", packed.scales_and_zeros)
            return
        self._put_parts(name[:-len(".weight")], w)

    def _put_parts(self, prefix: str, w: Int4Weight | tuple[torch.Tensor, torch.Tensor]) -> None:
        """A quantized layer: int4 codes (packed by _put_codes), or int8 rows."""
        if isinstance(w, Int4Weight):
            self._put_codes(prefix, w)
            return
        old = self._module(prefix + ".weight")
        if isinstance(old, Int8Embedding):
            old.out_dtype = self.dtype or torch.float32
        elif not isinstance(old, Int8Linear):  # an int4 layer that its source holds as int8
            self.stage.set_submodule(prefix, Int8Linear(old.in_features, old.out_features,
                                                        old.bias is not None, "meta"))
        self._keep(prefix + ".weight", w[0].to(self.device))
        self._keep(prefix + ".scale", w[1].to(self.device))

    def _put_codes(self, prefix: str, w: Int4Weight) -> None:
        packed = Int4Linear.from_weight(w)  # int4 kernels run on CPU: packed there
        self._keep(prefix + ".weight", packed.weight)
        self._keep(prefix + ".scales_and_zeros", packed.scales_and_zeros)

    def _keep(self, name: str, t: torch.Tensor) -> None:
        self.sd[name] = t
        if self.tied and name in (EMBEDDING, EMBEDDING_SCALE):
            self.sd[TIED_HEAD if name == EMBEDDING else TIED_SCALE] = t  # one tensor, shared

    def check_complete(self) -> None:
        missing = [n for n in self.names() if n not in self.seen]
        if missing:
            raise CheckpointError(f"{self.where}: missing tensor {missing[0]!r}"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))

    def finish(self) -> GPT:
        self.check_complete()
        stage = self.stage
        stage.load_state_dict(self.sd, assign=True, strict=True)
        self.sd = {}
        if self.tied:  # re-tie: one tensor (int8: one table and one scale) for both
            stage.lm_head.weight = stage.transformer.wte.weight
            if self.int8:
                stage.lm_head.scale = stage.transformer.wte.scale
        return stage.eval()


def build_stage(config: GPTConfig, start: int, stop: int | None,
                get: Callable[[str], torch.Tensor | None], names: set[str] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                where: str = "weights", quantize: str | None = None,
                stored: str | None = None, make: type[StageBuilder] = StageBuilder):
    """Build a stage from tensors fetched by name, one at a time (see StageBuilder;
    make: its class, quant_store.StoreBuilder for the tensors to store).

    `get(name)` returns a tensor or None when absent. `names`, when given, is
    the set of names the source holds (a stored checkpoint's must be given):
    anything the stage does not use but belongs to its layer range is an error
    (wrong config).
    """
    b = make(config, start, stop, device, dtype, quantize, stored, where)
    if stored:
        b.stream_want(names)
    if names is not None:
        whole = stored_shapes(config, 0, None, stored, names) if stored else expected_shapes(config)
        unknown = sorted(names - set(whole) - {TIED_HEAD, TIED_SCALE})
        if unknown:
            raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unknown[:5])}")
    with mapped_allocations():  # see malloc.py: freed float tensors go back to the OS
        for name in b.names():
            t = get(name)
            if t is None and name in TIED_SOURCES and config.tie_embeddings:
                t = get(TIED_SOURCES[name])  # tied to the embedding
            if t is None:
                raise CheckpointError(f"{where}: missing tensor {name!r}")
            b.put(name, t)
            del t  # one float tensor at a time
    return b.finish()


def load_stage_dir(path: str | Path, start: int = 0, stop: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               quantize: str | None = None) -> tuple[GPT, CheckpointInfo]:
    """Load blocks [start, stop) of the checkpoint at path (the whole model by default).

    Only the stage's tensors are read, each once, into fresh buffers (see st_io);
    with quantize="int8" each weight is quantized as it is read. A quantized
    checkpoint gives the stage of its own mode (no float step); another
    `quantize` is an error (run_mode).
    """
    info = read_info(path)
    if not info.weights_path.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    quantize = run_mode(info.quantized, quantize, info.path)
    if info.quantized:
        dtype = dtype or DTYPES[info.float_dtype]
    return read_stage_file(info.weights_path, info.config, start, stop, device, dtype, quantize,
                           info.quantized), info


def read_stage_file(weights: str | Path, config: GPTConfig, start: int = 0, stop: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    quantize: str | None = None, stored: str | None = None,
                    make: type[StageBuilder] = StageBuilder):
    """Build a stage from a safetensors file (a checkpoint's or a chunk's);
    stored: the mode the file holds its layers quantized in (quant_parts.py);
    make: see build_stage."""
    try:
        with st_io.open_file(weights) as f:
            entries, data_start = st_io.read_header(f, int8=stored is not None)
            return build_stage(config, start, stop,
                               lambda n: st_io.read_tensor(f, entries[n], data_start) if n in entries else None,
                               names=set(entries), device=device, dtype=dtype, where=str(weights),
                               quantize=quantize, stored=stored, make=make)
    except (st_io.SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {e}") from None


def load_model_dir(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, quantize: str | None = None
                   ) -> tuple[GPT, CheckpointInfo]:
    """The whole model of our checkpoint directory (sources.load_model takes any --ckpt)."""
    return load_stage_dir(path, 0, None, device=device, dtype=dtype, quantize=quantize)
