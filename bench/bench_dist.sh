#!/usr/bin/env bash
# Training on several processes (docs/distributed.md): tokens/s of the 10M-parameter model of
# bench/configs/v3-10m-train.json at batch 8 x 256 on 1 process and on 2 ranks (data parallel,
# expert parallel with and without overlap, FP8 / LogFMT-8 payloads), one OpenMP thread per rank on
# 2 ranks and two threads alone, and the traffic of 4 ranks (oversubscribed: counts, not speed) in
# nodes of 1 and 2 ranks. Tokens/s is the median of the steps after the first.
set -euo pipefail
cd "$(dirname "$0")/.."
DSV3=${DSV3:-build/dsv3}
out=build/bench-dist
if ! command -v mpirun >/dev/null 2>&1; then echo "bench_dist: skipped (mpirun not installed)"; exit 0; fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 \
  OMPI_MCA_btl_vader_single_copy_mechanism=none
mkdir -p "$out"
if [ ! -f "$out/data/data.json" ]; then
  bible -f "Genesis1:1-Revelation22:21" 2>/dev/null | sed 's/^[0-9A-Za-z]*[0-9]*:[0-9]* //' > "$out/kjv.txt"
  $DSV3 prepare --tokenizer bytes --out "$out/data" --val-fraction 0.02 "$out/kjv.txt" > /dev/null
fi
STEPS=${STEPS:-8}

# run NAME NP OPTIONS...: prints the median tokens/s and keeps the summary in $out/NAME.log
run() {
  local name=$1 np=$2; shift 2
  rm -rf "$out/$name"
  local launch=()
  [ "$np" -gt 1 ] && launch=(mpirun --oversubscribe -np "$np")
  "${launch[@]}" $DSV3 train --config bench/configs/v3-10m-train.json --data "$out/data" --out "$out/$name" \
    --steps "$STEPS" --batch 8 --seq 256 --eval-batches 0 --save-every "$STEPS" --no-progress "$@" > "$out/$name.log" 2>&1
  local tps
  tps=$(sed -n 's/.*"tokens_per_s": \([0-9.]*\).*/\1/p' "$out/$name/metrics.jsonl" | tail -n +2 | sort -n |
    awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')
  printf '%-44s %8.0f tokens/s\n' "$name ($np rank(s)) $*" "$tps"
}

echo "v3-10m-train, batch 8 x 256, $STEPS steps, $(nproc) cores"
run one 1
run dp2 2
run ep2 2 --expert-parallel 2
run ep2-no-overlap 2 --expert-parallel 2 --ep-overlap off
run ep2-fp8 2 --expert-parallel 2 --a2a-dtype fp8
run ep2-logfmt8 2 --expert-parallel 2 --a2a-dtype logfmt8
for n in dp2 ep2 ep2-no-overlap ep2-fp8 ep2-logfmt8; do
  echo "-- $n"; grep -E "ranks \(|expert parallel:" "$out/$n.log" | sed 's/^/   /'
done
echo "-- 4 ranks, expert parallel 4 (traffic; 4 processes share $(nproc) cores)"
for r in 1 2; do
  run "ep4-nodes-of-$r" 4 --expert-parallel 4 --ranks-per-node "$r" > /dev/null
  grep -E "^nodes of" "$out/ep4-nodes-of-$r.log" | sed 's/^/   /'
done
