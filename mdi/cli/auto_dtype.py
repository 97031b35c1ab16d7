"""`--dtype auto`: the compute dtype this device is fastest at without losing range.

CPU: bfloat16 only where the CPU multiplies bfloat16 natively (AVX-512 BF16 or
AMX on x86, the BF16 extension on Arm, read from /proc/cpuinfo) *and* a short
probe on this machine finds it faster than float32 at both 1 and 16 rows of a
matrix product the size of a small model's MLP; else float32. Without native
bfloat16 a CPU converts every element: on the AVX2 machine this project is
measured on, bfloat16 reads half the bytes and wins at 1 row (1.7x) but is 3x
slower at 16 rows, so one dtype for the whole run cannot be bfloat16 there.
The probe (~0.3 s idle, ~1 s on a loaded machine) runs once per CPU model, torch version and thread count and
is kept in ~/.cache/mdi/auto_dtype.json (MDI_CACHE_DIR moves it).
CUDA: bfloat16 where the GPU supports it, else float32. Others: float32.

MDI_AUTO_DTYPE=float32|bfloat16|float16 fixes the answer (a reproducible run;
the test suite sets it so that results do not depend on the CI machine's CPU).
Int8 and int4 layers pick their own kernels (model/kernels.py, model/int4.py):
the dtype is what the rest of the model computes in.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from ..model.dtypes import DTYPES

log = logging.getLogger(__name__)
ENV = "MDI_AUTO_DTYPE"
PROBE_SHAPE = (1024, 4096)  # (in, out) of the probe's weight: 16 MB in float32
WIN = 1.1  # bfloat16 must be this much faster at both row counts
ROUNDS = 20  # each configuration timed this many times, interleaved (best kept)


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's native bfloat16 features (empty: none, or not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    found = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found |= {f for f in value.split() if f in ("avx512_bf16", "amx_bf16", "bf16")}
    return sorted(found)


def probe_ms(rounds: int = ROUNDS) -> dict[str, float]:
    """Best time (ms) of one (rows, in) @ (in, out) product per dtype and row count,
    keys fp32_1, bf16_1, fp32_16, bf16_16. The four are timed in turn, `rounds`
    times over: on a shared machine a burst of other work then slows all four
    rather than one (five runs of one, then five of the next, gave float32 or
    bfloat16 by chance on the loaded 2-core Sapphire Rapids machine)."""
    k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    cases = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        wt = w.to(dtype)
        for rows in (1, 16):
            cases[f"{name}_{rows}"] = (torch.randn(rows, k, generator=g).to(dtype), wt)
    best = dict.fromkeys(cases, float("inf"))
    with torch.inference_mode():
        for x, wt in cases.values():
            torch.nn.functional.linear(x, wt)  # warm
        for _ in range(rounds):
            for key, (x, wt) in cases.items():
                t = time.perf_counter()
                torch.nn.functional.linear(x, wt)
                best[key] = min(best[key], time.perf_counter() - t)
    return {key: round(v * 1e3, 4) for key, v in best.items()}


def _cache_path() -> Path:
    base = os.environ.get("MDI_CACHE_DIR") or Path.home() / ".cache" / "mdi"
    return Path(base) / "auto_dtype.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_choice(cache: Path | None = None) -> tuple[str, str]:
    """(dtype name, why) for this CPU: see the module doc."""
    flags = native_bf16_flags()
    if not flags:
        return "float32", (f"this CPU has no native bfloat16 matmul (torch uses "
                           f"{torch.backends.cpu.get_cpu_capability()})")
    cache = cache or _cache_path()
    key = f"{_cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    ms = known.get(key) if isinstance(known, dict) else None
    if not (isinstance(ms, dict) and all(isinstance(ms.get(k), (int, float))
                                         for k in ("fp32_1", "bf16_1", "fp32_16", "bf16_16"))):
        ms = probe_ms()
        known = known if isinstance(known, dict) else {}
        known[key] = ms
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1) + "\n")
        except OSError as e:
            log.debug("cannot keep the dtype probe in %s: %s", cache, e)
    gains = [ms[f"fp32_{r}"] / max(ms[f"bf16_{r}"], 1e-9) for r in (1, 16)]
    figures = f"bfloat16 {gains[0]:.2f}x float32 at 1 row, {gains[1]:.2f}x at 16"
    if min(gains) >= WIN:
        return "bfloat16", f"native bfloat16 ({', '.join(flags)}); {figures}"
    return "float32", f"native bfloat16 ({', '.join(flags)}) but {figures}"


def resolve(dtype: str, device: str = "cpu") -> tuple[str, str]:
    """(a DTYPES name, why) for --dtype `dtype` on `device`; a name passes through."""
    if dtype != "auto":
        return dtype, "--dtype"
    fixed = os.environ.get(ENV)
    if fixed:
        if fixed not in DTYPES:
            raise ValueError(f"{ENV}={fixed!r}: must be one of {', '.join(DTYPES)}")
        return fixed, f"auto, fixed by {ENV}"
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {device} supports bfloat16"
        return "float32", f"auto: {device} has no bfloat16"
    if kind != "cpu":
        return "float32", f"auto: float32 on {kind}"
    name, why = cpu_choice()
    return name, f"auto: {why}"
