"""`--compile`: the decode step of a stage compiled with Inductor (the gpt-fast recipe).

Two ways to run the graph (`CompiledDecode.how`): ahead of time (AOTInductor,
model/aoti.py, the default on the CPU): each graph is exported once, compiled
into a package stored beside Inductor's cache and loaded by every later start
(1-2 s, no dynamo), and called without Python between its kernels; or through
torch.compile (dynamo traces the model at every start, 10-50 s even with
Inductor's graphs on disk), which a cache that grows (another device) takes.

One graph serves every decode step of a row bucket: the positions and the
mask are tensors (no Python reads of them, no graph break), the rows of a step
are padded to a bucket (1, 2, 4, 8, 16, ...), and the keys attention reads (the
step's largest position + 1, as the eager step reads only the filled part) are
a dynamic size. The cache's length is fixed for a package (the CPU's paged
cache is whole from the start, cache.py) and dynamic for torch.compile (a grown
cache compiles nothing again). A bucket has two graphs at most: rows at one
position (no mask, as the eager step) and rows at several. Everything else is
static. `graphs` lists the graphs steps over a cache can run and `prepare` loads
or builds one ahead of its first step (`mdi serve` readies them all at start,
`mdi chat` its one: engine/compiled_start.py). A decode with every row at
position 0 (a one-token prompt) runs eagerly: a size of 1 would be a graph of
its own; so does, with a package, a step whose keys are the whole cache (the
context's last position). Prefill stays eager.

Padding uses rows of the cache itself: a step over rows [a, b) runs on the
rows [a, a + bucket) (or the last `bucket` rows at the cache's end); the rows
it adds are not live: each writes back, at the step's first position, the key
and value that were there (an exact no-op, whatever they hold: another sequence's cache, or
one decoded or prefilled earlier in the same step), and their outputs are
dropped.

The linears run on the plain weights ("dense"; Inductor chooses the kernels),
so a compiled float32 stage keeps its plain weights (loaded with pack=False).
The int8 and int4 kernels are aten operators, traced as they are.
Inductor's on-disk caches (FX graph, AOT autograd) and the packages (in
`mdi-aoti` under it) live where TORCHINDUCTOR_CACHE_DIR says; the loader
(checkpoint/sources.py:load_stage) sets it to ~/.cache/mdi/inductor (or
MDI_CACHE_DIR/inductor: `cache_dir`) unless the user did, so a second start of the same model and
shapes compiles nothing. What this module changes in the process is torch's
own settings for it: dynamo's recompile limit (one graph per bucket) and
Inductor's FX graph cache (on).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .cache import KVCache
from .decode_graph import decode_graph

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
log = logging.getLogger(__name__)


def cache_dir(environ: dict[str, str]) -> Path:
    """Where Inductor keeps its compiled graphs: environ's TORCHINDUCTOR_CACHE_DIR, else
    `inductor` in MDI_CACHE_DIR (mdi's other caches' folder), else ~/.cache/mdi/inductor."""
    env = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    return Path(environ.get("MDI_CACHE_DIR") or Path.home() / ".cache" / "mdi") / "inductor"


def compile_unavailable() -> str | None:
    """Why this process cannot compile a decode step (None: it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "no C++ compiler on PATH (Inductor's CPU backend builds C++: install g++)"
    return None


def bucket(rows: int, limit: int) -> int:
    """Rows a step of `rows` runs as: the smallest bucket >= rows, at most `limit`
    (the cache's rows: a smaller cache pads only to its own size)."""
    for b in BUCKETS:
        if b >= rows:
            return min(b, limit)
    return min(rows, limit)


class CompiledDecode:
    """A stage's decode step, compiled per row bucket (and mask or none) on first use;
    `shapes` holds each graph's first-call seconds (a compile, or a read from disk).

    how: "aoti" (the default): an AOTInductor package per graph (model/aoti.py), kept
    in `package_dir` and loaded from there by later starts, for a CPU stage whose
    cache is paged (its length fixed); other stages, and how="inductor", go through
    torch.compile (dynamo at every start; Inductor's graphs cached on disk). A package
    covers keys read 2 <= L < T (the cache's length): a step with a row at the
    context's last position, as one with every row at position 0, runs eagerly.
    options: Inductor settings for either (e.g. {"cpp_wrapper": True})."""

    def __init__(self, stage: torch.nn.Module,
                 on_graph: Callable[[int, bool, float], None] | None = None,
                 how: str = "aoti", package_dir: Path | None = None,
                 options: dict | None = None) -> None:
        why = compile_unavailable()
        if why is not None:
            raise RuntimeError(f"--compile: {why}")
        if getattr(stage, "batch_invariant", False):
            raise ValueError("--compile with --batch-invariant: the compiled step is not "
                             "batch-invariant (Inductor's kernels sum rows as they choose); "
                             "use one or the other")
        if how not in ("aoti", "inductor"):
            raise ValueError(f"compiled decode: how is aoti or inductor, got {how!r}")
        # one graph per bucket and mask, which may be more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._inductor.config.fx_graph_cache = True
        self.stage, self.how, self.options = stage, how, dict(options or {})
        self.package_dir = package_dir
        self.shapes: dict[tuple, float] = {}  # (rows, dtype, uniform) -> first call's seconds
        self.on_graph = on_graph  # (rows, uniform, seconds) of each graph's first call
        self._runners: dict[tuple, Callable] = {}  # AOTInductor: key -> loaded package
        self.built: set[tuple] = set()  # the keys of the packages this process built
        self._fn = torch.compile(self._step, dynamic=False, fullgraph=True,
                                 options=self.options or None)

    def _step(self, x: torch.Tensor, pos: torch.Tensor, live: torch.Tensor, keys: torch.Tensor,
              kv: list[torch.Tensor], uniform: bool) -> torch.Tensor:
        return decode_graph(self.stage, x, pos, live, keys, kv, uniform)

    def _runner(self, key: tuple, args: tuple, uniform: bool, announce: bool = True) -> Callable:
        """The loaded package of this graph: from package_dir, else built there (logged
        unless not `announce`: prepare's caller says it)."""
        from . import aoti

        run = self._runners.get(key)
        if run is None:
            x, kv = args[0], args[4]
            path = self.package_path(args, uniform)
            with torch.inference_mode():  # the stage's lazy state made eagerly, not in the trace
                one = self.stage.new_cache(1)
                self.stage(x[:1], torch.ones((1, 1), dtype=torch.long, device=x.device), one)
            if path.exists():
                try:
                    run = aoti.load_package(self.stage, path)
                except Exception as e:  # noqa: BLE001 - a torn or foreign file: rebuilt
                    log.warning("--compile: cannot load %s (%s): building it again", path, e)
            if run is None:
                if announce:
                    log.info("--compile: building the decode step for %d row(s)%s, once (about "
                             "a minute on 2 cores; later starts load it from %s)", x.shape[0],
                             "" if uniform else " at several positions", path.parent)
                with torch.inference_mode(False):
                    aoti.build_package(self.stage, args, uniform, path, self.options)
                run = aoti.load_package(self.stage, path)
                self.built.add(key)
            self._runners[key] = run
        return run

    def package_path(self, args: tuple, uniform: bool) -> Path:
        """Where the package of the graph for these step arguments is (or goes)."""
        from . import aoti

        x, kv = args[0], args[4]
        base = self.package_dir or cache_dir(os.environ) / "mdi-aoti"
        return base / f"decode-{aoti.package_key(self.stage, x, kv, uniform, self.options)}.pt2"

    def uses_packages(self, cache: KVCache) -> bool:
        """Whether steps over rows of `cache` run AOTInductor packages (else torch.compile)."""
        whole = getattr(cache, "whole", cache)
        return self.how == "aoti" and whole.paged and whole.kv[0].device.type == "cpu"

    @staticmethod
    def graphs(rows: int) -> list[tuple[int, bool]]:
        """The graphs (bucket, uniform) that steps over 1..rows rows of a cache of `rows`
        rows can run: each bucket with every row at one position, and, from 2 rows, at
        several (one row is always at one position)."""
        out = []
        for n in sorted({bucket(b, rows) for b in range(1, rows + 1)}):
            out += [(n, True)] + ([(n, False)] if n > 1 else [])
        return out

    def example(self, cache: KVCache, n: int, uniform: bool) -> tuple[tuple, tuple] | None:
        """(layout key, step arguments) of a step of n id rows of `cache`, rows at one
        position or (not uniform) at several, as __call__ makes them; None where no
        package would run (the context too short for a dynamic keys size in [2, T - 1])."""
        whole = getattr(cache, "whole", cache)
        T = whole.kv[0].shape[3]
        if T < 3 or not self.stage.has_embeddings:
            return None
        L = max(2, min(T - 1, 8))  # any size in [2, T - 1]: export makes it dynamic
        dev = whole.kv[0].device
        x = torch.zeros((n, 1), dtype=torch.long, device=dev)
        pos = torch.full((n, 1), L - 1, dtype=torch.long, device=dev)
        if not uniform:
            pos[1:, 0] = L - 2
        live = torch.ones(n, dtype=torch.bool, device=dev)
        kv = [buf[:, :n] for buf in whole.kv]
        layout = (n, x.dtype, uniform, tuple(kv[0].shape), tuple(kv[0].stride()))
        return layout, (x, pos, live, torch.arange(L, device=dev), kv)

    def prepare(self, cache: KVCache, n: int, uniform: bool) -> str:
        """Load (or build, then load) the package of one graph (graphs()) for steps over
        rows of `cache`, so that its first step builds nothing: "loaded" (from disk),
        "built", "ready" (loaded before), or "none" (no package: torch.compile, which
        compiles on first use, or a context too short)."""
        made = self.example(cache, n, uniform) if self.uses_packages(cache) else None
        if made is None:
            return "none"
        layout, args = made
        if layout in self._runners:
            return "ready"
        t0 = time.perf_counter()
        self._runner(layout, args, uniform, announce=False)
        self.shapes.setdefault(layout[:3], time.perf_counter() - t0)
        return "built" if layout in self.built else "loaded"

    def __call__(self, cache: KVCache, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One decode step as step.decode takes it: x (B, 1) ids or (B, 1, C)
        activations for the rows of `cache` (a KVCache or rows of one), row b at
        positions[b]. Returns what the stage returns for those B rows."""
        B, L = len(positions), max(positions) + 1
        whole = getattr(cache, "whole", cache)
        aot = self.uses_packages(whole)
        if L == 1 or (aot and L >= whole.kv[0].shape[3]):
            # every row at position 0 (a one-token prompt): dynamo would give a size of 1
            # a graph of its own, one eager step costs less than that compile; a row at
            # the context's last position: no package covers it (aoti.py)
            pos = torch.tensor(positions, dtype=torch.long, device=x.device)[:, None]
            return self.stage(x, pos, cache)
        a = getattr(cache, "span", (0, cache.batch))[0]
        cache.reserve(L)
        n = bucket(B, whole.batch)
        lo = min(a, whole.batch - n)  # pad with the rows after these, or before them at the end
        r = a - lo  # the step's first row in the window
        uniform = min(positions) == L - 1
        # padding rows sit at the first row's position: with every row at one
        # position the step needs no mask; their key/value writes are no-ops (live)
        pos = torch.full((n, 1), positions[0], dtype=torch.long, device=x.device)
        pos[r:r + B, 0] = torch.tensor(positions, dtype=torch.long)
        live = torch.zeros(n, dtype=torch.bool, device=x.device)
        live[r:r + B] = True
        if n != B:
            pad = x.new_zeros((n, *x.shape[1:]))
            pad[r:r + B] = x
            x = pad
        keys = torch.arange(L, device=x.device)
        kv = [buf[:, lo:lo + n] for buf in whole.kv]
        key = (n, x.dtype, uniform)
        t0 = time.perf_counter()
        if aot:
            # a package is for one layout of the cache (its rows and length: the views'
            # strides); example() makes the same key
            layout = (*key, tuple(kv[0].shape), tuple(kv[0].stride()))
            out = self._runner(layout, (x, pos, live, keys, kv), uniform)(x, pos, live, keys, kv)
        else:
            torch._dynamo.mark_dynamic(keys, 0)
            for b in kv:  # the allocated length: dynamic too (a growing cache compiles nothing)
                torch._dynamo.mark_dynamic(b, 3)
            out = self._fn(x, pos, live, keys, kv, uniform)
        if key not in self.shapes:
            self.shapes[key] = time.perf_counter() - t0
            if self.on_graph is not None:
                self.on_graph(n, uniform, self.shapes[key])
        return out[r:r + B]
