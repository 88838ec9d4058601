#!/usr/bin/env bash
# The DeepSeek-V3 report's ablations at demo scale (docs/experiments.md): load balancing
# (auxiliary-loss-free bias vs none vs the sequence-wise loss alone) and MTP on vs off, each a
# `make demo` training run (bench/configs/v3-10m-train.json on the KJV Bible, 8 x 256 tokens per
# step, lr 2e-3) that differs in one option. STEPS (300) and SEEDS ("1 2") set the runs' length
# and repetitions; ONLY="name ..." keeps some runs; OUT (build/experiments) is where they go. Prints
# a markdown table and draws $OUT/{balance,mtp}.svg (seed 1); the runs stay in $OUT/<name>-s<seed>/.
# SET=precision runs the mixed-precision comparison instead (the linear layers' GEMMs in fp32, bf16
# and the report's FP8 recipe, and the FP8 ablations; draws $OUT/precision.svg):
#   SET=precision STEPS=900 OUT=build/experiments-precision scripts/experiments.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DSV3=${DSV3:-build/dsv3}
STEPS=${STEPS:-300}
SEEDS=${SEEDS:-1 2}
out=${OUT:-build/experiments}
mkdir -p "$out"

if [ ! -f "$out/data/data.json" ]; then
  mkdir -p "$out/tok"
  bible -f "Genesis1:1-Revelation22:21" 2>/dev/null | sed 's/^[0-9A-Za-z]*[0-9]*:[0-9]* //' > "$out/kjv.txt"
  $DSV3 tokenizer train --vocab-size 4096 --out "$out/tok/tokenizer.json" "$out/kjv.txt"
  $DSV3 prepare --tokenizer "$out/tok/tokenizer.json" --out "$out/data" --val-fraction 0.02 "$out/kjv.txt"
fi

# name | options that differ from the demo (which runs gamma 0.001, alpha 1e-4, lambda 0.3)
runs=(
  "v3-recipe|--bias-update-speed 0.001 --seq-aux-alpha 1e-4 --mtp-lambda 0.3"
  "bias-only|--bias-update-speed 0.001 --seq-aux-alpha 0 --mtp-lambda 0.3"
  "bias-0.01|--bias-update-speed 0.01 --seq-aux-alpha 1e-4 --mtp-lambda 0.3"
  "no-balance|--bias-update-speed 0 --seq-aux-alpha 0 --mtp-lambda 0.3"
  "seq-aux-1e-3|--bias-update-speed 0 --seq-aux-alpha 1e-3 --mtp-lambda 0.3"
  "seq-aux-1e-2|--bias-update-speed 0 --seq-aux-alpha 1e-2 --mtp-lambda 0.3"
  "no-mtp|--bias-update-speed 0.001 --seq-aux-alpha 1e-4 --mtp-lambda 0"
)
if [ "${SET:-ablations}" = precision ]; then
  runs=(
    "fp32|--precision fp32"
    "bf16|--precision bf16"
    "fp8|--precision fp8"
    "fp8-tensor|--precision fp8 --fp8-scaling tensor"
    "fp8-e5m2|--precision fp8 --fp8-grad e5m2"
    "fp8-no-promotion|--precision fp8 --fp8-accum-bits 14 --fp8-promotion off"
    "fp8-ue8m0|--precision fp8 --fp8-scale-format ue8m0"
  )
fi
if [ -n "${ONLY:-}" ]; then
  kept=(); for r in "${runs[@]}"; do [[ " $ONLY " == *" ${r%%|*} "* ]] && kept+=("$r"); done; runs=("${kept[@]}")
fi

field() { sed -n "s/.*\"$1\": \([-0-9.e]*\).*/\1/p"; }
for seed in $SEEDS; do
  for r in "${runs[@]}"; do
    name=${r%%|*}; opts=${r#*|}; dir="$out/$name-s$seed"
    if [ -f "$dir/step-$STEPS/trainer_state.json" ]; then continue; fi
    rm -rf "$dir"
    echo "== $name seed $seed: $opts" >&2
    # shellcheck disable=SC2086
    $DSV3 train --config bench/configs/v3-10m-train.json --data "$out/data" --out "$dir" --steps "$STEPS" \
      --batch 8 --seq 256 --lr 2e-3 --warmup 30 --eval-every 50 --save-every "$STEPS" --seed "$seed" \
      --no-progress $opts > "$dir.log" 2>&1 || { cat "$dir.log" >&2; exit 1; }
  done
done

echo "| run | seed | val loss | val MaxVio | MaxVio, mean of the last 50 steps (mean layer / worst layer) | main loss, last 50 steps |"
echo "|---|---|---|---|---|---|"
for r in "${runs[@]}"; do
  name=${r%%|*}
  for seed in $SEEDS; do
    m="$out/$name-s$seed/metrics.jsonl"
    last=$(grep '"val_loss"' "$m" | tail -1)
    tail50=$(tail -50 "$m")
    mv=$(echo "$tail50" | field max_vio | awk '{s+=$1} END {printf "%.2f", s/NR}')
    mw=$(echo "$tail50" | field max_vio_worst | awk '{s+=$1} END {printf "%.2f", s/NR}')
    ml=$(echo "$tail50" | field main_loss | awk '{s+=$1} END {printf "%.3f", s/NR}')
    printf '| %s | %s | %.3f | %.2f | %s / %s | %s |\n' "$name" "$seed" "$(echo "$last" | field val_loss)" \
      "$(echo "$last" | field val_max_vio)" "$mv" "$mw" "$ml"
  done
done

s1=$(echo "$SEEDS" | awk '{print $1}')
plot_runs() {
  local svg=$1; shift
  local args=()
  for n in "$@"; do [ -f "$out/$n-s$s1/metrics.jsonl" ] && args+=("$n=$out/$n-s$s1"); done
  [ ${#args[@]} -gt 0 ] && $DSV3 plot --out "$out/$svg" --from 25 "${args[@]}" >&2
}
if [ "${SET:-ablations}" = precision ]; then
  plot_runs precision.svg fp32 bf16 fp8 fp8-tensor fp8-e5m2 fp8-no-promotion fp8-ue8m0
  exit 0
fi
plot_runs balance.svg v3-recipe bias-only bias-0.01 no-balance seq-aux-1e-3 seq-aux-1e-2
plot_runs mtp.svg v3-recipe no-mtp
