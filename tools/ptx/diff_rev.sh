#!/usr/bin/env bash
# PTX of CUDA sources at a git revision against the working tree, entry by entry
# (compare_entries.py): a device-code refactor whose PTX is identical needs no device run.
#
#   tools/ptx/diff_rev.sh REV kernels/cuda/ssd.cu [more .cu files]     (from the repository root)
#
# nvcc flags as bazel/cuda.bzl's (sm_90a, -O3, C++20), without -lineinfo (line numbers would
# differ). Exit status 0 when every file's entries are identical (new entries allowed).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 REV FILE.cu..." >&2; exit 2; }
rev=$1; shift
root="$(git rev-parse --show-toplevel)"
cd "$root"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git archive "$rev" | tar -x -C "$tmp"   # the revision's tree, headers included
nv() { nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -ptx -I. "$1" -o "$2"; }
status=0
for f in "$@"; do
  name="$(echo "$f" | tr '/' '_')"
  if [ -f "$tmp/$f" ]; then (cd "$tmp" && nv "$f" "$tmp/$name.before.ptx"); else : > "$tmp/$name.before.ptx"; fi
  nv "$f" "$tmp/$name.after.ptx"
  echo "== $f ($rev -> working tree)"
  python3 "$root/tools/ptx/compare_entries.py" "$tmp/$name.before.ptx" "$tmp/$name.after.ptx" --show 12 || status=1
done
exit $status
