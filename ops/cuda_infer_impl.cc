// Implements and registers ops/cuda_infer.h on the CUDA backend's stream.
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/mlstm.h"
#include "kernels/cuda/ssm_step.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/cuda_infer_kernels.h"

namespace gyre::ops {
namespace {

namespace kc = gyre::cuda;
using bf16 = __nv_bfloat16;

void OkOrDie(const kc::CudaResult& r, const char* what) {
  if (r.ok()) return;
  // Inside a graph capture the capture fails instead (CudaBackend::BeginCapture).
  if (Cuda().FailCapture(std::string("CUDA inference op ") + what + ": " + r.message)) return;
  std::fprintf(stderr, "CUDA inference op %s failed: %s\n", what, r.message.c_str());
  std::abort();
}

static_assert(sizeof(CudaCopySpan) == sizeof(cuda_infer::CopySpan) &&
                  offsetof(CudaCopySpan, src) == offsetof(cuda_infer::CopySpan, src) &&
                  offsetof(CudaCopySpan, bytes) == offsetof(cuda_infer::CopySpan, bytes),
              "CudaCopySpan and cuda_infer::CopySpan must share a layout");

static_assert(kDecodeGemmRowsMax == cuda_infer::kGemmRowsMax, "ops/cuda_infer.h kDecodeGemmRowsMax");

// The op profile's bracket (CudaBackend::SetOpProfiling) around one inference launch.
class Timed {
 public:
  explicit Timed(const char* label) : index_(Cuda().OpProfileBegin(label)) {}
  ~Timed() { Cuda().OpProfileEnd(index_); }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  int index_;
};

class CudaInferenceImpl final : public CudaInference {
 public:
  void Rope(const CudaRopeArgs& a) override {
    Timed timed("infer Rope");
    cuda_infer::RopePartialArgs r;
    r.x = a.x; r.rows = a.rows; r.seq = a.seq; r.heads = a.heads; r.head_dim = a.head_dim;
    r.rotary_dim = a.rotary_dim > 0 ? a.rotary_dim : a.head_dim;
    r.row_stride = a.row_stride; r.offset = a.offset; r.group = a.group; r.shift = a.shift;
    r.theta = a.theta; r.inverse = a.inverse;
    r.position_dev = a.position_dev; r.position_stride = a.position_stride;
    OkOrDie(cuda_infer::RopePartial(r, Stream()), "rope");
  }

  void RopeAppend(const CudaRopeAppendArgs& a) override {
    Timed timed("infer RopeAppend");
    cuda_infer::RopeAppendArgs r;
    r.batch = a.batch; r.queries = a.queries; r.heads = a.heads; r.kv_heads = a.kv_heads; r.head_dim = a.head_dim;
    r.rotary_dim = a.rotary_dim > 0 ? a.rotary_dim : a.head_dim;
    r.theta = a.theta; r.offset = a.offset; r.position_dev = a.position_dev; r.group = a.group; r.shift = a.shift;
    r.q = a.q; r.k = a.k; r.v = a.v; r.ldq = a.ldq; r.ldk = a.ldk; r.ldv = a.ldv;
    r.q_out = a.q_out; r.q_grouped_out = a.q_grouped_out;
    r.k_cache = a.k_cache; r.k_grouped_cache = a.k_grouped_cache; r.v_cache = a.v_cache;
    r.cache_batch_stride = a.cache_batch_stride;
    OkOrDie(cuda_infer::RopeAppend(r, Stream()), "rope append");
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
    Timed timed("infer AttentionDecode");
    cuda_infer::DecodeArgs d;
    d.batch = a.batch; d.heads = a.heads; d.kv_heads = a.kv_heads; d.head_dim = a.head_dim; d.length = a.length;
    d.queries = a.queries;
    d.q = a.q; d.q_grouped = a.q_grouped; d.k = a.k; d.k_grouped = a.k_grouped; d.v = a.v;
    d.cache_batch_stride = a.cache_batch_stride; d.window = a.window; d.out = a.out;
    d.position_dev = a.position_dev;
    d.split = a.split;
    d.cluster = a.cluster;
    OkOrDie(cuda_infer::AttentionDecode(d, Stream()), "attention decode");
  }

  void AppendRows(void* cache, int64_t cache_batch_stride, const void* src, int64_t batch, int64_t cols,
                  const int32_t* position_dev) override {
    OkOrDie(cuda_infer::AppendRows(cache, cache_batch_stride, src, batch, cols, position_dev, Stream()),
            "append rows");
  }

  void CopySpans(const void* spans_dev, int64_t n, int64_t max_bytes) override {
    Timed timed("infer CopySpans (commit)");
    OkOrDie(cuda_infer::CopySpans(static_cast<const cuda_infer::CopySpan*>(spans_dev), n, max_bytes, Stream()),
            "copy spans");
  }

  void DraftRows(const int32_t* chunk, const int32_t* head1, const int32_t* forced_keep, int32_t* keep_out, int64_t k,
                 const std::vector<const void*>& srcs, int64_t cols, void* dst) override {
    cuda_infer::DraftRowsArgs a;
    a.chunk = chunk; a.head1 = head1; a.forced_keep = forced_keep; a.keep_out = keep_out;
    a.k = k; a.heads = static_cast<int64_t>(srcs.size()); a.cols = cols; a.dst = dst;
    // More heads than the kernel's table: DraftRows refuses them (a.heads stays the true count).
    for (size_t h = 0; h < srcs.size() && h < static_cast<size_t>(cuda_infer::kDraftRowsMaxHeads); ++h) a.src[h] = srcs[h];
    OkOrDie(cuda_infer::DraftRows(a, Stream()), "draft rows");
  }

