#!/usr/bin/env bash
# make demo: train a small DeepSeek-V3 on the King James Bible on this machine's cores, then
# generate from it. The model is bench/configs/v3-10m-train.json: MLA, a dense first layer, MoE
# with a shared expert and 16 routed experts in 4 groups (top-4 of 2 kept groups), one MTP module,
# auxiliary-loss-free balancing. STEPS (default 300, about 3 minutes on 2 cores) sets the length.
set -euo pipefail
cd "$(dirname "$0")/.."
DSV3=${DSV3:-build/dsv3}
STEPS=${STEPS:-300}
out=build/demo
rm -rf "$out" && mkdir -p "$out/tok"

echo "== corpus: the King James Bible (Debian's bible-kjv), verse references stripped"
bible -f "Genesis1:1-Revelation22:21" 2>/dev/null | sed 's/^[0-9A-Za-z]*[0-9]*:[0-9]* //' > "$out/kjv.txt"
wc -c "$out/kjv.txt"

echo; echo "== dsv3 tokenizer train: a 4096-token byte-level BPE under the DeepSeek-V3 pre-tokenizer"
$DSV3 tokenizer train --vocab-size 4096 --out "$out/tok/tokenizer.json" "$out/kjv.txt"

echo; echo "== dsv3 prepare: train/val token shards (2% held out)"
$DSV3 prepare --tokenizer "$out/tok/tokenizer.json" --out "$out/data" --val-fraction 0.02 "$out/kjv.txt"

echo; echo "== dsv3 train: $STEPS steps of 8 x 256 tokens"
$DSV3 train --config bench/configs/v3-10m-train.json --data "$out/data" --out "$out/run" --steps "$STEPS" \
  --batch 8 --seq 256 --lr 2e-3 --warmup 30 --eval-every 100 --save-every "$STEPS" --seed 1
first=$(head -1 "$out/run/metrics.jsonl" | sed 's/.*"val_loss": \([0-9.]*\).*/\1/')
last=$(grep val_loss "$out/run/metrics.jsonl" | tail -1 | sed 's/.*"val_loss": \([0-9.]*\).*/\1/')
vio=$(tail -1 "$out/run/metrics.jsonl" | sed 's/.*"max_vio": \([0-9.]*\).*/\1/')
echo "validation loss: $first before training, $last after $STEPS steps (MaxVio_batch of the last step: $vio)"
echo "metrics: $out/run/metrics.jsonl, curves: $out/run/metrics.svg"

echo; echo "== dsv3 generate from the trained checkpoint (prompt: \"And God said\")"
$DSV3 generate --model "$out/run/step-$STEPS" --prompt "And God said" --max-new 60 --temperature 0.7 --top-k 40 --seed 1
