"""Import checkpoints of karpathy/nanoGPT and of the original MDI system.

Both write `torch.save({"model": state_dict, "model_args": {...}, "iter_num",
"best_val_loss", "config", ["optimizer"]})` and keep a char vocabulary in a
pickled `meta.pkl`. We read the checkpoint with `weights_only=True` and the
vocabulary with a restricted unpickler, so no import runs foreign code.

nanoGPT's names are ours. The original MDI model differs in layout only:
per-head query/key/value Linears (no bias) that we fuse into c_attn, ReLU
MLP, a biased lm_head, Linears that always carry a bias while its LayerNorms
follow `bias`.
"""
from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..model import GPTConfig
from ..tokenizer import CharTokenizer, TokenizerError
from .format import CONFIG, TIED_HEAD, CheckpointError, build_stage, expected_shapes, save_checkpoint
from .unpickle import load_meta_pkl

log = logging.getLogger(__name__)

NANOGPT, MDI_ORIGINAL = "nanogpt", "mdi-original"
COMPILED_PREFIX = "_orig_mod."  # torch.compile'd models save their keys under this
# Causal-mask buffers, not weights: nanoGPT's `attn.bias` (1, 1, T, T) when it
# lacks flash attention, and each original-MDI head's `tril` (T, T).
MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.bias$|\.tril$")


class _Source:
    """The source state dict; records which tensors were used so leftovers are reported."""

    def __init__(self, sd: dict[str, torch.Tensor], where: str) -> None:
        self.sd, self.where, self.used = sd, where, set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(f"{self.where}: missing tensor {key!r}")
        self.used.add(key)
        return self.sd[key]

    def check_all_used(self) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            more = f" (and {len(left) - 5} more)" if len(left) > 5 else ""
            raise CheckpointError(f"{self.where}: unexpected tensor(s) {', '.join(left[:5])}{more}; "
                                  "the checkpoint does not match its model_args")


def _load_torch(src: Path) -> dict[str, Any]:
    # mmap (zip-format files only, i.e. torch >= 1.6) leaves the optimizer
    # state, often twice the model's size, on disk instead of in memory.
    mmap = zipfile.is_zipfile(src)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many unrelated types on bad input
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"{src} is not a weights-only loadable checkpoint: it holds Python objects "
                "besides tensors and plain containers, and we never unpickle those. Re-save it "
                "from its own code as plain dicts of tensors.") from None
        raise CheckpointError(f"{src} is corrupt or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{src}: expected a dict with a 'model' state dict "
                              "(a nanoGPT or original-MDI checkpoint)")
    if not isinstance(obj.get("model_args"), dict):
        raise CheckpointError(f"{src}: no 'model_args' dict; cannot tell the model's shape")
    return obj


def _state_dict(raw: dict, src: Path) -> dict[str, torch.Tensor]:
    """Strip the torch.compile prefix and drop mask buffers; every value must be a tensor."""
    sd = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{src}: state dict entry {key!r} is not a named tensor")
        key = key.removeprefix(COMPILED_PREFIX)
        if not MASK_BUFFER.search(key):
            sd[key] = value
    return sd


def detect_layout(keys: set[str]) -> str:
    if "transformer.wte.weight" in keys:
        return NANOGPT
    if "transformer.token_embedding.weight" in keys:
        return MDI_ORIGINAL
    sample = ", ".join(sorted(keys)[:5]) or "none"
    raise CheckpointError("unknown checkpoint layout: neither nanoGPT (transformer.wte.weight) "
                          f"nor original MDI (transformer.token_embedding.weight); keys: {sample}")


def _config(args: dict, src: Path, **override: Any) -> GPTConfig:
    """Our GPTConfig from model_args (extra keys such as batch_size are ignored)."""
    data = {}
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"):
        if name not in args:
            raise CheckpointError(f"{src}: model_args has no {name!r}")
        data[name] = args[name]
    if not isinstance(args["bias"], bool):
        raise CheckpointError(f"{src}: model_args 'bias' must be a bool, got {args['bias']!r}")
    data.update(override)
    try:
        return GPTConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{src}: model_args: {e}") from None


