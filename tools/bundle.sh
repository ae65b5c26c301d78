#!/usr/bin/env bash
# Builds the self-contained GPU bundle in .bundle/ (git-ignored): worker-side programs linked
# statically against gRPC, protobuf, abseil, RocksDB, OpenBLAS (Debian's .a archives), the CUDA
# runtime static; NCCL and cuBLAS come from the GPU machine at run time (TOOLCHAIN.md §3).
# Any other shared library a binary needs that the GPU machine lacks is copied to .bundle/lib.
#
#   bash tools/bundle.sh                       # build .bundle/
#   # then, with the device tool (carry .bundle):
#   #   run(command=".bundle/run.sh", carry=[".bundle"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Binaries that travel; later parts add their worker-side programs here.
TARGETS=(//tools:gpu_probe //kernels/cuda:device_info_gpu_test //worker:nccl_collective_gpu_test
  //kernels/cuda:device_allocator_gpu_test //kernels/cuda:gemm_gpu_test
  //kernels/cuda:norm_gpu_test //kernels/cuda:pointwise_gpu_test
  //kernels/cuda:cross_entropy_gpu_test //kernels/cuda:adamw_gpu_test
  //bench:cuda_dense_bench)

# Programs that link OpenBLAS statically (~33 MB each) travel xz-compressed (~3 MB) so the bundle
# stays under the 64 MiB carry limit; run.sh unpacks them with python3's lzma.
XZ_TARGETS=(//ops:llama_gpu_test //bench:llama_step_bench)

bazel build --config=bundle "${TARGETS[@]}" "${XZ_TARGETS[@]}"

rm -rf .bundle
mkdir -p .bundle/bin .bundle/lib
for t in "${TARGETS[@]}"; do
  path="bazel-bin/$(echo "${t#//}" | tr ':' '/')"
  install -m 0755 "$path" .bundle/bin/
done
for t in "${XZ_TARGETS[@]}"; do
  path="bazel-bin/$(echo "${t#//}" | tr ':' '/')"
  xz -T2 -6 -c "$path" > ".bundle/bin/$(basename "$path").xz"
done

# Shared libraries provided by the GPU machine (glibc, the driver, CUDA libraries, NCCL).
provided='^(linux-vdso|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|ld-linux|libgcc_s\.so|libstdc\+\+\.so|libcuda\.so|libnccl\.so|libcublas|libcublasLt)'
for bin in .bundle/bin/*; do
  [[ "$bin" == *.xz ]] && continue
  ldd "$bin" | awk '/=>/ {print $1, $3}' | while read -r name path; do
    if ! [[ "$name" =~ $provided ]] && [ -f "$path" ] && [ ! -f ".bundle/lib/$name" ]; then
      cp -L "$path" ".bundle/lib/$name"
    fi
  done
done

cat > .bundle/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine from the repository root: probe first, then the GPU tests.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on shared hosts (device KINDS.md)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 - "$here/bin" <<'PY'
import glob, lzma, os, sys
for f in glob.glob(os.path.join(sys.argv[1], "*.xz")):
    with lzma.open(f) as src, open(f[:-3], "wb") as dst:
        dst.write(src.read())
    os.chmod(f[:-3], 0o755)
PY
rc=0
"$here/bin/gpu_probe" || rc=1
"$here/bin/device_info_gpu_test" || rc=1
"$here/bin/nccl_collective_gpu_test" || rc=1
"$here/bin/device_allocator_gpu_test" || rc=1
"$here/bin/gemm_gpu_test" || rc=1
"$here/bin/norm_gpu_test" || rc=1
"$here/bin/pointwise_gpu_test" || rc=1
"$here/bin/cross_entropy_gpu_test" || rc=1
"$here/bin/adamw_gpu_test" || rc=1
# ops/ CUDA backend: the Llama model on the GPU against the CPU in float64, then its step bench.
"$here/bin/llama_gpu_test" || rc=1
"$here/bin/llama_step_bench" || rc=1
# Dense kernel timings; full table also in $OUT when the device tool provides it.
"$here/bin/cuda_dense_bench" ${OUT:+--csv="$OUT/cuda_dense_bench.csv"} || rc=1
exit $rc
RUN
chmod +x .bundle/run.sh
du -sh .bundle
echo "bundle: $(ls .bundle/bin | tr '\n' ' ')| extra libs: $(ls .bundle/lib | tr '\n' ' ')"
