#!/usr/bin/env bash
# Builds and runs the libFuzzer target for the JSON-line reader (dataloader/json_line_fuzz.cc)
# with clang-14, ASan and UBSan. Usage: tools/fuzz/run_jsonl_fuzz.sh [SECONDS] [extra libFuzzer flags]
# Seeds: SlimPajama/Pile-style lines written below; crashes land in $WORK/crashes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
secs="${1:-300}"
work="${GYRE_FUZZ_DIR:-/tmp/gyre_fuzz_jsonl}"
mkdir -p "$work/corpus" "$work/crashes"
bin="$work/json_line_fuzz"
clang++-14 -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root" "$root/dataloader/json_line_fuzz.cc" "$root/dataloader/json_line.cc" -lsimdjson -o "$bin"
seed() { printf '%s' "$2" > "$work/corpus/$1"; }
seed sp   '{"text":"caf\u00e9 http:\/\/x \ud809 \ud83d\ude00","meta":{"redpajama_set_name":"RedPajamaC4"}}'
seed pile '{"text": "na\u00efve \"q\" \\ \n", "meta": {"pile_set_name": "Pile-CC"}}'
seed fld  '{"meta":{"a":{"b":"src"}},"text":"x"}'
seed bad  '{"text":"\x'
cd "$work"
exec "$bin" corpus -max_total_time="$secs" -artifact_prefix="$work/crashes/" -print_final_stats=1 \
  -max_len=4096 "${@:2}"
