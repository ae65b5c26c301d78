// RoPE forward / backward; contract in rope.h. rope_kernel1: one thread per (row, head, pair i),
// reads both features of the pair before writing either (so in-place is safe).
#include "kernels/cuda/rope.h"

#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

__global__ void rope_kernel1(RopeArgs a, const float* cos_t, const float* sin_t,
                             int64_t max_positions, int64_t head_dim, float sign) {
  const int64_t half = head_dim / 2;
  const int64_t pairs = half + (head_dim % 2);  // odd D: one more thread for the passthrough
  const int64_t total = a.rows * a.heads * pairs;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t % pairs;
    const int64_t rh = t / pairs;
    const int64_t h = rh % a.heads;
    const int64_t r = rh / a.heads;
    const int64_t base = r * a.row_stride + h * head_dim;
    if (i == half) {  // odd D only
      a.y[base + head_dim - 1] = a.x[base + head_dim - 1];
      continue;
    }
    const int64_t p = a.positions ? a.positions[r % a.seq] : r % a.seq;
    float c, s;
    if (p >= 0 && p < max_positions) {
      c = cos_t[p * half + i];
      s = sign * sin_t[p * half + i];
    } else {
      c = s = __int_as_float(0x7fc00000);  // NaN: position outside the table
    }
    const float x1 = __bfloat162float(a.x[base + i]);
    const float x2 = __bfloat162float(a.x[base + i + half]);
    a.y[base + i] = __float2bfloat16_rn(x1 * c - x2 * s);
    a.y[base + i + half] = __float2bfloat16_rn(x2 * c + x1 * s);
  }
}

CudaResult Launch(const RopeTable& table, const RopeArgs& a, float sign, cudaStream_t stream) {
  if (!table.cos_sin || table.head_dim <= 0) return InvalidArgument("rope: table not built");
  const int64_t head_dim = table.head_dim;
  if (a.rows < 0 || a.heads <= 0 || a.seq <= 0 || !a.x || !a.y || a.row_stride < a.heads * head_dim) {
    return InvalidArgument("rope: bad shape or stride");
  }
  if (a.positions == nullptr && std::min(a.seq, a.rows) > table.max_positions) {
    return InvalidArgument("rope: sequence longer than the table");
  }
  if (a.rows == 0) return {};
  const int64_t half = head_dim / 2;
  const float* cos_t = table.cos_sin.as<float>();
  const float* sin_t = cos_t + table.max_positions * half;
  const int64_t total = a.rows * a.heads * (half + head_dim % 2);
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(CeilDiv(total, kThreads), 65535));
  rope_kernel1<<<grid, kThreads, 0, stream>>>(a, cos_t, sin_t, table.max_positions, head_dim, sign);
  CUDA_RETURN_IF_LAUNCH_ERROR("rope_kernel1");
  return {};
}

}  // namespace

CudaResult BuildRopeTable(int64_t max_positions, int64_t head_dim, double theta,
                          DeviceAllocator* alloc, RopeTable* out) {
  if (max_positions <= 0 || head_dim <= 1 || theta <= 0) {
    return InvalidArgument("BuildRopeTable: need max_positions > 0, head_dim > 1, theta > 0");
  }
  const int64_t half = head_dim / 2;
  std::vector<float> host(2 * max_positions * half);
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
      const double angle = static_cast<double>(p) * inv_freq;
      host[p * half + i] = static_cast<float>(std::cos(angle));
      host[max_positions * half + p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  CUDA_RETURN_IF_NOT_OK(alloc->Allocate(sizeof(float) * host.size(), &out->cos_sin));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(out->cos_sin.get(), host.data(), sizeof(float) * host.size(),
                                  cudaMemcpyHostToDevice));
  out->max_positions = max_positions;
  out->head_dim = head_dim;
  return {};
}

CudaResult RopeForward(const RopeTable& table, const RopeArgs& a, cudaStream_t stream) {
  return Launch(table, a, 1.f, stream);
}
CudaResult RopeBackward(const RopeTable& table, const RopeArgs& a, cudaStream_t stream) {
  return Launch(table, a, -1.f, stream);
}

}  // namespace gyre::cuda
