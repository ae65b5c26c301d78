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
  //bench:cuda_dense_bench //bench:slstm_bench
  //kernels/cuda:conv1d_gpu_test //bench:ssd_bench //bench:conv1d_bench
  //kernels/cuda:attention_gpu_test //bench:attention_bench
  //bench:mlstm_bench)
# (ssd_gpu_test, slstm_gpu_test and mlstm_gpu_test link OpenBLAS statically, ~30 MB each: carried on their own,
# see kernels/cuda/README.md.)

bazel build --config=bundle "${TARGETS[@]}"

rm -rf .bundle
mkdir -p .bundle/bin .bundle/lib
for t in "${TARGETS[@]}"; do
  path="bazel-bin/$(echo "${t#//}" | tr ':' '/')"
  install -m 0755 "$path" .bundle/bin/
done

# Shared libraries provided by the GPU machine (glibc, the driver, CUDA libraries, NCCL).
provided='^(linux-vdso|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|ld-linux|libgcc_s\.so|libstdc\+\+\.so|libcuda\.so|libnccl\.so|libcublas|libcublasLt)'
for bin in .bundle/bin/*; do
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
"$here/bin/conv1d_gpu_test" || rc=1
# Dense kernel timings; full table also in $OUT when the device tool provides it.
"$here/bin/cuda_dense_bench" ${OUT:+--csv="$OUT/cuda_dense_bench.csv"} || rc=1
# SSD / conv1d timings (anchors: bench/anchor_ssd.py with the copied mamba_ssm Triton files).
"$here/bin/ssd_bench" || rc=1
"$here/bin/conv1d_bench" || rc=1
# sLSTM persistent kernels (its GPU test links OpenBLAS, 30 MB: carried separately, README).
"$here/bin/slstm_bench" ${OUT:+--csv="$OUT/slstm_bench.csv"} || rc=1
"$here/bin/attention_gpu_test" || rc=1
"$here/bin/attention_bench" || rc=1
# mLSTM chunkwise timings (its test, mlstm_gpu_test, links OpenBLAS: carried alone, see
# kernels/cuda/README.md; its TFLA anchor is bench/anchor_mlstm.py).
"$here/bin/mlstm_bench" || rc=1
exit $rc
RUN
chmod +x .bundle/run.sh
du -sh .bundle
echo "bundle: $(ls .bundle/bin | tr '\n' ' ')| extra libs: $(ls .bundle/lib | tr '\n' ' ')"
