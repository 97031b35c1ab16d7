#!/bin/bash
# mdi serve --compile: seconds from launch until /health answers, then the first request's
# seconds (a greedy completion of 16 tokens), on an empty package cache and on the one the
# first start filled. Usage: serve_compile_start.sh CKPT MAX_SEQS [PORT]; MDI: the mdi command.
set -u
MDI=${MDI:-mdi}
CKPT=$1; SEQS=$2; PORT=${3:-8765}
CACHE=$(mktemp -d)
one() {  # label
  local t0 pid ready first
  t0=$(date +%s.%N)
  MDI_CACHE_DIR=$CACHE $MDI serve --ckpt "$CKPT" --compile --max-seqs "$SEQS" --dtype float32 \
    --threads 2 --port "$PORT" >"$CACHE/$1.log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "$1: mdi serve exited"; tail "$CACHE/$1.log"; return 1; }
    sleep 0.2
  done
  ready=$(echo "$(date +%s.%N) - $t0" | bc)
  first=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$PORT/v1/completions" \
    -H 'Content-Type: application/json' \
    -d '{"model": "m", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0}')
  kill -TERM $pid; wait $pid
  echo "$1: ready after $ready s, first request $first s," \
    "$(grep -c ': building$' "$CACHE/$1.log") built, $(grep -c 'loaded from cache' "$CACHE/$1.log") loaded"
  grep -E -- '--compile: .*(built in|loaded from cache|ready in)' "$CACHE/$1.log" | sed 's/^/  /'
}
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
one cold
one cached
rm -rf "$CACHE"
