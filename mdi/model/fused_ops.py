"""The decoder layer's small operations as one CPU kernel each (csrc/decode_ops.cpp):
RMSNorm, a residual add with the norm after it, RoPE with the cache write, decode
attention over the cache, SwiGLU's gate; matrix products against float32
activations: int4 (csrc/lowbit_ops.cpp: Int4Linear), int8 and bfloat16 rows
(csrc/rows_ops.cpp: Int8Linear up to its `few_rows`, a bfloat16 Linear up to
kernels.FEW_ROWS rows); and a decode step's whole Llama-family layer as one call
of those kernels (csrc/layer_ops.cpp: fused_layers.block_forward).

An eager decode step of one sequence spent most of its time between the matrix
products, in ~90-130 aten calls per layer (issue 21). The kernels are built
with the system's C++ compiler on first use (~20 s, its four sources side by side) into MDI_CACHE_DIR/ops (else
~/.cache/mdi/ops), keyed by the source, torch's install, the machine, the
compiler and the flags, and loaded from there afterwards (one build at a time). Where no compiler or no build works, or with
MDI_FUSED_OPS=0, the layers compute as before with torch's operations (the
same maths; sums in another order, so last bits can differ): `ops()` is then
None. Every process of a ring should run alike; the log says which way a
process computes.

Used only where they apply: float32 or bfloat16 CPU activations, no autograd,
not while torch.compile or torch.export traces (the compiled step has its own
graph).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# compiled into one library
SOURCES = [CSRC / "decode_ops.cpp", CSRC / "lowbit_ops.cpp", CSRC / "rows_ops.cpp",
           CSRC / "layer_ops.cpp"]
HEADERS = [CSRC / "float_bits.h", CSRC / "kernel_common.h"]
# -ffp-contract=off: no multiply-add fused where the source does not write one, so
# every product and sum rounds as the source says, on every CPU (tokens equal
# across a ring's machines)
# (-fno-trapping-math: FP exception flags are not kept, so the loops of exp vectorize)
# (-fopenmp: at::parallel_for's threads; without it the header's pragma runs one thread.
# The library then needs libgomp.so.1, which torch's own library has loaded already.)
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math",
         "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-w"]
BUILD_TIMEOUT_S = 600

_state: dict[str, object] = {}
_UNSET = object()
_lock = threading.Lock()


def _vector_flags() -> list[str]:
    """The widest vectors torch itself uses on this CPU (the results do not depend
    on them: the kernels' sums run in the source's order)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
    if cap.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _compiler() -> list[str] | None:
    """The C++ compiler's command: $CXX (words, e.g. "ccache g++"), else g++, c++, clang++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return [found] if found else None


@functools.cache
def _compiler_version(cxx: tuple[str, ...]) -> str:
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
        return done.stdout.splitlines()[0] if done.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build_commands(cxx: list[str], objects: list[Path], out: Path, openmp: bool = True
                    ) -> tuple[list[list[str]], list[str]]:
    """The compiler's command for each source (into `objects`, run side by side: each
    takes ~10 s) and the link of them into the library `out`; without -fopenmp where
    `openmp` is False."""
    from torch.utils.cpp_extension import include_paths  # only when building: a heavy import

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = [*cxx, *(f for f in FLAGS if openmp or f != "-fopenmp"), *_vector_flags()]
    compile_ = [[*common, "-c", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                 *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}",
                 f"-I{CSRC}", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]
    link = [*common, *map(str, objects), "-o", str(out), f"-L{torch_lib}", "-lc10",
            "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    return compile_, link


def _run_all(commands: list[list[str]], what: str) -> None:
    """Run the commands side by side; a RuntimeError with the first failure's stderr."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              errors="replace") for c in commands]
    errors = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=BUILD_TIMEOUT_S)
            if p.returncode != 0:
                errors.append(err.strip()[-2000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if errors:
        raise RuntimeError(f"{what} failed: {errors[0]}")


def library_path(environ: dict[str, str] | None = None) -> Path:
    """Where this source's build, for this torch and these flags, is kept."""
    env = os.environ if environ is None else environ
    key = hashlib.sha256()
    for f in SOURCES + HEADERS:
        key.update(f.read_bytes())
    cxx = _compiler() or []
    key.update("\n".join([torch.__version__, torch.__file__, platform.machine(), *FLAGS,
                          *_vector_flags(), *cxx, _compiler_version(tuple(cxx))]).encode())
    base = Path(env.get("MDI_CACHE_DIR") or Path.home() / ".cache" / "mdi") / "ops"
    return base / f"decode_ops-{key.hexdigest()[:16]}.so"


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for
    every thread for a moment); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def build(path: Path) -> None:
    """Compile the kernels into `path` (written under another name, then renamed:
    processes building at once each write their own and the last rename wins)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as objs:
            objects = [Path(objs) / f"{src.stem}.o" for src in SOURCES]
            try:
                compile_, link = _build_commands(cxx, objects, Path(tmp))
                _run_all(compile_, " ".join(cxx))
            except RuntimeError as e:  # e.g. clang++ without OpenMP's headers
                log.warning("building with -fopenmp failed, building without (the kernels "
                            "then run on one thread each): %s", str(e)[-300:])
                compile_, link = _build_commands(cxx, objects, Path(tmp), openmp=False)
                _run_all(compile_, " ".join(cxx))
            _run_all([link], f"{' '.join(cxx)} (linking)")
        os.chmod(tmp, 0o755 & ~_umask())  # (mkstemp made it 0600: others sharing the cache load it)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ops():
    """torch.ops.mdi_fused once its library is loaded (built first if needed), or
    None where it cannot be (logged once) or MDI_FUSED_OPS=0. A cached build that
    does not load (torn, or another machine's) is built again once."""
    got = _state.get("ops", _UNSET)  # (once answered, no lock: every linear asks)
    if got is not _UNSET:
        return got
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _load()
        return _state["ops"]


@contextlib.contextmanager
def _build_lock(path: Path):
    """One build at a time on a machine (processes of a ring starting together wait
    for the first one's build instead of compiling alike); no lock where flock is
    missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _register_fakes() -> None:
    """The low-bit products' output shapes, for torch.compile and torch.export: a
    compiled step calls the same kernels as the eager one (csrc/lowbit_ops.cpp, rows_ops.cpp)."""
    def mm(x, w, *args, portable=False):
        return x.new_empty((x.shape[0], w.shape[0]))

    torch.library.register_fake("mdi_fused::int4_mm")(mm)
    torch.library.register_fake("mdi_fused::int8_mm")(mm)
    torch.library.register_fake("mdi_fused::bf16_mm")(mm)


def _load():
    if os.environ.get("MDI_FUSED_OPS", "1") == "0":
        log.info("fused decode kernels off (MDI_FUSED_OPS=0): torch's operations instead")
        return None
    try:
        path = library_path()
        torn = False
        if path.exists():
            try:
                torch.ops.load_library(str(path))
                _register_fakes()
                return torch.ops.mdi_fused
            except OSError as e:
                log.warning("the cached fused decode kernels do not load (%s): building them again", e)
                torn = True
        with _build_lock(path):
            if not path.exists() or torn:
                log.info("building the fused decode kernels (once, a few seconds): %s", path)
                build(path)
        torch.ops.load_library(str(path))  # (built by this process or one it waited for)
        _register_fakes()
        return torch.ops.mdi_fused
    except Exception as e:  # noqa: BLE001 - any failure: torch's operations, said once
        log.warning("fused decode kernels unavailable, torch's operations instead: %s", e)
        return None


def loaded() -> bool | None:
    """Whether this process computes with the kernels: None until ops() has answered
    (nothing is built here)."""
    return None if "ops" not in _state else _state["ops"] is not None


def for_lowbit(x: torch.Tensor):
    """The kernels for a product of activations x (csrc/lowbit_ops.cpp, rows_ops.cpp), or
    None: float32 or bfloat16 on the CPU, no autograd; also while torch.compile or
    torch.export traces (they have fake kernels: a compiled step computes as an
    eager one)."""
    if (x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return ops()
    return None


def for_forward(x: torch.Tensor):
    """The kernels for a forward on activations x, or None where they do not apply:
    float32 or bfloat16 on the CPU, no autograd, not traced by torch.compile or
    torch.export (one check per forward)."""
    if (x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return ops()
    return None
