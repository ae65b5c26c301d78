#!/usr/bin/env bash
# Sets up the machine and runs every test: `bash tools/test.sh`.
#  1. tools/setup.sh (Debian + npm packages; idempotent)
#  2. bazel build //...                  (CPU build, everything)
#  3. bazel build --config=cuda //...    (CUDA kernels and GPU test binaries compile; they run
#                                         only on the GPU machine) — when nvcc is present
#  4. bazel test //...                   (all CPU tests)
# Ends with one summary line "Tests: N passed, N failed".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)

bash tools/setup.sh || { echo "Tests: 0 passed, 1 failed (setup)"; exit 1; }

# Optional per-machine Bazel flags (e.g. a different disk cache) go in user.bazelrc.
bazel build //... || { echo "Tests: 0 passed, 1 failed (build)"; exit 1; }

if [ -x /usr/local/cuda-13.0/bin/nvcc ] || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_PATH:-}" ]; then
  bazel build --config=cuda //... || { echo "Tests: 0 passed, 1 failed (CUDA build)"; exit 1; }
  echo "CUDA build: ok (GPU tests compiled; they run on the GPU machine, see README)"
else
  echo "CUDA build: skipped (no CUDA toolkit on this machine)"
fi

log=$(mktemp)
bazel test --test_summary=short //... 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# Bazel's terse summary lines: "//pkg:target   PASSED in 1.2s" / "FAILED" / "TIMEOUT" / "NO STATUS".
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log" || true)
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|NO STATUS|INCOMPLETE|FLAKY)' "$log" || true)
skipped=$(grep -cE '^//[^ ]+ +SKIPPED' "$log" || true)
rm -f "$log"
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi  # build error before any test ran
echo "Elapsed: $(( $(date +%s) - start )) s"
echo "Tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
exit "$rc"