def _check_tied(src: _Source, head: str, emb: str) -> None:
    """Our model ties lm_head.weight to the token embedding; refuse an untied head."""
    if src.has(head) and not torch.equal(src.take(head), src.take(emb)):
        raise CheckpointError(f"{src.where}: {head!r} differs from {emb!r}; untied heads "
                              "are not supported")


def _map_nanogpt(src: _Source, config: GPTConfig) -> dict[str, torch.Tensor]:
    out = {name: src.take(name) for name in expected_shapes(config) if name != TIED_HEAD}
    _check_tied(src, TIED_HEAD, "transformer.wte.weight")
    return out


def _mdi_prefixes(src: _Source) -> tuple[str, str]:
    """Block and attention prefixes: `transformer.layers.{i}.mha` in the released
    code, `transformer.mha.{i}.sa` in its earlier versions."""
    if any(k.startswith("transformer.mha.") for k in src.sd):
        return "transformer.mha.{i}.", "sa"
    return "transformer.layers.{i}.", "mha"


def _map_mdi(src: _Source, config: GPTConfig, ln_bias: bool) -> dict[str, torch.Tensor]:
    C, nh = config.n_embd, config.n_head
    block, attn = _mdi_prefixes(src)
    heads = {int(m.group(1)) for k in src.sd
             if (m := re.search(rf"\.{attn}\.heads\.(\d+)\.query\.weight$", k))}
    if heads and max(heads) + 1 != nh:
        raise CheckpointError(f"{src.where}: found {max(heads) + 1} attention heads per block, "
                              f"model_args says n_head={nh}")

    def ln(name: str) -> torch.Tensor:
        # Its LayerNorms have a bias only when `bias` is set; a zero bias is exact.
        w = src.take(name + ".weight")
        return src.take(name + ".bias") if ln_bias else torch.zeros_like(w)

    def head(name: str) -> torch.Tensor:
        w = src.take(name)
        if tuple(w.shape) != (config.head_size, C):
            raise CheckpointError(f"{src.where}: tensor {name!r} has shape {tuple(w.shape)}, "
                                  f"model_args need {(config.head_size, C)}")
        return w

    out = {"transformer.wte.weight": src.take("transformer.token_embedding.weight"),
           "transformer.wpe.weight": src.take("transformer.position_embedding.weight"),
           "transformer.ln_f.weight": src.take("transformer.ln_f.weight"),
           "transformer.ln_f.bias": ln("transformer.ln_f"),
           "lm_head.bias": src.take("lm_head.bias")}
    _check_tied(src, "lm_head.weight", "transformer.token_embedding.weight")
    for i in range(config.n_layer):
        p, q = block.format(i=i), f"transformer.h.{i}."
        # Each head's Linear(C, hs) weight is (hs, C); stacking the heads in order
        # gives the (C, C) projection whose output splits as (nh, hs), like ours.
        qkv = [torch.cat([head(f"{p}{attn}.heads.{h}.{part}.weight") for h in range(nh)])
               for part in ("query", "key", "value")]
        out.update({
            q + "ln_1.weight": src.take(p + "ln1.weight"), q + "ln_1.bias": ln(p + "ln1"),
            q + "attn.c_attn.weight": torch.cat(qkv),  # (3C, C): q rows, then k, then v
            q + "attn.c_attn.bias": qkv[0].new_zeros(3 * C),  # its projections have no bias
            q + "attn.c_proj.weight": src.take(f"{p}{attn}.proj.weight"),
            q + "attn.c_proj.bias": src.take(f"{p}{attn}.proj.bias"),
            q + "ln_2.weight": src.take(p + "ln2.weight"), q + "ln_2.bias": ln(p + "ln2"),
            q + "mlp.c_fc.weight": src.take(p + "ffwd.net.0.weight"),  # (4C, C)
            q + "mlp.c_fc.bias": src.take(p + "ffwd.net.0.bias"),
            q + "mlp.c_proj.weight": src.take(p + "ffwd.net.2.weight"),  # (C, 4C)
            q + "mlp.c_proj.bias": src.take(p + "ffwd.net.2.bias"),
        })
    return out


