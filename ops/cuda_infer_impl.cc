// Implements and registers ops/cuda_infer.h on the CUDA backend's stream.
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/attention.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/cuda_infer_kernels.h"

namespace gyre::ops {
namespace {

namespace kc = gyre::cuda;
using bf16 = __nv_bfloat16;

void OkOrDie(const kc::CudaResult& r, const char* what) {
  if (r.ok()) return;
  std::fprintf(stderr, "CUDA inference op %s failed: %s\n", what, r.message.c_str());
  std::abort();
}

class CudaInferenceImpl final : public CudaInference {
 public:
  void Rope(const CudaRopeArgs& a) override {
    cuda_infer::RopePartialArgs r;
    r.x = a.x; r.rows = a.rows; r.seq = a.seq; r.heads = a.heads; r.head_dim = a.head_dim;
    r.rotary_dim = a.rotary_dim > 0 ? a.rotary_dim : a.head_dim;
    r.row_stride = a.row_stride; r.offset = a.offset; r.group = a.group; r.shift = a.shift;
    r.theta = a.theta; r.inverse = a.inverse;
    OkOrDie(cuda_infer::RopePartial(r, Stream()), "rope");
  }

  void AttentionForwardSelfExtend(const CudaAttention& a, const void* q_grouped, const void* k_grouped, int64_t group,
                                  int64_t window) override {
    kc::AttentionForwardArgs f;
    f.shape.batch = a.batch; f.shape.seq = a.seq; f.shape.heads = a.heads; f.shape.kv_heads = a.kv_heads;
    f.shape.head_dim = a.head_dim;
    f.q = static_cast<const bf16*>(a.q);
    f.k = static_cast<const bf16*>(a.k);
    f.v = static_cast<const bf16*>(a.v);
    f.q_row_stride = a.q_row_stride;
    f.kv_row_stride = a.kv_row_stride;
    f.self_extend_group = group;
    f.self_extend_window = window;
    f.q_grouped = static_cast<const bf16*>(q_grouped);
    f.k_grouped = static_cast<const bf16*>(k_grouped);
    f.out = static_cast<bf16*>(a.out);
    f.lse = a.lse;
    OkOrDie(kc::AttentionForward(f, Stream()), "self-extend attention forward");
  }

  void AttentionDecode(const CudaAttentionDecodeArgs& a) override {
    cuda_infer::DecodeArgs d;
    d.batch = a.batch; d.heads = a.heads; d.kv_heads = a.kv_heads; d.head_dim = a.head_dim; d.length = a.length;
    d.q = a.q; d.q_grouped = a.q_grouped; d.k = a.k; d.k_grouped = a.k_grouped; d.v = a.v;
    d.cache_batch_stride = a.cache_batch_stride; d.window = a.window; d.out = a.out;
    OkOrDie(cuda_infer::AttentionDecode(d, Stream()), "attention decode");
  }

 private:
  static cudaStream_t Stream() { return static_cast<cudaStream_t>(Cuda().ComputeStream()); }
};

const bool registered = [] {
  static CudaInferenceImpl impl;
  RegisterCudaInference(&impl);
  return true;
}();

}  // namespace
}  // namespace gyre::ops
