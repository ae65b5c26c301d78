// RoPE forward / backward; contract in rope.h.
//
// rope_kernel1: one block per token row (the position and the table row are looked up once);
// the block's threads stride over (head, pair i) with 32-bit index math. Each thread reads both
// features of its pair before writing either, so in place (y == x) is safe.
#include "kernels/cuda/rope.h"

#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/vec_util.cuh"

namespace gyre::cuda {
namespace {

__global__ void rope_kernel1(RopeArgs a, const float* cos_t, const float* sin_t,
                             int64_t max_positions, int head_dim, float sign) {
  const int64_t r = blockIdx.x;
  const int half = head_dim / 2;
  const int pairs = half + (head_dim % 2);  // odd D: one more slot for the passthrough
  const int work = static_cast<int>(a.heads) * pairs;
  const int64_t p = a.positions ? a.positions[r % a.seq] : r % a.seq;
  const bool in_table = p >= 0 && p < max_positions;
  const float* cos_row = cos_t + (in_table ? p : 0) * half;
  const float* sin_row = sin_t + (in_table ? p : 0) * half;
  const __nv_bfloat16* x = a.x + r * a.row_stride;
  __nv_bfloat16* y = a.y + r * a.row_stride;
  for (int j = threadIdx.x; j < work; j += blockDim.x) {
    const int h = j / pairs;
    const int i = j - h * pairs;
    const int base = h * head_dim;
    if (i == half) {  // odd D only
      y[base + head_dim - 1] = x[base + head_dim - 1];
      continue;
    }
    float c, s;
    if (in_table) {
      c = cos_row[i];
      s = sign * sin_row[i];
    } else {
      c = s = __int_as_float(0x7fc00000);  // NaN: position outside the table
    }
    const float x1 = __bfloat162float(x[base + i]);
    const float x2 = __bfloat162float(x[base + i + half]);
    y[base + i] = __float2bfloat16_rn(x1 * c - x2 * s);
    y[base + i + half] = __float2bfloat16_rn(x2 * c + x1 * s);
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
  const int64_t work = a.heads * (half + head_dim % 2);
  if (a.rows > 0x7fffffff || work > 0x7fffffff) return InvalidArgument("rope: too many rows or heads");
  const int threads = static_cast<int>(std::min<int64_t>(256, CeilDiv(work, 32) * 32));
  rope_kernel1<<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(
      a, cos_t, sin_t, table.max_positions, static_cast<int>(head_dim), sign);
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
