"""`--compile`: every package of the compiled decode step ready before the first
request (`mdi serve`) or the first prompt (`mdi chat`).

A package is built the first time its graph runs (model/compiled.py); that time would
be a request's or an answer's (about a minute on 2 cores, with nothing said). So the
start loads or builds the package of every graph the engine's steps can run: each row
bucket of 1..rows rows (1, 2, 4, 8, ..., rows), with every row at one position and,
from 2 rows, at several. `mdi serve` (serve/backend.py, on its compute thread, before
the server binds) readies those of max_seqs rows; `mdi chat` (cli/chat.py, on the
engine's thread, before its first prompt) those of its one sequence: one package.
A first start builds them (a log line each with its expected time, a bar on a
terminal); a later start loads them from the cache (MDI_CACHE_DIR/inductor/mdi-aoti,
or ~/.cache/mdi/inductor/mdi-aoti), a second or two each.
"""
from __future__ import annotations

import logging
import threading
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("mdi.compile")

BUILD_S = 60.0  # one package's build on 2 cores (SmolLM2-135M: 64-84 s; the bundled model 12 s)
LONG_S = 300.0  # a first start expected to build for longer: said as a warning


def _what(n: int, uniform: bool) -> str:
    return f"{n} row{'s' if n > 1 else ''}{'' if uniform else ' at several positions'}"


def prepare_compiled(model, cache_rows: int, stop: threading.Event | None = None,
                     before: str = "serving", fewer: str = "--max-seqs"
                     ) -> dict[tuple[int, bool], str]:
    """Load or build the packages of every graph a decode step over rows of a cache of
    `cache_rows` rows (the local engine's one lane: max_seqs) can run; returns what each
    (rows, uniform) was: "loaded", "built", "ready" (already loaded), or none at all (a
    model without --compile, or one whose steps go through torch.compile, which compiles
    on first use). stop: set (a Ctrl-C at start), no further package is begun. before:
    what the builds come before, in the log; fewer: the option that makes fewer of them."""
    compiled = getattr(model, "compiled_decode", None)
    if compiled is None:
        return {}
    cache = model.new_cache(cache_rows)  # as the engine's (a paged CPU cache: no memory yet)
    if not compiled.uses_packages(cache):
        log.info("--compile: %s steps go through torch.compile, which compiles each row bucket "
                 "on its first step", cache.kv[0].device.type if cache.kv else "this device's")
        return {}
    plan = []
    for n, uniform in compiled.graphs(cache_rows):
        made = compiled.example(cache, n, uniform)
        if made is not None:
            plan.append((n, uniform, not compiled.package_path(made[1], uniform).exists()))
    todo = sum(build for *_, build in plan)
    if todo:
        folder = compiled.package_path(compiled.example(cache, 1, True)[1], True).parent
        minutes = todo * BUILD_S / 60
        (log.warning if todo * BUILD_S > LONG_S else log.info)(
            "--compile: building %d of the decode step's %d package(s) (row buckets %s) before "
            "%s: about a minute each on 2 cores, ~%.0f min in all%s; once: later starts load "
            "them from %s", todo, len(plan), ", ".join(str(n) for n in sorted({n for n, *_ in plan})),
            before, max(minutes, 1), f" (fewer with a smaller {fewer})" if cache_rows > 1 else "",
            folder)
    t0, done, build_s = time.perf_counter(), {}, []
    with logging_redirect_tqdm(), tqdm(total=todo, unit="package", desc="--compile: building",
                                       disable=None if todo else True, leave=False) as bar:
        for n, uniform, build in plan:
            if stop is not None and stop.is_set():
                log.info("--compile: stopped before the decode step for %s", _what(n, uniform))
                return done
            if build:  # the expected time: the builds so far, else BUILD_S
                log.info("--compile: the decode step for %s: building (about %.0f s)",
                         _what(n, uniform), sum(build_s) / len(build_s) if build_s else BUILD_S)
            t1 = time.perf_counter()
            done[n, uniform] = how = compiled.prepare(cache, n, uniform)
            took = time.perf_counter() - t1
            if how == "loaded":
                log.info("--compile: the decode step for %s: loaded from cache in %.1f s",
                         _what(n, uniform), took)
            elif how == "built":
                build_s.append(took)
                left = todo - len(build_s)
                log.info("--compile: the decode step for %s: built in %.1f s%s", _what(n, uniform),
                         took, f" ({left} to go, about {left * sum(build_s) / len(build_s):.0f} s)"
                         if left > 0 else "")
                bar.update(1)
    log.info("--compile: %d decode-step package(s) ready in %.1f s (%d built, %d loaded)",
             len(done), time.perf_counter() - t0, sum(h == "built" for h in done.values()),
             sum(h == "loaded" for h in done.values()))
    return done
