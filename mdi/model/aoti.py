"""AOTInductor packages of the compiled decode step (`--compile`, model/compiled.py).

torch.compile traces the model with dynamo at every start, even when Inductor's
graphs are on disk (15-53 s of a cached start, docs/benchmarks.md). AOTInductor
compiles an exported graph (torch.export) ahead of time into a shared library
packaged as a .pt2 file; a later start loads that library (1.4 s of a cached
SmolLM2 start, its imports included) and skips dynamo, its guards and the
Python wrapper of every call.

One package per graph: (rows of the bucket, the cache's rows and length, mask or
none, the input's dtype) of a stage's shapes. The weights are not in it
(`package_constants_in_so=False`): at load the runner is handed the stage's own
tensors (`user_managed`: used in place, no copy), so a package holds code only
(a few MB), the weights are in memory once, and one package serves every
checkpoint of the same shapes. The few constants the trace made itself (the
norms' scalars, RoPE's frequencies; `lifted_tensor_*`) and those Inductor made
(the int4 kernel's group size) are saved beside it; a constant that is an
attribute of the stage (an int8 head's bfloat16 scales, made from its weights)
is read from the stage being loaded, not from the saved file.

The cache buffers are inputs that the graph writes in place (their index_put is
a user-input mutation, which AOTInductor writes into the caller's tensor), as
views of the lane's whole cache: their strides follow the cache's rows and
length, which are part of the key. The keys read (L) is the one dynamic size,
in [2, length - 1] (export's guards leave L == length out: that last position,
like L == 1, runs eagerly).

The key hashes the torch version, the source of mdi/model (the traced code),
the stage's config and range, every parameter's and buffer's name, shape and
dtype, the graph's shapes and `GRAPH_VERSION` (for a change the others do not
show); a package whose key differs is never loaded, it is built again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from . import fused_ops
from .decode_graph import decode_graph

log = logging.getLogger(__name__)

# bump when what a package computes changes in a way neither the key's shapes nor
# mdi/model's source show
GRAPH_VERSION = 1
# a package nobody loaded for this long is deleted when another is built (an edit of
# mdi/model or a new torch makes every older package unreachable: new keys)
UNUSED_DAYS = 30


class DecodeGraph(nn.Module):
    """The decode step as a module to export: the stage's parameters and buffers are
    its own (under `stage.`), the step's tensors its inputs."""

    def __init__(self, stage: nn.Module, uniform: bool) -> None:
        super().__init__()
        self.stage, self.uniform = stage, uniform

    def forward(self, x: torch.Tensor, pos: torch.Tensor, live: torch.Tensor,
                keys: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        return decode_graph(self.stage, x, pos, live, keys, kv, self.uniform)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of the model code a package traced (every module of mdi/model): an edit
    of a layer builds new packages instead of loading the old code's."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """What the compiled code was built for: the CPU's vector ISA Inductor picked, the
    machine and the C++ compiler (a cache in a home directory shared by the nodes of a
    cluster must not hand an AVX-512 package to an AVX2 CPU: SIGILL)."""
    import platform

    try:
        from torch._inductor import cpu_vec_isa
        isa = str(cpu_vec_isa.pick_vec_isa())
    except Exception:  # noqa: BLE001 - an Inductor without it: the flags stand in
        isa = ""
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
        compiler = get_compiler_version_info(get_cpp_compiler())
    except Exception:  # noqa: BLE001
        compiler = ""
    return {"isa": isa, "machine": platform.machine(), "compiler": compiler,
            "cpu": torch.backends.cpu.get_cpu_capability()}


def package_key(stage: nn.Module, x: torch.Tensor, kv: list[torch.Tensor], uniform: bool,
                options: dict | None = None) -> str:
    """A hex digest of what the package's code depends on (not the weights' values): the
    code, the shapes, the CPU it was built for and the kernel choices traced into it."""
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in
               [*stage.named_parameters(remove_duplicate=False),
                *stage.named_buffers(remove_duplicate=False)]]
    what = {"torch": torch.__version__, "graph": GRAPH_VERSION, "source": source_digest(),
            "config": asdict(stage.config),
            "range": [stage.start, stage.stop], "tensors": tensors, "uniform": uniform,
            "x": [list(x.shape), str(x.dtype)],
            "kv": [[list(b.shape), list(b.stride()), str(b.dtype)] for b in kv[:1]], "layers": len(kv),
            "options": options or {}, "machine": machine(),
            # the low-bit products traced as mdi's kernels (which build of them), or as
            # torch's (fused_ops.for_lowbit)
            "lowbit": fused_ops.library_path().name if fused_ops.ops() is not None else None,
            "kernels": [[n, getattr(m, "few_rows", None), getattr(m, "many_rows", None),
                         getattr(m, "refine", None)] for n, m in stage.named_modules()
                        if hasattr(m, "few_rows")]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_package(stage: nn.Module, args: tuple, uniform: bool, path: Path,
                  options: dict | None = None) -> None:
    """Export the step at args (x, pos, live, keys, kv) and compile it to `path` (.pt2),
    with its lifted constants beside it (`path`.consts); options: Inductor settings. The stage must have run an
    eager step before (compiled.py does): state made lazily during the trace would be
    the trace's own."""
    x, pos, live, keys, kv = args
    T = kv[0].shape[3]
    L = torch.export.Dim("L", min=2, max=T - 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(DecodeGraph(stage, uniform).eval(), args, strict=False,
                                 dynamic_shapes=({}, {}, {}, {0: L}, [{}] * len(kv)))
    lifted = as_buffers(ep)
    t1 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    made: dict[str, torch.Tensor] = {}
    with _constants_made(made):  # and those Inductor makes (the int4 kernel's group size)
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(tmp),
            inductor_configs={**(options or {}), "aot_inductor.package_constants_in_so": False})
    own, keep = _own(stage), {}
    for name in torch._inductor.aoti_load_package(str(tmp)).get_constant_fqns():
        if name not in own:  # saved: only what the stage does not hold (a few scalars)
            t = lifted.get(name, made.get(name))
            if t is None:
                raise RuntimeError(f"AOTInductor's package needs a constant {name!r} of unknown value")
            keep[name] = t.detach().clone()
    torch.save(keep, f"{tmp}.consts")
    os.replace(f"{tmp}.consts", f"{path}.consts")
    os.replace(tmp, path)  # last: a package on disk has its constants
    log.debug("exported in %.1f s, compiled in %.1f s: %s", t1 - t0, time.perf_counter() - t1, path)
    prune(path.parent, keep=path)


