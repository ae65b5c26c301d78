// Rotary position embedding (RoPE), forward and backward, on bf16 rows of heads.
//
// Rotate-half pairing (feature i with i + D/2, as Llama in HF transformers and ops/attention.h):
//   angle(p, i) = p · theta^(-2i/D),  i < D/2
//   y[i]       = x[i] cos - x[i + D/2] sin
//   y[i + D/2] = x[i + D/2] cos + x[i] sin
// (odd D: the last feature passes through). The rotation is orthogonal, so backward is the
// inverse rotation of dy (angle -> -angle): dx = Rᵀ dy. Nothing is saved for backward but the
// positions. Outputs overwrite; in place (y == x) is allowed.
//
// Rows are [B·T] token rows; row r holds `heads` heads of D features starting at r·row_stride
// (row_stride >= heads·D lets q and k be views into a fused qkv buffer). Position of row r:
// positions[r % seq] when a device positions array [seq] is given, else r % seq.
//
// cos/sin come from a table computed on the host in float64 and stored as fp32
// [max_positions, D/2] each, so angles at long positions carry no fp32 argument error. A
// position outside the table writes NaN (loud, never a silent wrong rotation).
//
// Cost: 4 bytes per element (bf16 read + write) plus table reads (L2-resident): 16K tokens x
// 2048 features = 134 MB, ~0.04 ms.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

struct RopeTable {
  DeviceBuffer cos_sin;  // fp32 [2, max_positions, half]: cos then sin
  int64_t max_positions = 0;
  int64_t head_dim = 0;
};

CudaResult BuildRopeTable(int64_t max_positions, int64_t head_dim, double theta,
                          DeviceAllocator* alloc, RopeTable* out);

struct RopeArgs {
  const __nv_bfloat16* x = nullptr;
  __nv_bfloat16* y = nullptr;
  int64_t rows = 0, seq = 1, heads = 0;
  int64_t row_stride = 0;            // elements between rows of x and y
  const int32_t* positions = nullptr;  // device [seq] or null (position = r % seq)
};

CudaResult RopeForward(const RopeTable& table, const RopeArgs& args, cudaStream_t stream);
// args.x is dy, args.y is dx.
CudaResult RopeBackward(const RopeTable& table, const RopeArgs& args, cudaStream_t stream);

}  // namespace gyre::cuda
