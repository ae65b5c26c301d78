// Token embedding forward (gather) and backward (deterministic scatter-add), bf16 table, fp32
// weight gradient.
//
//   forward   out [rows, d] = W [ids[r], :]           (bf16 copy; overwrites)
//   backward  dW [v, :] += Σ_{r : ids[r] = v} dy [r, :]   (fp32, accumulates)
//             or, with `overwrite`, dW [v, :] = that sum, and 0 for ids no row holds (the
//             deferred gradient zeroing of ops/module.h: no memset before, old dW never read)
//
// Determinism without atomics and without a device sort: the ids of a step come from the host
// (the data loader), so the host builds an EmbeddingBackwardPlan once per batch by counting sort
// (O(rows + vocab)): the distinct ids, and for each the rows that hold it in increasing order.
// The backward kernel gives each distinct id one block (per column slice), which sums its rows
// in that order in fp32 registers and adds the total to dW once: no two blocks touch the same
// element, and the summation order is fixed, so the bits are the same on every run.
//
// Out-of-range ids: the forward writes zeros for that row and counts it in *bad_ids (optional
// device counter); the plan builder rejects them on the host with an error.
//
// Cost: forward 2·d bytes read + 2·d written per row (+4 for the id); backward reads dy (2·d per
// row) and reads + writes 8·d per distinct id (overwrite: writes 4·d per vocabulary row, reads
// none). 16K tokens x d 2048: 134 MB fwd, ~0.04 ms.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"
#include "kernels/cuda/pinned_upload.h"

namespace gyre::cuda {

CudaResult EmbeddingForward(const int32_t* ids, const __nv_bfloat16* table, __nv_bfloat16* out,
                            int64_t rows, int64_t vocab, int64_t dim, int* bad_ids,
                            cudaStream_t stream);

class EmbeddingBackwardPlan {
 public:
  // Counting sort of host ids [rows] over [0, vocab); uploads the plan on `stream` (the host
  // copies live in the plan until it is destroyed or rebuilt). With `uploads` the four copies go
  // through its pinned staging buffers (no pageable copy: the training step's, ops/ CUDA
  // backend); without, pageable cudaMemcpyAsync.
  CudaResult Build(const int32_t* host_ids, int64_t rows, int64_t vocab, DeviceAllocator* alloc,
                   cudaStream_t stream, PinnedUploads* uploads = nullptr);
  int64_t rows() const { return rows_; }
  int64_t distinct() const { return static_cast<int64_t>(unique_.size()); }
  const int32_t* device_unique() const { return d_unique_.as<int32_t>(); }    // [distinct]
  const int32_t* device_offsets() const { return d_offsets_.as<int32_t>(); }  // [distinct + 1]
  const int32_t* device_rows() const { return d_rows_.as<int32_t>(); }        // [rows]
  int64_t vocab() const { return vocab_; }
  // Bit v % 32 of word v / 32 is set when some row holds id v.
  const uint32_t* device_seen() const { return d_seen_.as<uint32_t>(); }  // [ceil(vocab / 32)]

 private:
  int64_t rows_ = 0, vocab_ = 0;
  std::vector<int32_t> unique_, offsets_, sorted_rows_;
  std::vector<uint32_t> seen_;
  DeviceBuffer d_unique_, d_offsets_, d_rows_, d_seen_;
};

// dweight [plan.vocab(), dim]: accumulated, or overwritten (every row) with `overwrite`.
CudaResult EmbeddingBackward(const EmbeddingBackwardPlan& plan, const __nv_bfloat16* dy,
                             float* dweight, int64_t dim, bool overwrite, cudaStream_t stream);

}  // namespace gyre::cuda