def prune(folder: Path, keep: Path, days: float = UNUSED_DAYS) -> list[Path]:
    """Delete the packages in folder (and their constants) not loaded or built for `days`
    (a load touches its package), all but `keep`; returns those deleted."""
    cutoff, gone = time.time() - days * 86400, []
    for pt2 in folder.glob("decode-*.pt2"):
        try:
            if pt2 != keep and pt2.stat().st_mtime < cutoff:
                pt2.unlink()
                Path(f"{pt2}.consts").unlink(missing_ok=True)
                gone.append(pt2)
        except OSError as e:  # another process's, or already gone: not ours to insist on
            log.debug("left %s: %s", pt2, e)
    if gone:
        log.info("--compile: deleted %d package(s) unused for %d days from %s", len(gone), days,
                 folder)
    return gone


@contextlib.contextmanager
def _constants_made(into: dict[str, torch.Tensor]):
    """Record the constants Inductor adds to a graph while it lowers it (name -> a copy):
    the int4 kernel's lowering makes its group size a tensor constant, which a package
    without constants does not hold either (torch 2.13: GraphLowering.add_tensor_constant)."""
    from torch._inductor.graph import GraphLowering

    add = GraphLowering.add_tensor_constant

    def recorded(self, data: torch.Tensor, name: str | None = None):
        box = add(self, data, name)
        into.setdefault(box.get_name(), data)  # (the weights too: by reference)
        return box

    GraphLowering.add_tensor_constant = recorded
    try:
        yield
    finally:
        GraphLowering.add_tensor_constant = add


def as_buffers(ep) -> dict[str, torch.Tensor]:
    """The trace's own constants (lifted tensors, plain tensor attributes) made buffers of
    the exported program: Inductor keeps a buffer's name (AOTInductor would rename such
    a constant `_tensor_constantN`), so that the loader can hand it over by name.
    Returns them (name -> a copy)."""
    from torch.export.graph_signature import InputKind, InputSpec

    specs, made = ep.graph_signature.input_specs, {}
    for i, spec in enumerate(specs):
        if spec.kind == InputKind.CONSTANT_TENSOR:
            specs[i] = InputSpec(InputKind.BUFFER, spec.arg, spec.target, persistent=True)
            t = ep.state_dict[spec.target] = ep.constants.pop(spec.target)
            made[spec.target] = t.detach().clone()
    return made


def _own(stage: nn.Module) -> dict[str, torch.Tensor]:
    """The stage's parameters and buffers by their names in a DecodeGraph."""
    return {f"stage.{n}": t for n, t in [*stage.named_parameters(remove_duplicate=False),
                                          *stage.named_buffers(remove_duplicate=False)]}


def _attribute(module: nn.Module, path: str) -> torch.Tensor | None:
    """module's tensor at a dotted path (submodules, then a plain attribute), or None."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def load_package(stage: nn.Module, path: Path):
    """The package's runner with the stage's tensors as its constants (used in place).
    The stage must have run an eager step (its lazy attributes made, as at the build):
    a constant that is an attribute of the stage (e.g. an int8 head's bfloat16 scales,
    made from its weights) is taken from it, so that a package built from another
    checkpoint of the same shapes computes with this one's; the saved ones are made
    from the config (the norms' scalars) or by Inductor (the int4 group size)."""
    run = torch._inductor.aoti_load_package(str(path))
    lifted = torch.load(f"{path}.consts", weights_only=True)
    with contextlib.suppress(OSError):  # used now: kept by prune() (a read-only cache is fine)
        os.utime(path)
    own = _own(stage)
    consts = {}
    for name in run.get_constant_fqns():
        t = own.get(name)
        if t is None:  # a plain tensor attribute of the stage (made by its warm step): its value
            t = _attribute(stage, name.removeprefix("stage."))  # now, not the builder's
        if t is None:  # made by the trace or by Inductor from the config and shapes alone
            t = lifted.get(name)
        if t is None:
            raise RuntimeError(f"compiled package {path} needs a constant {name!r} that neither the "
                               f"stage nor its saved constants hold; delete the package to rebuild it")
        consts[name] = t
    run.load_constants(consts, check_full_update=True, user_managed=True)
    return run
