"""`mdi chat --compile`: seconds from launch to the first prompt (">>> ") and to the end
of the first answer (the next prompt; a greedy answer of at most 64 tokens to "hi"), on
an empty package cache (cold) and on the one the first start filled (cached).
Usage: python docs/bench/chat_compile_start.py REPO [CKPT] (REPO: the mdi checkout to run,
put on PYTHONPATH; CKPT: the bundled model of REPO unless given)."""
import os
import subprocess
import sys
import tempfile
import time

repo = os.path.abspath(sys.argv[1])
ckpt = sys.argv[2] if len(sys.argv) > 2 else f"{repo}/models/shakespeare-char"
env = {**os.environ, "PYTHONPATH": repo, "PYTHONUNBUFFERED": "1", "MDI_CACHE_DIR": tempfile.mkdtemp()}
env.pop("TORCHINDUCTOR_CACHE_DIR", None)
for run in ("cold", "cached"):
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "mdi.cli.main", "chat", "--ckpt", ckpt, "--compile",
                          "--temperature", "0", "--n-tokens", "64", "--dtype", "float32",
                          "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, cwd=repo)
    out, marks = b"", []
    while len(marks) < 2:
        c = p.stdout.read(1)
        if not c:
            break
        out += c
        if out.endswith(b">>> "):  # input()'s prompt, on stdout when stdin is no terminal
            marks.append(time.monotonic() - t0)
            if len(marks) == 1:
                p.stdin.write(b"hi\n")
                p.stdin.flush()
    p.stdin.close()
    p.wait()
    print(f"{run}: first prompt {marks[0]:.1f} s, first answer done {marks[1]:.1f} s "
          f"(the answer {marks[1] - marks[0]:.1f} s)")
