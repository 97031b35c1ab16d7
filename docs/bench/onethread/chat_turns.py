"""Drive `mdi chat` (one device) through pipes: TURNS turns of N tokens (--ignore-eos),
timing each answer from its first output to its end and counting the process's context
switches (all threads) over the same span.
usage: chat_turns.py SRC_DIR N TURNS [extra mdi chat args]"""
import json, os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(__file__))
from ctx import ctx

src, n, turns, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
env = {**os.environ, "PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"}
p = subprocess.Popen([sys.executable, "-m", "mdi.cli.main", "chat", "--ckpt", "smollm2-135m-instruct",
                      "--temperature", "0", "--n-tokens", str(n), "--ignore-eos", *extra],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
fd = p.stdout.fileno()
buf = b""

def until(marker: bytes) -> None:
    global buf
    while marker not in buf:
        d = os.read(fd, 65536)
        if not d:
            raise SystemExit(f"chat exited: {buf[-500:]!r}")
        buf += d
    buf = buf[buf.index(marker) + len(marker):]

until(b">>> ")
out = []
for i in range(turns):
    p.stdin.write(f"Tell me a long story about a dragon, part {i + 1}.\n".encode())
    p.stdin.flush()
    d = os.read(fd, 65536)
    t1, c1 = time.perf_counter(), ctx(p.pid)
    buf = d
    until(b"\n>>> ")
    t2, c2 = time.perf_counter(), ctx(p.pid)
    out.append({"tokens_per_s": round((n - 1) / (t2 - t1), 2),
                "ctxsw_per_token": round((c2[0] + c2[1] - c1[0] - c1[1]) / (n - 1), 1),
                "voluntary_per_token": round((c2[0] - c1[0]) / (n - 1), 1), "threads": c2[2]})
p.stdin.close()
p.wait(timeout=60)
print(json.dumps({"src": src, "load1": os.getloadavg()[0], "turns": out}))
