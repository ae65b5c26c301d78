// AdamW (Loshchilov & Hutter; PyTorch semantics) over a ParamStore:
//   p <- p - lr * wd * p                      (decoupled decay, only on decayed kinds)
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g²
//   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// Defaults are the xLSTM recipe (MODELS.md §3): b = (0.9, 0.95), eps 1e-5, wd 0.1. Weight decay
// applies to ParamKind::kWeight only unless `decay_all` (then to every parameter).
// Moments are kept in the parameters' dtype (fp32 on the CPU path, fp64 in tests); on the CPU
// path the parameters themselves are the fp32 master weights.
// CUDA parameters: fp32 moments on the device and the multi-tensor kernel (kernels/cuda/adamw.h),
// which also clips to the global norm and rewrites the bf16 compute copies: use ClipAndStep.
// Not thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ops/cuda_backend.h"
#include "ops/module.h"

namespace gyre::ops {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-5;
  double weight_decay = 0.1;
  bool decay_all = false;  // OptimizerConfig.decay_norms_and_embeddings
};

class AdamW {
 public:
  AdamW(ParamStore* params, AdamWOptions options);
  // One update with learning rate `lr` from the current gradients.
  void Step(double lr);
  // CUDA: clip to `max_norm` (<= 0: off) and update in one fused pass; returns ||g|| before
  // clipping. A non-finite norm skips the update (and the step count).
  double ClipAndStep(double lr, double max_norm);
  bool on_cuda() const { return cuda_ != nullptr; }
  int64_t steps_taken() const { return t_; }
  const AdamWOptions& options() const { return options_; }
  bool Decays(const Parameter& p) const { return options_.decay_all || p.kind == ParamKind::kWeight; }

  // Checkpoint state: "adam.m.<param>", "adam.v.<param>" and "adam.step" ([1], f64). The
  // returned tensors share storage with the optimizer (copy before mutating).
  std::vector<NamedTensor> State() const;
  // Restores State() output; errors name the missing or mis-shaped tensor.
  absl::Status LoadState(const std::vector<NamedTensor>& state);

 private:
  ParamStore* params_;
  AdamWOptions options_;
  std::vector<Parameter*> list_;
  std::vector<Tensor> m_, v_;
  int64_t t_ = 0;
  std::unique_ptr<CudaAdamW> cuda_;
};

}  // namespace gyre::ops
