#!/usr/bin/env bash
# make demo: what dsv3 does today on the embedded default model (bench/configs/v3-10m-train.json,
# a 10M-parameter DeepSeek-V3 layout with MLA, a dense first layer, grouped routed experts with a
# shared expert, and one MTP module), with random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
DSV3=${DSV3:-build/dsv3}
out=build/demo
rm -rf "$out" && mkdir -p "$out"

echo "== dsv3 init: a random DeepSeek-V3-layout checkpoint in the HuggingFace format (BF16 and FP8)"
$DSV3 init --config bench/configs/v3-10m-train.json --out "$out/v3-bf16" --dtype bf16 --seed 1
$DSV3 init --config bench/configs/v3-10m-train.json --out "$out/v3-fp8" --dtype fp8 --seed 1
ls -l "$out/v3-bf16" "$out/v3-fp8"

echo; echo "== dsv3 info"
$DSV3 info --model "$out/v3-fp8"

echo; echo "== dsv3 logits: prefill (plain MLA) vs decode through the latent KV cache (absorbed MLA)"
toks=0,17,301,42,7,1999,64,5
$DSV3 logits --model "$out/v3-bf16" --tokens $toks --out "$out/prefill.f32" --mtp-out "$out/mtp.f32"
$DSV3 logits --model "$out/v3-bf16" --tokens $toks --out "$out/decode.f32" --decode
if cmp -s "$out/prefill.f32" "$out/decode.f32"; then
  echo "prefill and decode logits: bit-identical"
else
  paste -d' ' <(od -An -f -v -w4 "$out/prefill.f32") <(od -An -f -v -w4 "$out/decode.f32") |
    awk '{d=$1-$2; if(d<0)d=-d; if(d>m)m=d; a=$1<0?-$1:$1; if(a>x)x=a}
         END {printf "prefill vs decode logits: max |diff| %.3g (max |logit| %.3g)\n", m, x}'
fi
echo "wrote $(stat -c %s "$out/prefill.f32") bytes of logits [8][4096] and $(stat -c %s "$out/mtp.f32") of MTP logits [7][4096]"

echo; echo "== dsv3 generate (greedy, ids)"
$DSV3 generate --model "$out/v3-fp8" --tokens $toks --max-new 16
