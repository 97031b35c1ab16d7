#!/bin/bash
# Alternate the parent commit and this branch: `mdi serve` + `mdi serve-bench` (2 requests x 64
# tokens, concurrency 1) and `mdi chat` (2 turns x 64 tokens), SmolLM2-135M int4 (the shipped
# Q4_1 file), 2 torch threads. BASE: a copy of the parent (git archive 08afdf8 | tar -x -C $BASE);
# run from the branch's checkout. Extra arguments go to serve and chat.
PY=${PY:-python}
B=$(dirname "$0")
for round in $(seq 1 ${ROUNDS:-3}); do
  for src in "$BASE" "$PWD"; do
    rm -rf /tmp/o_s; echo "serve $(date +%T) $($PY $B/serve_runs.py $src 64 2 /tmp/o_s --threads 2 "$@")"
    echo "chat  $(date +%T) $($PY $B/chat_turns.py $src 64 2 --threads 2 "$@")"
  done
done
