// Parameters and the build context shared by every layer.
//
// Gradient contract (as in llm.c's layernorm.cuh): a layer's `Backward` ACCUMULATES into its
// parameters' `grad` tensors (so gradient accumulation over micro-batches and tied weights just
// work) and RETURNS fresh activation gradients. `ParamStore::ZeroGrad` clears the accumulators.
//
// Deferred zeroing (saves the per-step memset of every gradient: 5.6 GB at llama-1.3b).
// `ParamStore::DeferZeroGrad` starts a step without clearing the gradients of parameters marked
// with `AllowDeferredZero`: their `grad` still holds the previous step's values and is "stale".
// The first writer of a stale gradient in the step must replace it instead of adding to it:
//   - a writer that sets every element (a weight-gradient GEMM, the one-pass norm dw) asks
//     `FirstGradWrite(p)` and overwrites (GEMM beta = 0) when it answers true, adds otherwise;
//   - a writer that adds into some elements only, or has no overwrite mode (the embedding's
//     scatter-add, atomics, kernels of other files), calls `ZeroGradIfStale(p)` first.
// Either call marks the gradient written, so later writers of the step (further micro-batches,
// MTP heads sharing the final norm, the tied embedding) accumulate as before. Before anything
// reads gradients, stale ones that no op wrote are zeroed (`ZeroStaleGrads`; the model does this
// before each grad-ready group and at the end of a backward pass). Parameters that were not
// marked are zeroed eagerly by DeferZeroGrad (coalesced memsets), so a block whose writers do not
// follow the rule (ops/recurrent_blocks.cc writes some gradients directly) stays correct.
// A layer's `Forward` saves what its `Backward` needs; `ReleaseActivations` drops it.
// Parameters are fp32 on the CPU training path (they are the master weights) or fp64 in the
// finite-difference test mode. On CUDA (mixed precision, kernels/cuda/README.md) `value` and
// `grad` are fp32 on the device and `compute` is the bf16 copy the kernels read; the AdamW kernel
// rewrites it after each update (ParamStore::SyncCompute after any other change of `value`).
//
// Flat CUDA storage: a store moved to the device with MoveToDevice keeps every value, every
// gradient and every compute copy in three flat buffers, in creation order (each parameter
// padded to a multiple of 8 elements), and the Parameter tensors are views into them. So the
// gradients of a model are one contiguous fp32 buffer (FlatGrad: one bucketed all-reduce, one
// memset for ZeroGrad), and parameters created one after another (q/k/v, gate/up) form one
// matrix the layers use for fused GEMMs (AdjacentSpan).
#pragma once

#include <deque>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ops/rng.h"
#include "ops/tensor.h"

namespace gyre::ops {

// Decides weight decay (AdamW) and initialisation rules by role, not by name.
enum class ParamKind {
  kWeight,     // linear / conv / projection matrices: decayed
  kNorm,       // norm scales
  kBias,       // additive biases, gate biases
  kEmbedding,  // token embedding (and the tied head)
  kNoDecay,    // other parameters the papers exclude (Mamba-2 A_log, D, dt_bias; xLSTM skip)
};

struct Parameter {
  std::string name;  // dotted path, e.g. "blocks.3.attn.q_proj.weight"
  ParamKind kind;
  Tensor value;
  Tensor grad;     // same shape; accumulates (the deferred-zero rule above)
  Tensor compute;  // CUDA only: bf16 copy of value used by the kernels; undefined on the CPU
  bool defer_zero = false;  // ParamStore::AllowDeferredZero: every writer follows the rule
  bool grad_stale = false;  // after DeferZeroGrad, until the step's first write (or zeroing)
};

// The deferred-zero rule for one gradient writer (see the top of this file). True: `grad` is
// stale and the caller must set every element (overwrite); false: add into it. Marks it written.
bool FirstGradWrite(Parameter* p);
// The same for parameters written together through one view (fused q/k/v, gate/up): true only if
// all are stale; if only some are, those are zeroed first and the answer is false.
bool FirstGradWrite(std::initializer_list<Parameter*> params);
// For writers that add into part of a gradient or cannot overwrite: zeroes a stale `grad` now.
void ZeroGradIfStale(Parameter* p);

// A tensor with its checkpoint name (parameter, optimizer moment, ...).
struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// Owns every parameter of a model, in creation order (stable pointers).
class ParamStore {
 public:
  ParamStore(DType dtype, Device device) : dtype_(dtype), device_(device) {}
  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;

