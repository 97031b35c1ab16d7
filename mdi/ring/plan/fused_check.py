"""Whether each process of a ring computes with the fused decode kernels, and the
starter's warning when they disagree.

A process computes a decode step's small operations with mdi's C++ kernels
(model/fused_ops.py) where they build and load, else with torch's operations;
the two sum in another order, so a ring that mixes them no longer gives exactly
a single device's tokens. A node reports `fused_kernels` in GET /capabilities
and /status (true, false; null: not known, its kernels still building when
asked, or a GPU node, where they do not apply; an older node leaves it out).
A node starts loading them when it starts (`start_loading`: they would be built
at its first stage's load anyway), and /capabilities waits a moment for that
(`wait_state`); the starter loads its own (`local_state`) before it compares
(`check_ring`: one warning naming the processes that lack them).
"""
from __future__ import annotations

import asyncio
import logging
import threading

from ...model import fused_ops

log = logging.getLogger(__name__)
FUSED_DTYPES = ("float32", "bfloat16")  # the activations they apply to (fused_ops.for_forward)
CAPABILITY_WAIT_S = 3.0   # /capabilities waits this long for a build under way (< the starter's 5 s)

_done = threading.Event()
_start_lock = threading.Lock()
_thread: list[threading.Thread] = []


def _on_cpu(device: str | None) -> bool:
    return str(device or "cpu").startswith("cpu")


def _load() -> bool:
    """Load (build if need be) this process's kernels; whether they loaded."""
    try:
        return fused_ops.ops() is not None
    finally:  # (ops() answers None on any failure; /capabilities never waits for a dead load)
        _done.set()


def start_loading(device: str = "cpu") -> None:
    """Load this process's kernels on a thread of their own (a node, as it starts):
    a build takes seconds, and its first stage would wait for it anyway. Not on a GPU."""
    if not _on_cpu(device):
        return
    with _start_lock:
        if not _thread:
            t = threading.Thread(target=_load, name="mdi-fused-load", daemon=True)
            _thread.append(t)
            t.start()


def fused_state(device: str = "cpu") -> bool | None:
    """Whether this process computes with the kernels; None while not known (never
    asked, still building) or on a GPU (they apply to CPU activations only). No build."""
    return fused_ops.loaded() if _on_cpu(device) else None


async def wait_state(timeout: float = CAPABILITY_WAIT_S) -> None:
    """Wait at most `timeout` seconds for a load `start_loading` began (none: no wait)."""
    if _thread and not _done.is_set():
        await asyncio.to_thread(_done.wait, timeout)


def local_state(device: str = "cpu") -> bool | None:
    """This process's answer, loading (building) the kernels now if need be: the
    starter's, which computes stage 0 and would load them for it anyway. Blocks."""
    return _load() if _on_cpu(device) else None


def fused_of(cap: dict, who: str) -> bool | None:
    """A node's `fused_kernels` from its /capabilities: True, False or None (unknown:
    missing, from a node older than the field, or null); another value is unknown too,
    with a warning naming it."""
    value = cap.get("fused_kernels")
    if value is None or isinstance(value, bool):
        return value
    log.warning("%s reports fused_kernels=%r (not true, false or null): taken as unknown",
                who, value)
    return None


def ring_states(names: list[str], caps: list[dict]) -> list[tuple[str, bool | None]]:
    """(name, fused_of) of the ring's CPU processes, in ring order (GPU processes left
    out: the kernels do not apply to them)."""
    return [(n, fused_of(c, n)) for n, c in zip(names, caps) if _on_cpu(c.get("device"))]


def mixed_warning(states: list[tuple[str, bool | None]]) -> str:
    """The warning for a ring whose processes disagree on the kernels ('' when every
    one that says agrees); states: ring_states'."""
    lack = [n for n, s in states if s is False]
    have = [n for n, s in states if s is True]
    if not lack or not have:
        return ""
    unknown = [n for n, s in states if s is None]
    return (f"the ring's processes compute differently: {', '.join(lack)} "
            f"{'lacks' if len(lack) == 1 else 'lack'} the fused decode kernels "
            f"({', '.join(have)} {'has' if len(have) == 1 else 'have'} them"
            + (f"; not known for {', '.join(unknown)}" if unknown else "")
            + "), so tokens may differ from a single-device run's in their last bits; "
            "install a C++ compiler where they are missing, or set MDI_FUSED_OPS=0 for "
            "every process, for identical arithmetic")


def check_ring(names: list[str], caps: list[dict]) -> str:
    """Log the ring's mixed_warning, if any (else which processes did not say, at
    info level); returns it. names and caps in ring order, the starter first."""
    states = ring_states(names, caps)
    why = mixed_warning(states)
    unknown = [n for n, s in states if s is None]
    if why:
        log.warning("%s", why)
    elif unknown:
        log.info("fused decode kernels not known for %s (an older node, or still "
                 "building when asked)", ", ".join(unknown))
    return why
