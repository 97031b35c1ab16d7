#!/bin/bash
# GOMP_SPINCOUNT vs OMP_WAIT_POLICY: mdi sample, SmolLM2 int4, 1 sequence, 64 tokens; quiet, then with 2 CPU hogs
MDI=${MDI:-mdi}  # the mdi command to time
one() {  # label, env...
  local label=$1; shift
  r=$(env "$@" $MDI sample --ckpt smollm2-135m-instruct --n-samples 1 --n-tokens 64 --temperature 0 --ignore-eos --json --prompt "The history of the city begins" 2>/dev/null | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print(d['decode_tokens_per_s'])")
  echo "$label $r"
}
variants() {
  for i in 1 2; do
    one default -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT
    one passive OMP_WAIT_POLICY=PASSIVE
    one spin100k GOMP_SPINCOUNT=100000
    one spin10k GOMP_SPINCOUNT=10000
    one spin1k GOMP_SPINCOUNT=1000
  done
}
echo "quiet $(cut -d' ' -f1 /proc/loadavg)"; variants
python3 -c "while True: pass" & H1=$!
python3 -c "while True: pass" & H2=$!
sleep 2
echo "two hogs $(cut -d' ' -f1 /proc/loadavg)"; variants
kill $H1 $H2
