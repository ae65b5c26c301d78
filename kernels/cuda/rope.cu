// RoPE forward / backward; contract in rope.h.
//
// rope_kernel1: one block per token row (the position and the table row are looked up once);
// the block's threads stride over (head, pair i) with 32-bit index math. Each thread reads both
// features of its pair before writing either, so in place (y == x) is safe. Scalar 2-byte
// accesses: the fallback for odd head sizes, strides or alignments.
// rope_kernel2: the vector path (D % 16 == 0, row stride % 8 == 0, 16-byte-aligned x and y). One
// thread per (row, head, 8 consecutive pairs): two 16-byte bf16 loads (x[i..i+8), x[i+D/2..))
// and two 16-byte stores, cos/sin as float4s from the fp32 table (L1/L2-resident). A flat grid
// over rows x heads x D/16 keeps every block full whatever the head count (q and k of a fused
// qkv row are rotated in one launch, heads = H + Hk). Measured cause of the old kernel's ~2.5x
// gap to the 4 B/element floor: 2-byte accesses (64 B per warp instruction).
#include "kernels/cuda/rope.h"

#include <algorithm>
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

__global__ void rope_kernel2(RopeArgs a, const float* cos_t, const float* sin_t,
                             int64_t max_positions, int head_dim, int64_t items, float sign) {
  const int half = head_dim / 2;
  const int vecs_per_head = half / 8;
  const int64_t vecs_per_row = a.heads * vecs_per_head;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = item / vecs_per_row;
    const int j = static_cast<int>(item - r * vecs_per_row);
    const int h = j / vecs_per_head;
    const int i = (j - h * vecs_per_head) * 8;
    const int64_t p = a.positions ? a.positions[r % a.seq] : r % a.seq;
    const bool in_table = p >= 0 && p < max_positions;
    const int64_t off = r * a.row_stride + static_cast<int64_t>(h) * head_dim + i;
    float x1[8], x2[8], c[8], s[8];
    LoadBf16<8>(a.x + off, x1);
    LoadBf16<8>(a.x + off + half, x2);
    if (in_table) {
      const float4* cr = reinterpret_cast<const float4*>(cos_t + p * half + i);
      const float4* sr = reinterpret_cast<const float4*>(sin_t + p * half + i);
      const float4 c0 = __ldg(cr), c1 = __ldg(cr + 1), s0 = __ldg(sr), s1 = __ldg(sr + 1);
      c[0] = c0.x; c[1] = c0.y; c[2] = c0.z; c[3] = c0.w; c[4] = c1.x; c[5] = c1.y; c[6] = c1.z; c[7] = c1.w;
      s[0] = s0.x; s[1] = s0.y; s[2] = s0.z; s[3] = s0.w; s[4] = s1.x; s[5] = s1.y; s[6] = s1.z; s[7] = s1.w;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) c[k] = s[k] = __int_as_float(0x7fc00000);  // NaN: outside the table
    }
    float y1[8], y2[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float sk = sign * s[k];
      y1[k] = x1[k] * c[k] - x2[k] * sk;
      y2[k] = x2[k] * c[k] + x1[k] * sk;
    }
    StoreBf16<8>(a.y + off, y1);
    StoreBf16<8>(a.y + off + half, y2);
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
  // The table rows are 16-byte aligned when half % 4 == 0 (cudaMalloc'd base; the sin half
  // starts max_positions * half floats in).
  if (head_dim % 16 == 0 && a.row_stride % 8 == 0 && Aligned16(a.x) && Aligned16(a.y) &&
      Aligned16(sin_t) && a.rows * a.heads * (head_dim / 16) < (int64_t{1} << 40)) {
    const int64_t items = a.rows * a.heads * (head_dim / 16);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(CeilDiv(items, threads), int64_t{1} << 20);
    rope_kernel2<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        a, cos_t, sin_t, table.max_positions, static_cast<int>(head_dim), items, sign);
    CUDA_RETURN_IF_LAUNCH_ERROR("rope_kernel2");
    return {};
  }
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
  // The table must be complete on the device when this returns, for every stream. A plain
  // cudaMemcpy from pageable memory does not promise that: it returns once the host buffer is
  // staged, with the last DMA to the device possibly still in flight on the legacy default
  // stream (CUDA runtime API, "API synchronization behavior"), and the backend's stream is
  // created cudaStreamNonBlocking, so its next kernel (the first RoPE of a training step) does
  // not wait for that DMA and could read the table's tail before it landed. So: the copy on the
  // legacy stream, then that stream synchronised (one table per head size and theta per process).
  // Helper det22 (session 22) suspected this for llama-1.3b's moving first-step loss; the old copy
  // never lost the race in its test (H100, driver 580.159.04), so this is hardening, not that fix.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->cos_sin.get(), host.data(), sizeof(float) * host.size(),
                                       cudaMemcpyHostToDevice, cudaStreamLegacy));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(cudaStreamLegacy));
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
