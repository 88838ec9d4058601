#!/bin/bash
# Installs the official OpenAI client (npm package openai) into build/node_openai/node_modules,
# once; prints the node_modules directory. Exit 77 when node or npm is not installed at all (the
# callers skip then); any other failure (no network, a broken install) is an error. A prefix of its
# own: an npm install into the tokenizer reference's prefix would prune that one's packages.
set -u
prefix=${1:-build/node_openai}
mods="$prefix/node_modules"
marker="$mods/openai/package.json"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "node/npm not installed (make deps installs them)" >&2
    exit 77
fi
if [ ! -f "$marker" ]; then
    mkdir -p "$prefix"
    if ! npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$prefix" openai@6 \
        >"$prefix/npm-install.log" 2>&1; then
        echo "npm install openai failed: $(tail -n 3 "$prefix/npm-install.log" | tr '\n' ' ')" >&2
        exit 1
    fi
fi
[ -f "$marker" ] || { echo "$marker missing after npm install" >&2; exit 1; }
echo "$mods"
