#!/usr/bin/env bash
# The main job: set up, build, and run the most complete end-to-end path in the tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
echo "demo: today this builds Gyre and runs the host-side probe (gRPC + RocksDB);"
echo "demo: the training path (corpus -> prepare -> launch) replaces it as it lands."
bazel build //cli:gyre
./bazel-bin/cli/gyre help
if [ -x /usr/local/cuda-13.0/bin/nvcc ] || [ -x /usr/local/cuda/bin/nvcc ]; then
  bazel build --config=cuda //tools:gpu_probe
  ./bazel-bin/tools/gpu_probe --host-only
fi