  // Creates a zero-initialised parameter (and zero gradient).
  Parameter* Create(std::string name, Shape shape, ParamKind kind);
  // Marks a CPU store as host staging for MoveToDevice: parameters created from now on get no
  // host gradient (the move replaces it with the device one; 5.3 GB not zeroed at 1.3B).
  void StageForDevice() { staging_ = true; }

  std::vector<Parameter*> All();
  std::vector<const Parameter*> All() const;
  Parameter* Find(const std::string& name);
  int64_t NumParameters() const;
  // Zeros every gradient now (and clears the stale marks): empty shards, dropped steps, tests.
  void ZeroGrad();
  // Starts a step's gradients: zeros those of unmarked parameters now (one memset per run of
  // them in the flat buffer), marks the others stale (no memset; the rule above).
  void DeferZeroGrad();
  // Zeros the gradients of `params` that are still stale (nothing wrote them this step).
  void ZeroStaleGrads(const std::vector<Parameter*>& params);
  void ZeroStaleGrads() { ZeroStaleGrads(All()); }
  // Lets DeferZeroGrad leave these gradients stale: the caller vouches that every op writing
  // them follows the rule.
  void AllowDeferredZero(const std::vector<Parameter*>& params);
  // Checkpoint state: every parameter value under its name (shares storage; copy to keep).
  std::vector<NamedTensor> State() const;
  // Copies values from `state` (converting f32 <-> f64 if needed). Every parameter must be
  // present with its shape; extra entries are ignored. Validates before changing anything;
  // errors name the parameter.
  absl::Status LoadState(const std::vector<NamedTensor>& state);
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  // Moves every parameter (values, zeroed gradients, fresh bf16 compute copies) from the CPU to
  // `device` (kCuda) into the flat buffers described above. The store must be on the CPU in
  // dtype f32. Parameter pointers stay valid.
  void MoveToDevice(Device device);
  // Rewrites every compute copy from its value (CUDA; no-op elsewhere).
  void SyncCompute();
  // The flat gradient buffer [total] (padding included), or undefined if the store is not flat.
  const Tensor& FlatGrad() const { return flat_grad_; }
  // When `params` lie back to back in the flat buffers (same trailing dim), views of their
  // stacked compute copies and gradients as [Σ rows, cols]; false otherwise.
  bool AdjacentSpan(const std::vector<const Parameter*>& params, Tensor* compute, Tensor* grad) const;

 private:
  DType dtype_;
  Device device_;
  bool staging_ = false;
  std::deque<Parameter> params_;
  Tensor flat_value_, flat_grad_, flat_compute_;
  std::vector<int64_t> flat_offset_;  // per parameter, in elements
};

// What a layer constructor needs: where its parameters go, how to name them, the RNG for
// initialisation (unused on the meta device).
struct BuildContext {
  ParamStore* store;
  Rng* rng;
  std::string prefix;  // "" or ends without a dot; Name("w") gives "prefix.w"

  std::string Name(const std::string& leaf) const { return prefix.empty() ? leaf : prefix + "." + leaf; }
  BuildContext Sub(const std::string& child) const { return {store, rng, Name(child)}; }
  DType dtype() const { return store->dtype(); }
  Device device() const { return store->device(); }
  bool materialized() const { return store->device() != Device::kMeta; }
};

// Initialisers (no-ops on the meta device).
void InitNormal(Tensor* t, double stddev, Rng* rng);
void InitUniform(Tensor* t, double lo, double hi, Rng* rng);
void InitConstant(Tensor* t, double value);

}  // namespace gyre::ops
