#!/usr/bin/env bash
# Rebuilds tools/golden/corpus.jsonl.zst, the text the tokenizer golden test encodes with both
# Hugging Face (npm tokenizers) and Gyre. Needs apt-get (download only) and tools/node_modules.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$("$here/fetch_sources.sh")"
tmp="$(mktemp)"
python3 "$here/make_corpus.py" "$root" "$here/../node_modules" "$tmp"
zstd -19 -q -f "$tmp" -o "$here/corpus.jsonl.zst"
rm -f "$tmp"
ls -l "$here/corpus.jsonl.zst"
