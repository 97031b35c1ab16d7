"""`mdi serve` (one device) from SRC_DIR, then `mdi serve-bench --url` against it (the
tree's own, concurrency 1, REQ requests of N tokens); the server's context switches
(all threads) over the bench. usage: serve_runs.py SRC_DIR N REQ OUT [extra serve args]"""
import csv, json, os, socket, subprocess, sys, time, urllib.request
sys.path.insert(0, os.path.dirname(__file__))
from ctx import ctx

src, n, req, out, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
env = {**os.environ, "PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"}
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
url = f"http://127.0.0.1:{port}"
srv = subprocess.Popen([sys.executable, "-m", "mdi.cli.main", "serve", "--ckpt", "smollm2-135m-instruct",
                        "--port", str(port), "--model-name", "m", *extra],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
try:
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    c1 = ctx(srv.pid)
    subprocess.run([sys.executable, "-m", "mdi.cli.main", "serve-bench", "--url", url, "--model-name", "m",
                    "--concurrency", "1", "--requests", str(req), "--max-tokens", str(n),
                    "--prompt", "Once upon a time", "--out", out], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c2 = ctx(srv.pid)
finally:
    srv.terminate(); srv.wait(timeout=60)
row = next(csv.DictReader(open(next(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".csv")))))
tokens = int(row["tokens"])
print(json.dumps({"src": src, "load1": os.getloadavg()[0], "tokens": tokens,
                  "tokens_per_s": round(float(row["tokens_per_s"]), 2),
                  "itl_p50_ms": round(1000 * float(row["itl_p50_s"]), 2),
                  "ctxsw_per_token": round((c2[0] + c2[1] - c1[0] - c1[1]) / tokens, 1),
                  "voluntary_per_token": round((c2[0] - c1[0]) / tokens, 1), "threads": c2[2]}))
