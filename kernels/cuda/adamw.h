// Fused multi-tensor AdamW with global gradient-norm clipping, writing the bf16 compute copy of
// the weights in the same pass. fp32 master weights, gradients and moments.
//
// One Step is three launches over a chunk table built once at Init (every tensor cut into
// 64K-element chunks; one block per chunk), with no host synchronisation:
//   1. adamw_norm_kernel1: per-chunk Σ g² (fp32 per thread, double per block) -> partials
//   2. adamw_clip_kernel1: one block sums the partials in chunk order (deterministic) ->
//      ||g||, clip scale = max_norm / ||g|| if max_norm > 0 and ||g|| > max_norm, else 1
//   3. adamw_update_kernel1: for every element, with g = scale · grad (PyTorch semantics, as
//      ops/adamw.h):
//        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g²
//        p <- p (1 - lr·wd)  [decayed tensors only]
//        p <- p - lr · (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//        compute <- bf16(p)
// The gradients are read, never rescaled in memory (ops/grad_clip.h rescales them on the CPU;
// the update is the same). A non-finite ||g|| skips the update on the device (weights, moments
// and the bf16 copy keep their values), matching the CPU step that refuses such an update; the
// caller reads grad_norm after the step and then calls UndoStep() so t stays the count of
// applied updates.
//
// Cost per element: read p, g, m, v (16 bytes) + write p, m, v (12) + bf16 copy (2) = 30 bytes,
// plus 4 for the norm pass: 34 bytes. llama-1.3b (1.41e9 params): 48 GB, ~14.5 ms at 3.3 TB/s;
// llama-125m (0.16e9): 5.4 GB, ~1.6 ms.
//
// Thread-safety: one FusedAdamW per parameter set, used from one thread/stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

struct AdamWTensor {
  float* master = nullptr;           // [numel] fp32 weights (updated in place)
  const float* grad = nullptr;       // [numel] fp32 gradients (read only)
  float* m = nullptr;                // [numel] first moment
  float* v = nullptr;                // [numel] second moment
  __nv_bfloat16* compute = nullptr;  // [numel] bf16 copy written each step, or null
  int64_t numel = 0;
  bool decay = true;                 // weight decay applies (ParamKind::kWeight)
};

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-5;
  double weight_decay = 0.1;
};

// Device-side result of the last step.
struct AdamWStepState {
  double grad_norm;  // ||g|| before clipping
  float clip_scale;  // applied scale (1 if not clipped)
  int skipped;       // 1 if ||g|| was not finite and the update was skipped
};

class FusedAdamW {
 public:
  // Uploads the tensor and chunk tables (the pointers must stay valid while this object is used).
  CudaResult Init(const std::vector<AdamWTensor>& tensors, const AdamWHyper& hyper,
                  DeviceAllocator* alloc, cudaStream_t stream);
  // One step at learning rate lr; max_grad_norm <= 0 disables clipping. Increments t.
  CudaResult Step(double lr, double max_grad_norm, cudaStream_t stream);
  void UndoStep() { --t_; }
  void SetStepsTaken(int64_t t) { t_ = t; }  // a restored optimizer state's step count
  int64_t steps_taken() const { return t_; }
  // Valid on the device after Step's work has run (copy it after a stream sync or event).
  const AdamWStepState* device_state() const { return state_.as<AdamWStepState>(); }
  int64_t chunks() const { return chunks_; }

 private:
  AdamWHyper hyper_;
  int64_t t_ = 0;
  int64_t chunks_ = 0;
  DeviceBuffer tensors_;   // AdamWTensor [count]
  DeviceBuffer chunk_of_;  // int2-ish {tensor index, chunk index within tensor}: int32 [2, chunks]
  DeviceBuffer partials_;  // double [chunks]
  DeviceBuffer state_;     // AdamWStepState
};

}  // namespace gyre::cuda