  void SoftCap(void* x, int64_t n, float cap) override {
    Timed timed("infer SoftCap (logits)");
    OkOrDie(cuda_infer::SoftCapRows(x, n, cap, Stream()), "soft cap rows");
  }

  void ArgmaxRows(const void* x, int64_t rows, int64_t cols, int64_t ld, int32_t* out) override {
    Timed timed("infer ArgmaxRows");
    OkOrDie(cuda_infer::ArgmaxRows(x, rows, cols, ld, out, Stream()), "argmax rows");
  }

  void EmbeddingRows(const int32_t* ids, int64_t rows, const void* table, int64_t vocab, int64_t dim,
                     void* out) override {
    OkOrDie(kc::EmbeddingForward(ids, static_cast<const bf16*>(table), static_cast<bf16*>(out), rows, vocab, dim,
                                 nullptr, Stream()),
            "embedding rows");
  }

  void Conv1dStep(const CudaConv1dStepArgs& a) override {
    Timed timed("infer Conv1dStep");
    kc::Conv1dStepArgs k;
    k.batch = a.batch; k.channels = a.channels; k.width = a.width; k.silu = a.silu;
    k.x = static_cast<const bf16*>(a.x); k.ldx = a.ldx; k.w = a.w; k.bias = a.bias; k.state = a.state;
    k.y = static_cast<bf16*>(a.y);
    k.positions = a.positions; k.history = a.history;
    OkOrDie(kc::Conv1dStep(k, Stream()), "conv1d step");
  }

  void SsdStep(const CudaSsdStepArgs& a) override {
    Timed timed("infer SsdStep");
    kc::SsdStepArgs k;
    k.batch = a.batch; k.heads = a.heads; k.head_dim = a.head_dim; k.groups = a.groups; k.state_dim = a.state_dim;
    k.x = static_cast<const bf16*>(a.x); k.b = static_cast<const bf16*>(a.b); k.c = static_cast<const bf16*>(a.c);
    k.ld_xbc = a.ld_xbc; k.dt = a.dt; k.a_log = a.a_log; k.dt_bias = a.dt_bias; k.d = a.d; k.state = a.state;
    k.y = static_cast<bf16*>(a.y);
    k.positions = a.positions; k.history = a.history;
    OkOrDie(kc::SsdStep(k, Stream()), "ssd step");
  }

  void SlstmStep(const CudaSlstmStepArgs& a) override {
    Timed timed("infer SlstmStep");
    kc::SlstmStepArgs k;
    k.batch = a.batch; k.heads = a.heads; k.head_dim = a.head_dim;
    k.gx = static_cast<const bf16*>(a.gx); k.r = static_cast<const bf16*>(a.r);
    k.h = a.h; k.c = a.c; k.n = a.n; k.m = a.m; k.h_out = static_cast<bf16*>(a.h_out);
    k.positions = a.positions;
    k.h_history = a.h_history; k.c_history = a.c_history; k.n_history = a.n_history; k.m_history = a.m_history;
    OkOrDie(kc::SlstmStep(k, Stream()), "slstm step");
  }

  void MlstmStep(const CudaMlstmStepArgs& a) override {
    Timed timed("infer MlstmStep");
    if (a.positions > 1 || a.n_out != nullptr) {
      kc::MlstmStepChunkArgs k;
      k.batch = a.batch; k.heads = a.heads; k.dk = a.dk; k.dv = a.dv; k.positions = a.positions;
      k.sigmoid_forget = a.sigmoid_forget; k.eps = a.eps;
      k.q = static_cast<const bf16*>(a.q); k.k = static_cast<const bf16*>(a.k); k.v = static_cast<const bf16*>(a.v);
      k.ig = a.ig; k.fg = a.fg; k.c = a.c; k.n = a.n; k.m = a.m; k.n_out = a.n_out; k.m_out = a.m_out;
      k.h = static_cast<bf16*>(a.h);
      k.c_history = a.c_history; k.n_history = a.n_history; k.m_history = a.m_history;
      OkOrDie(kc::MlstmStepChunk(k, Stream()), "mlstm step chunk");
      return;
    }
    kc::MlstmShape shape;
    shape.batch = a.batch; shape.seq_len = 1; shape.num_heads = a.heads; shape.dk = a.dk; shape.dv = a.dv;
    kc::MlstmOptions options;
    options.forget_gate = a.sigmoid_forget ? kc::MlstmForgetGate::kSigmoid : kc::MlstmForgetGate::kExponential;
    options.eps = a.eps;
    kc::MlstmDeviceState<float> state{a.c, a.n, a.m};
    OkOrDie(kc::MlstmStepForward(shape, options, static_cast<const bf16*>(a.q), static_cast<const bf16*>(a.k),
                                 static_cast<const bf16*>(a.v), a.ig, a.fg, state, static_cast<bf16*>(a.h), Stream()),
            "mlstm step");
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
