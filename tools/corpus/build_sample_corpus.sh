#!/usr/bin/env bash
# Builds the sample corpus (SlimPajama and Pile formats) from Debian/npm text; see
# build_sample_corpus.py for the layout. Cached: a second run returns at once.
#   tools/corpus/build_sample_corpus.sh [OUT_DIR]        (default: data/corpus)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/data/corpus}"
exec python3 "$here/build_sample_corpus.py" --out "$out" "${@:2}"