def _dataset_names(cfg: Any) -> list[str]:
    """nanoGPT stores config['dataset'], the original MDI config['DATASET']."""
    if not isinstance(cfg, dict):
        return []
    names = [cfg.get(k) for k in ("dataset", "DATASET")]
    return [n for n in dict.fromkeys(names)
            if isinstance(n, str) and n and n not in (".", "..") and not re.search(r"[/\\]", n)]


def find_meta(src: Path, cfg: Any) -> Path:
    """Where nanoGPT and the original MDI keep meta.pkl, relative to the checkpoint.

    nanoGPT: ROOT/out-X/ckpt.pt with ROOT/data/<dataset>/meta.pkl; original
    MDI: data/<dataset>/out/ckpt.pt with data/<dataset>/meta.pkl.
    """
    parent, grand = src.parent, src.parent.parent
    looked = [parent / "meta.pkl", grand / "meta.pkl"]
    looked += [root / "data" / n / "meta.pkl" for n in _dataset_names(cfg) for root in (parent, grand)]
    for path in looked:
        if path.is_file():
            return path
    found = sorted({p for root in (parent, grand) for p in root.glob("data/*/meta.pkl")})
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"several vocabularies could belong to {src}: "
                              f"{', '.join(map(str, found))}; choose one with --meta")
    where = ", ".join(map(str, looked + [parent / "data/*/meta.pkl", grand / "data/*/meta.pkl"]))
    raise CheckpointError(f"no meta.pkl vocabulary found for {src} (looked at {where}); "
                          "give its path with --meta")


def tokenizer_from_meta(meta: dict[str, Any], path: Path, vocab_size: int) -> CharTokenizer:
    itos = meta["itos"]
    n = len(itos)
    if sorted(itos) != list(range(n)):
        raise CheckpointError(f"{path}: 'itos' ids must be 0..{n - 1}")
    if meta.get("vocab_size", n) != n:
        raise CheckpointError(f"{path}: vocab_size {meta['vocab_size']} but 'itos' has {n} entries")
    if n != vocab_size:
        raise CheckpointError(f"{path} has {n} characters, the model's vocab_size is {vocab_size}; "
                              "is it the vocabulary this model was trained with?")
    try:
        return CharTokenizer([itos[i] for i in range(n)])
    except TokenizerError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _as_float(x: Any) -> float | None:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()  # nanoGPT stores the loss as a 0-d tensor
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def convert(src: str | Path, out_dir: str | Path, meta: str | Path | None = None,
            overwrite: bool = False) -> Path:
    """Convert a nanoGPT or original-MDI `.pt` checkpoint into our format at out_dir.

    Everything is checked before anything is written; returns out_dir.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise CheckpointError(f"checkpoint file not found: {src}")
    if (out_dir / CONFIG).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; choose another --out "
                              "(or overwrite it with --force)")
    ckpt = _load_torch(src)
    source = _Source(_state_dict(ckpt["model"], src), str(src))
    layout = detect_layout(set(source.sd))
    args = ckpt["model_args"]
    if layout == NANOGPT:
        config = _config(args, src, activation="gelu", head_bias=False)
        tensors = _map_nanogpt(source, config)
    else:
        # Its Linears always have a bias, so ours do too; `bias` only drove its LayerNorms.
        config = _config(args, src, activation="relu", head_bias=True, bias=True)
        tensors = _map_mdi(source, config, ln_bias=args["bias"])
    source.check_all_used()
    model = build_stage(config, 0, None, get=tensors.get, names=set(tensors), where=str(src))

    meta_path = Path(meta) if meta is not None else find_meta(src, ckpt.get("config"))
    tokenizer = tokenizer_from_meta(load_meta_pkl(meta_path), meta_path, config.vocab_size)
    iter_num = ckpt.get("iter_num")
    training = {"imported_from": layout, "source": str(src),
                "iter_num": iter_num if isinstance(iter_num, int) else None,
                "best_val_loss": _as_float(ckpt.get("best_val_loss"))}
    save_checkpoint(out_dir, model, tokenizer, training)
    log.info("imported %s checkpoint %s (%d layers, vocabulary %d from %s) into %s",
             layout, src, config.n_layer, config.vocab_size, meta_path, out_dir)
    return out_dir
