#!/usr/bin/env bash
# compare_entries.py: renamed registers / labels and other .reg bounds are the same kernel; a
# changed data flow (swapped operands), a changed instruction or a missing entry is not.
set -euo pipefail
tool="$(dirname "$0")/compare_entries.py"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
write() {  # write FILE BODY-OF-ENTRY-k [EXTRA-ENTRY]
  printf '.visible .entry k(\n){\n%s\n}\n%s' "$2" "${3:-}" > "$tmp/$1"
}
base='	.reg .b32 	%r<4>;
	add.s32 	%r1, %r2, %r3;
	mul.lo.s32 	%r2, %r1, %r3;
$L__BB0_1:
	bra.uni 	$L__BB0_1;'
write before.ptx "$base"
write renamed.ptx "$(echo "$base" | sed 's/%r1/%r9/g; s/%r<4>/%r<12>/; s/BB0_1/BB0_7/g')"
write swapped.ptx "$(echo "$base" | sed 's/mul.lo.s32 	%r2, %r1, %r3;/mul.lo.s32 	%r2, %r3, %r1;/')"
write changed.ptx "$(echo "$base" | sed 's/add.s32/sub.s32/')"
write extra.ptx "$base" $'.visible .entry k2(\n){\n\tret;\n}\n'
# An internal global's name carries a hash of the source path (the same file compiled elsewhere).
global='	st.global.u32 	[_ZN48_INTERNAL_43d0f910_17_f_cu_1923d6c74gyreANON7counterE], %r1;'
write global.ptx "$base
$global"
write global_moved.ptx "$base
${global/43d0f910/43648566}"
write global_other.ptx "$base
${global/7counterE/7tickets}"
expect() {  # expect STATUS AFTER.ptx
  local rc=0
  python3 "$tool" "$tmp/before.ptx" "$tmp/$2" > "$tmp/out" || rc=$?
  if [ "$rc" != "$1" ]; then echo "FAIL: $2 gave exit $rc, expected $1"; cat "$tmp/out"; exit 1; fi
  echo "ok: $2 -> $rc ($(head -1 "$tmp/out"))"
}
expect 0 renamed.ptx
expect 1 swapped.ptx
expect 1 changed.ptx
expect 0 extra.ptx
cp "$tmp/global.ptx" "$tmp/before.ptx"
expect 0 global_moved.ptx
expect 1 global_other.ptx
write before.ptx "$base"
# An entry that is gone fails too (before <- extra: k2 is missing).
rc=0; python3 "$tool" "$tmp/extra.ptx" "$tmp/before.ptx" > "$tmp/out" || rc=$?
[ "$rc" = 1 ] || { echo "FAIL: a gone entry gave exit $rc"; exit 1; }
echo "ok: gone entry -> 1"
