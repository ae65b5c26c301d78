#!/usr/bin/env bash
# Builds the self-contained GPU bundle in .bundle/ (git-ignored): worker-side programs linked
# statically against gRPC, protobuf, abseil, RocksDB, OpenBLAS (Debian's .a archives), the CUDA
# runtime static; NCCL and cuBLAS come from the GPU machine at run time (TOOLCHAIN.md §3).
# Any other shared library a binary needs that the GPU machine lacks is copied to .bundle/lib.
#
#   bash tools/bundle.sh                       # build .bundle/
#   # then, with the device tool (carry .bundle):
#   #   run(command="bash .bundle/run.sh [tests|bench|all]", carry=[".bundle"])
#
# Public anchors (mamba_ssm Triton SSD, mlstm_kernels TFLA, the xlstm sLSTM CUDA kernel) are never
# committed: fetch them into an ignored folder and run bench/anchor_*.py beside the benches in the
# same device call (kernels/cuda/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# GPU tests: each checks its kernels against a float64 reference and exits non-zero on failure.
TESTS=(//tools:gpu_probe //kernels/cuda:device_info_gpu_test //worker:nccl_collective_gpu_test
  //kernels/cuda:device_allocator_gpu_test //kernels/cuda:gemm_gpu_test
  //kernels/cuda:norm_gpu_test //kernels/cuda:pointwise_gpu_test
  //kernels/cuda:cross_entropy_gpu_test //kernels/cuda:adamw_gpu_test
  //kernels/cuda:conv1d_gpu_test //kernels/cuda:attention_gpu_test)
# Tests that link OpenBLAS statically for the CPU float64 references (~30 MB each).
XZ_TESTS=(//kernels/cuda:ops_parity_gpu_test //kernels/cuda:ssd_gpu_test
  //kernels/cuda:slstm_gpu_test //kernels/cuda:mlstm_gpu_test //ops:llama_gpu_test
  //ops:recurrent_gpu_test //ops:decode_gpu_test //kernels/cuda:ssm_step_gpu_test
  //worker:replica_gpu_test //ops:xlstm_large_gpu_test)
# Benchmarks (timings; anchors run beside them from bench/*anchor*.py).
BENCHES=(//bench:cuda_dense_bench //bench:attention_bench //bench:ssd_bench //bench:conv1d_bench
  //bench:slstm_bench //bench:mlstm_bench)
XZ_BENCHES=(//bench:llama_step_bench //bench:recurrent_step_bench)
# Programs (not run by run.sh's test/bench loops): the multi-call `gyre` binary (OpenBLAS-linked)
# for GPU-worker runs: tests/e2e/gpu_run_test.sh .bundle/bin/gyre <index dir> <out dir>; generate_bench
# (greedy vs MTP speculative decoding on a briefly trained model: eval/generate_bench.cc).
PROGRAMS=(//cli:gyre //cli:gyrectl //eval:generate_bench)
# Every binary travels xz-compressed (statically linked, 2-30 MB each; 3-10x smaller) so the
# bundle stays under the device tool's 64 MiB carry limit; run.sh unpacks them with python3's lzma.

# `bash tools/bundle.sh NAME...` keeps only the named binaries (e.g. llama_gpu_test gyre): the
# whole set no longer fits the device tool's 64 MiB carry limit.
if [ $# -gt 0 ]; then
  keep() { local out=() t; for t in "$@"; do [[ " ${WANT[*]} " == *" ${t##*:} "* ]] && out+=("$t"); done; echo "${out[@]}"; }
  WANT=("$@")
  read -r -a TESTS <<< "$(keep "${TESTS[@]}")"; read -r -a XZ_TESTS <<< "$(keep "${XZ_TESTS[@]}")"
  read -r -a BENCHES <<< "$(keep "${BENCHES[@]}")"; read -r -a XZ_BENCHES <<< "$(keep "${XZ_BENCHES[@]}")"
  read -r -a PROGRAMS <<< "$(keep "${PROGRAMS[@]}")"
fi
bazel build --config=bundle "${TESTS[@]}" "${XZ_TESTS[@]}" "${BENCHES[@]}" "${XZ_BENCHES[@]}" "${PROGRAMS[@]}"

rm -rf .bundle
mkdir -p .bundle/bin .bundle/lib
bin_path() { echo "bazel-bin/$(echo "${1#//}" | tr ':' '/')"; }
for t in "${TESTS[@]}" "${XZ_TESTS[@]}" "${BENCHES[@]}" "${XZ_BENCHES[@]}" "${PROGRAMS[@]}"; do
  path="$(bin_path "$t")"
  xz -T2 -6 -c "$path" > ".bundle/bin/$(basename "$path").xz"
done

# Shared libraries provided by the GPU machine (glibc, the driver, CUDA libraries, NCCL).
provided='^(linux-vdso|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|ld-linux|libgcc_s\.so|libstdc\+\+\.so|libcuda\.so|libnccl\.so|libcublas|libcublasLt)'
for bin in .bundle/bin/*; do
  [[ "$bin" == *.xz ]] || continue
  xz -dc "$bin" > /tmp/gyre_bundle_ldd && chmod +x /tmp/gyre_bundle_ldd
  ldd /tmp/gyre_bundle_ldd | awk '/=>/ {print $1, $3}' | while read -r name path; do
    if ! [[ "$name" =~ $provided ]] && [ -f "$path" ] && [ ! -f ".bundle/lib/$name" ]; then
      cp -L "$path" ".bundle/lib/$name"
    fi
  done
done

names() { for t in "$@"; do basename "$(bin_path "$t")"; done | tr '\n' ' '; }
cat > .bundle/run.sh <<RUN
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: probe and GPU tests, then the benchmarks.
#   bash .bundle/run.sh [tests|bench|all]     (default all; logs also under \$OUT when set)
set -uo pipefail
here="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)"
what="\${1:-all}"
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts (device KINDS.md)
export LD_LIBRARY_PATH="\$here/lib:\${LD_LIBRARY_PATH:-}"  # libraries the GPU machine lacks (gyre: gloo, ssl, ...)
[ -n "\${OUT:-}" ] && exec > >(tee "\$OUT/bundle_run.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 - "\$here/bin" <<'PY'
import glob, lzma, os, sys
for f in glob.glob(os.path.join(sys.argv[1], "*.xz")):
    with lzma.open(f) as src, open(f[:-3], "wb") as dst:
        dst.write(src.read())
    os.chmod(f[:-3], 0o755)
PY
rc=0; failed=""
run() { echo "=== \$*"; "\$here/bin/\$@" || { rc=1; failed="\$failed \$1"; }; }
if [ "\$what" != bench ]; then
  for t in $(names "${TESTS[@]}" "${XZ_TESTS[@]}"); do run "\$t"; done
fi
if [ "\$what" != tests ]; then
  for b in $(names "${BENCHES[@]}" "${XZ_BENCHES[@]}"); do
    run "\$b"
  done
fi
echo "bundle run: \${failed:-no failures}"
exit \$rc
RUN
chmod +x .bundle/run.sh
du -sh .bundle
if [ "$(du -sm .bundle | cut -f1)" -gt 62 ]; then
  echo "WARNING: .bundle is over the device tool's 64 MiB carry limit: name the binaries to keep" >&2
fi
echo "bundle: $(ls .bundle/bin | tr '\n' ' ')| extra libs: $(ls .bundle/lib | tr '\n' ' ')"
