// The CUDA backend of ops/ (ops/cuda_backend.h): one process-wide context (device 0, one
// non-blocking stream, the caching DeviceAllocator, the cuBLASLt GemmContext, RoPE tables),
// created on first use and never destroyed (blocks may be released during static destruction).
// Registered by a static initialiser; the library is alwayslink so a dependency is enough.
#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/cuda/adamw.h"
#include "kernels/cuda/conv1d.h"
#include "kernels/cuda/mlstm.h"
#include "kernels/cuda/slstm.h"
#include "kernels/cuda/ssd.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/activations.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device_allocator.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/norm.h"
#include "kernels/cuda/pinned_upload.h"
#include "kernels/cuda/rope.h"
#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/cuda_infer_kernels.h"
#include "ops/cuda_ops.h"
#include "ops/env_switch.h"
#include "ops/recurrent_cuda.h"
#include "ops/xlstm_large_cuda.h"
#include "ops/tensor.h"

namespace gyre::ops {
namespace {

using bf16 = __nv_bfloat16;
namespace kc = ::gyre::cuda;

// While a graph capture is open (Backend::BeginCapture), the first failure's message; null
// otherwise. A failure inside a capture fails the capture, not the process: nothing has run yet,
// and EndCapture discards the graph. One thread drives the backend.
std::string* g_capture_error = nullptr;

void Die(const kc::CudaResult& r, const char* what) {
  if (r.ok()) return;
  if (g_capture_error != nullptr) {
    if (g_capture_error->empty()) *g_capture_error = std::string(what) + ": " + r.message;
    return;
  }
  std::fprintf(stderr, "CUDA backend: %s failed: %s\n", what, r.message.c_str());
  if (r.message.find("out of memory") != std::string::npos) {
    std::fprintf(stderr, "CUDA backend: the device memory is full: lower train.micro_batch (gradient accumulation "
                         "keeps the global batch), or set model.xlstm.mlstm_recompute (xLSTM) or model.recompute_blocks\n");
  }
  std::abort();
}

#define OK_OR_DIE(expr) Die((expr), #expr)
#define CUDA_OR_DIE(expr) Die(kc::CudaError((expr), #expr, __FILE__, __LINE__), #expr)

// Per-op GPU time (CudaBackend::SetOpProfiling): event pairs on the stream, reused across
// takes; labels interned in first-seen order. The device's gaps: the ops opened at depth 0 run in
// stream order, so the time from one's end event to the next one's begin event is device time
// in no op (the device waiting for the host, or work outside every bracket); a step mark
// (OpProfileStepStart) is an event alone, recorded when the host starts a step, so the first op
// of a step gets the gap since the host began it (the host time between steps is in no gap).
class OpProfiler {
 public:
  bool on() const { return on_; }
  void set_on(bool on) { on_ = on; }
  void set_stream(cudaStream_t s) { stream_ = s; }

  // RAII bracket; free when profiling is off. Close ends it early (before a read-back, so the
  // host's wait is a gap, not the op's time).
  class Scope {
   public:
    Scope(OpProfiler* p, const char* label, double flops = 0) : p_(p) {
      if (p_->on_) index_ = p_->Begin(label, flops);
    }
    Scope(OpProfiler* p, const std::string& label, double flops) : p_(p) {
      if (p_->on_) index_ = p_->Begin(label, flops);
    }
    ~Scope() { Close(); }
    void Close() {
      if (index_ >= 0) p_->End(index_);
      index_ = -1;
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
    int index_ = -1;
  };

  void MarkStepStart() {
    if (!on_) return;
    const int i = NextRecord();
    records_[i] = {kStepMark, 0, 0};
    CUDA_OR_DIE(cudaEventRecord(events_[i].first, stream_));
  }

  std::vector<CudaBackend::OpTime> Take() {
    std::vector<CudaBackend::OpTime> out(labels_.size());
    if (next_ > 0) CUDA_OR_DIE(cudaStreamSynchronize(stream_));
    for (const auto& [label, i] : labels_) out[i].label = label;
    CudaBackend::OpGaps gaps;
    std::vector<CudaBackend::OpGap> all;
    int prev = -1;  // the last depth-0 op or step mark
    double step_begin_ms = 0, last_end_ms = 0;
    bool in_step = false;
    cudaEvent_t origin = next_ > 0 ? events_[0].first : nullptr;
    const auto at = [&](cudaEvent_t e) {  // ms since the first record
      float ms = 0;
      CUDA_OR_DIE(cudaEventElapsedTime(&ms, origin, e));
      return static_cast<double>(ms);
    };
    const auto label_of = [&](int i) {
      return records_[i].label == kStepMark ? std::string("(step start)") : out[records_[i].label].label;
    };
    for (int i = 0; i < next_; ++i) {
      const Record& r = records_[i];
      if (r.label == kStepMark) {
        if (in_step) gaps.span_seconds += 1e-3 * (last_end_ms - step_begin_ms);
        in_step = true;
        gaps.steps += 1;
        step_begin_ms = last_end_ms = at(events_[i].first);
        prev = i;
        continue;
      }
      float ms = 0;
      CUDA_OR_DIE(cudaEventElapsedTime(&ms, events_[i].first, events_[i].second));
      CudaBackend::OpTime& t = out[r.label];
      t.seconds += 1e-3 * ms;
      t.flops += r.flops;
      t.calls += 1;
      if (r.depth != 0) continue;
      if (prev >= 0) {
        const cudaEvent_t prev_end = records_[prev].label == kStepMark ? events_[prev].first : events_[prev].second;
        float g = 0;
        CUDA_OR_DIE(cudaEventElapsedTime(&g, prev_end, events_[i].first));
        const double seconds = std::max(0.0, 1e-3 * g);
        t.gap_seconds += seconds;
        int bucket = 0;
        while (bucket < 4 && seconds >= kBucketEdges[bucket]) ++bucket;
        gaps.counts[bucket] += 1;
        gaps.seconds[bucket] += seconds;
        all.push_back({seconds, label_of(prev), t.label});
      }
      last_end_ms = at(events_[i].second);
      prev = i;
    }
    if (in_step) gaps.span_seconds += 1e-3 * (last_end_ms - step_begin_ms);
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.seconds > b.seconds; });
    if (all.size() > 12) all.resize(12);
    gaps.largest = std::move(all);
    last_gaps_ = std::move(gaps);
    next_ = 0;
    depth_ = 0;
    labels_.clear();
    std::vector<CudaBackend::OpTime> used;
    for (auto& t : out) {
      if (t.calls > 0) used.push_back(std::move(t));
    }
    return used;
  }

  CudaBackend::OpGaps TakeGaps() { return std::exchange(last_gaps_, CudaBackend::OpGaps()); }

  // Gap size buckets (seconds): < 2 us (a launch's own bubble between queued kernels), < 5 us,
  // < 20 us, < 100 us, >= 100 us (the host behind: a read-back's round trip, host work).
  static constexpr double kBucketEdges[4] = {2e-6, 5e-6, 20e-6, 100e-6};

 private:
  static constexpr int kStepMark = -1;
  struct Record {
    int label = 0;  // kStepMark: a step mark (first event only)
    double flops = 0;
    int depth = 0;  // brackets open when this one began (nested ops are in no gap)
  };

  int NextRecord() {
    if (next_ == static_cast<int>(events_.size())) {
      std::pair<cudaEvent_t, cudaEvent_t> e;
      CUDA_OR_DIE(cudaEventCreate(&e.first));
      CUDA_OR_DIE(cudaEventCreate(&e.second));
      events_.push_back(e);
      records_.emplace_back();
    }
    return next_++;
  }

  int Begin(const std::string& label, double flops) {
    const int i = NextRecord();
    auto it = labels_.emplace(label, static_cast<int>(labels_.size())).first;
    records_[i] = {it->second, flops, depth_++};
    CUDA_OR_DIE(cudaEventRecord(events_[i].first, stream_));
    return i;
  }
  void End(int i) {
    CUDA_OR_DIE(cudaEventRecord(events_[i].second, stream_));
    if (depth_ > 0) --depth_;
  }

 public:
  // Begin / End for ops outside this file (CudaBackend::OpProfileBegin): -1 when off.
  int Open(const char* label) { return on_ ? Begin(label, 0) : -1; }
  void Close(int i) {
    if (i >= 0) End(i);
  }

 private:

  bool on_ = false;
  cudaStream_t stream_ = nullptr;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events_;  // never destroyed (process-wide backend)
  std::vector<Record> records_;
  std::map<std::string, int> labels_;
  int next_ = 0;
  int depth_ = 0;
  CudaBackend::OpGaps last_gaps_;
};

// Host scalars that device ops produce during a step (the LM head's loss sums), kept in device
// slots instead of being read back one by one: each read-back is a stream synchronisation, and
// one in the middle of the step leaves the device idle until the host has enqueued the next ops
// (bench/RESULTS.md, session 22, async22). The optimizer's read-back (Adam::Step) copies the
// pending slots beside its own state before its one synchronisation; TakeDeferredScalars
// returns them (synchronising only when no read-back has fetched them yet). A pinned host
// buffer, so the copies are plain DMAs on the stream. Slots are reused after a take: the stream
// orders a slot's next write after the copy of its last value. One thread drives the backend.
class DeferredScalars {
 public:
  static constexpr int kSlots = 64;

  // The next slot's device address; *index: its position in the next TakeAll. A full set of
  // slots is fetched first (a copy and a synchronisation), so any number can be pending.
  double* Next(kc::DeviceAllocator* alloc, cudaStream_t stream, int* index) {
    if (device_.get() == nullptr) {
      OK_OR_DIE(alloc->Allocate(kSlots * sizeof(double), &device_));
      void* p = nullptr;
      CUDA_OR_DIE(cudaHostAlloc(&p, kSlots * sizeof(double), cudaHostAllocPortable));
      host_ = static_cast<double*>(p);  // never freed (process-wide backend)
    }
    if (pending_ == kSlots) Fetch(stream);
    *index = static_cast<int>(values_.size()) + pending_;
    return device_.as<double>() + pending_++;
  }
  // Enqueues the copy of the pending slots into the pinned buffer; the caller synchronises the
  // stream, then calls Collect. Nothing to copy: no-op.
  void EnqueueCopy(cudaStream_t stream) {
    copying_ = pending_;
    if (copying_ > 0) {
      CUDA_OR_DIE(cudaMemcpyAsync(host_, device_.get(), copying_ * sizeof(double), cudaMemcpyDeviceToHost, stream));
    }
  }
  void Collect() {
    GYRE_CHECK(pending_ == copying_, "DeferredScalars: a slot was handed out between EnqueueCopy and Collect");
    values_.insert(values_.end(), host_, host_ + copying_);
    pending_ -= copying_;
    copying_ = 0;
  }
  void Fetch(cudaStream_t stream) {
    if (pending_ == 0) return;
    EnqueueCopy(stream);
    CUDA_OR_DIE(cudaStreamSynchronize(stream));
    Collect();
  }
  std::vector<double> TakeAll(cudaStream_t stream) {
    Fetch(stream);
    return std::exchange(values_, {});
  }

 private:
  kc::DeviceBuffer device_;
  double* host_ = nullptr;
  int pending_ = 0;  // slots [0, pending_) written (or to be written) by enqueued ops, not fetched
  int copying_ = 0;  // of those, the ones whose copy EnqueueCopy enqueued
  std::vector<double> values_;  // fetched, in slot order, since the last TakeAll
};

class Adam final : public CudaAdamW {
 public:
  Adam(kc::DeviceAllocator* alloc, cudaStream_t stream, OpProfiler* prof, DeferredScalars* scalars)
      : alloc_(alloc), stream_(stream), prof_(prof), scalars_(scalars) {
    void* p = nullptr;
    CUDA_OR_DIE(cudaHostAlloc(&p, sizeof(kc::AdamWStepState), cudaHostAllocPortable));
    state_host_ = static_cast<kc::AdamWStepState*>(p);
  }
  ~Adam() override { cudaFreeHost(state_host_); }
  void Init(const std::vector<CudaAdamWTensor>& tensors, const kc::AdamWHyper& hyper) {
    std::vector<kc::AdamWTensor> ts;
    for (const CudaAdamWTensor& t : tensors) {
      kc::AdamWTensor k;
      k.master = t.master;
      k.grad = t.grad;
      k.m = t.m;
      k.v = t.v;
      k.compute = static_cast<bf16*>(t.compute);
      k.numel = t.numel;
      k.decay = t.decay;
      ts.push_back(k);
    }
    OK_OR_DIE(adam_.Init(ts, hyper, alloc_, stream_));
  }
  // The step's one read-back: the norm / skip state and every pending deferred scalar (the
  // step's loss) in one synchronisation. The profiled op ends before it (the wait is a gap).
  double Step(double lr, double max_grad_norm) override {
    {
      OpProfiler::Scope scope(prof_, "adamw+clip (norm, clip, step, bf16 copy)");
      OK_OR_DIE(adam_.Step(lr, max_grad_norm, stream_));
    }
    CUDA_OR_DIE(cudaMemcpyAsync(state_host_, adam_.device_state(), sizeof(kc::AdamWStepState), cudaMemcpyDeviceToHost,
                                stream_));
    scalars_->EnqueueCopy(stream_);
    CUDA_OR_DIE(cudaStreamSynchronize(stream_));
    scalars_->Collect();
    const kc::AdamWStepState st = *state_host_;
    if (st.skipped) adam_.UndoStep();
    return st.grad_norm;
  }
  int64_t steps_taken() const override { return adam_.steps_taken(); }
  void set_steps_taken(int64_t t) override { adam_.set_steps_taken(t); }

 private:
  kc::DeviceAllocator* alloc_;
  cudaStream_t stream_;
  OpProfiler* prof_;
  DeferredScalars* scalars_;
  kc::AdamWStepState* state_host_ = nullptr;  // pinned
  kc::FusedAdamW adam_;
};

// cuda_ops' conversion kind: 0 f32 -> bf16, 1 bf16 -> f32.
int ConvertKind(DType src, DType dst) {
  int kind = -1;
  if (src == DType::kF32 && dst == DType::kBF16) kind = 0;
  if (src == DType::kBF16 && dst == DType::kF32) kind = 1;
  GYRE_CHECK(kind >= 0, "CUDA conversion %s -> %s", DTypeName(src), DTypeName(dst));
  return kind;
}

// The argument fields that an op's forward and backward share, filled from the backend's own
// argument struct (one place per op for the mapping).

// GatedForward / GatedBackward: the activation, shape and the g, u inputs.
kc::GatedArgs GatedArgsOf(int act, int64_t rows, int64_t cols, const void* g, const void* u, int64_t ld_in,
                          int64_t ld_out) {
  kc::GatedArgs a;
  a.act = act == 0 ? kc::ActKind::kSilu : kc::ActKind::kGelu;
  a.rows = rows;
  a.cols = cols;
  a.g = static_cast<const bf16*>(g);
  a.u = static_cast<const bf16*>(u);
  a.ld_in = ld_in;
  a.ld_out = ld_out;
  return a;
}

// A q or k/v row stride: the given one, or heads · head_dim (packed heads) where it is 0.
int64_t RowStrideOr(int64_t row_stride, int64_t heads, int64_t head_dim) {
  return row_stride > 0 ? row_stride : heads * head_dim;
}

// kc::AttentionForwardArgs / AttentionBackwardArgs: shape, q, k, v, their row strides and lse.
template <class FlashArgs>
void SetFlashInputs(const CudaAttention& a, FlashArgs* f) {
  f->shape.batch = a.batch;
  f->shape.seq = a.seq;
  f->shape.heads = a.heads;
  f->shape.kv_heads = a.kv_heads;
  f->shape.head_dim = a.head_dim;
  f->q = static_cast<const bf16*>(a.q);
  f->k = static_cast<const bf16*>(a.k);
  f->v = static_cast<const bf16*>(a.v);
  f->q_row_stride = a.q_row_stride;
  f->kv_row_stride = a.kv_row_stride;
  f->lse = a.lse;
}

// kc::Conv1dForwardArgs / Conv1dBackwardArgs: shape, options, x, w and bias.
template <class Conv1dKernelArgs>
void SetConv1dInputs(const Conv1dArgs& a, Conv1dKernelArgs* f) {
  f->shape.batch = a.batch;
  f->shape.seq_len = a.seq;
  f->shape.channels = a.channels;
  f->shape.width = a.width;
  f->options.silu = a.silu;
  f->x = static_cast<const bf16*>(a.x);
  f->w = a.w;
  f->bias = a.bias;
}

// The SSD cell's shape and options (kc::SsdShape, kc::SsdOptions).
struct SsdForm {
  kc::SsdShape shape;
  kc::SsdOptions options;
};
SsdForm SsdFormOf(const SsdCellArgs& a) {
  SsdForm f;
  f.shape.batch = a.batch;
  f.shape.seq_len = a.seq;
  f.shape.num_heads = a.heads;
  f.shape.head_dim = a.head_dim;
  f.shape.num_groups = a.groups;
  f.shape.state_dim = a.state;
  f.options.chunk_size = a.chunk;
  return f;
}

// kc::SsdForwardArgs / SsdBackwardArgs: shape, options, the inputs, saved and the row strides.
template <class SsdKernelArgs>
void SetSsdInputs(const SsdCellArgs& a, SsdKernelArgs* f) {
  const SsdForm form = SsdFormOf(a);
  f->shape = form.shape;
  f->options = form.options;
  f->x = static_cast<const bf16*>(a.x);
  f->dt = a.dt;
  f->a_log = a.a_log;
  f->dt_bias = a.dt_bias;
  f->b = static_cast<const bf16*>(a.b);
  f->c = static_cast<const bf16*>(a.c);
  f->d = a.d;
  f->saved = a.saved;
  f->x_row_stride = a.x_row_stride;
  f->bc_row_stride = a.bc_row_stride;
}

class Backend final : public CudaBackend {
 public:
  std::shared_ptr<void> Allocate(size_t bytes) override {
    Init();
    auto holder = std::make_shared<kc::DeviceBuffer>();
    const kc::CudaResult r = alloc_->Allocate(bytes == 0 ? 1 : bytes, holder.get());
    if (!r.ok() && capturing_) {
      // The capture has failed (a cache miss); the host code before EndCapture still needs an
      // address. A block outside the allocator (cudaMalloc is legal in a relaxed capture), freed
      // after the capture has ended; EndCapture then caches a block of this size for a retry.
      OK_OR_DIE(r);
      capture_misses_.push_back(bytes == 0 ? 1 : bytes);
      void* p = nullptr;
      CUDA_OR_DIE(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
      return std::shared_ptr<void>(p, [this](void* q) {
        if (capturing_) capture_spill_.push_back(q);
        else cudaFree(q);
      });
    }
    OK_OR_DIE(r);
    void* p = holder->get();
    return std::shared_ptr<void>(holder, p);
  }

  class CapturedGraph final : public Graph {
   public:
    CapturedGraph(cudaGraphExec_t exec, int64_t nodes, cudaStream_t stream, kc::DeviceAllocator* alloc, uint64_t pool)
        : exec_(exec), nodes_(nodes), stream_(stream), alloc_(alloc), pool_(pool) {}
    ~CapturedGraph() override {
      // The last replay must be over before the pool's blocks can go to anyone else.
      cudaStreamSynchronize(stream_);
      cudaGraphExecDestroy(exec_);
      alloc_->ReleasePool(pool_);
    }
    void Launch() override { CUDA_OR_DIE(cudaGraphLaunch(exec_, stream_)); }
    int64_t nodes() const override { return nodes_; }

   private:
    cudaGraphExec_t exec_;
    int64_t nodes_;
    cudaStream_t stream_;
    kc::DeviceAllocator* alloc_;
    uint64_t pool_;
  };

  void BeginCapture() override {
    Init();
    GYRE_CHECK(!capturing_, "CUDA graph capture: one capture at a time");
    capture_error_.clear();
    capture_misses_.clear();
    g_capture_error = &capture_error_;
    capturing_ = true;
    pool_ = alloc_->BeginPoolCapture();
    if (pool_ == 0) capture_error_ = "the allocator has another graph pool capturing";
    if (prof_.on()) capture_error_ = "op profiling is on (its events would be captured)";
    CUDA_OR_DIE(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
  }

  std::unique_ptr<Graph> EndCapture(std::string* error, bool* retry) override {
    GYRE_CHECK(capturing_, "CUDA graph EndCapture without BeginCapture");
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (end != cudaSuccess) cudaGetLastError();
    alloc_->EndPoolCapture();
    capturing_ = false;
    g_capture_error = nullptr;
    for (void* p : capture_spill_) cudaFree(p);
    capture_spill_.clear();
    // Only cache misses (the first failure was one): cache the missed sizes (allocated together,
    // then freed), so that the same capture again hits.
    const bool only_misses = !capture_misses_.empty() && capture_error_.find("missed the cache") != std::string::npos;
    if (retry != nullptr) *retry = only_misses;
    if (only_misses) {
      std::vector<kc::DeviceBuffer> warm(capture_misses_.size());
      for (size_t i = 0; i < warm.size(); ++i) OK_OR_DIE(alloc_->Allocate(capture_misses_[i], &warm[i]));
    }
    capture_misses_.clear();
    std::string why = capture_error_;
    if (why.empty() && end != cudaSuccess) why = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(end);
    cudaGraphExec_t exec = nullptr;
    size_t nodes = 0;
    if (why.empty()) {
      cudaGraphGetNodes(graph, nullptr, &nodes);
      const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
      if (inst != cudaSuccess) {
        cudaGetLastError();
        why = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(inst);
      }
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (!why.empty()) {
      alloc_->ReleasePool(pool_);
      if (error != nullptr) *error = why;
      return nullptr;
    }
    return std::make_unique<CapturedGraph>(exec, static_cast<int64_t>(nodes), stream_, alloc_, pool_);
  }

  bool Capturing() override { return capturing_; }

  bool FailCapture(const std::string& message) override {
    if (!capturing_) return false;
    if (capture_error_.empty()) capture_error_ = message;
    return true;
  }

  void ProfilerRange(bool start) override {
    Init();
    CUDA_OR_DIE(start ? cudaProfilerStart() : cudaProfilerStop());
  }

  void CopyAsync(void* dst, const void* src, size_t bytes) override {
    Init();
    OpProfiler::Scope scope(&prof_, "CopyAsync");
    CUDA_OR_DIE(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  }

  std::shared_ptr<void> AllocatePinnedHost(size_t bytes) override {
    Init();
    // Any thread may call this (SnapshotStaging pins on a background thread): bind it to the
    // backend's device first, so no other context is created; portable, so pinned for every
    // context.
    CUDA_OR_DIE(cudaSetDevice(0));
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();  // a failed allocation is not sticky: clear it so later checks do not see it
      return nullptr;
    }
    return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
  }

  void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) override {
    Init();
    OpProfiler::Scope scope(&prof_, dst_device == Device::kCuda && src_device == Device::kCuda ? "CopyBytes d2d"
                                    : dst_device == Device::kCuda                               ? "CopyBytes h2d"
                                                                                                : "CopyBytes d2h");
    CUDA_OR_DIE(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
    scope.Close();  // the wait below is the host's, a gap in the op profile
    if (dst_device != Device::kCuda || src_device != Device::kCuda) CUDA_OR_DIE(cudaStreamSynchronize(stream_));
  }

  void Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Copy2D");
    CUDA_OR_DIE(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDeviceToDevice, stream_));
  }

  void Memset0(void* dst, size_t bytes) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Memset0");
    CUDA_OR_DIE(cudaMemsetAsync(dst, 0, bytes, stream_));
  }

  void Synchronize() override {
    Init();
    CUDA_OR_DIE(cudaStreamSynchronize(stream_));
  }

  std::string DeviceDescription() override {
    Init();
    cudaDeviceProp prop;
    CUDA_OR_DIE(cudaGetDeviceProperties(&prop, 0));
    return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
           std::to_string(prop.totalGlobalMem >> 30) + " GiB)";
  }

  void* ComputeStream() override {
    Init();
    return stream_;
  }

  void Convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Convert");
    OK_OR_DIE(cuda_ops::Convert(src, dst, n, ConvertKind(src_dtype, dst_dtype), stream_));
  }

  void ConvertRows(const void* src, DType src_dtype, int64_t src_ld, void* dst, DType dst_dtype, int64_t dst_ld,
                   int64_t rows, int64_t cols) override {
    Init();
    OpProfiler::Scope scope(&prof_, "ConvertRows");
    GYRE_CHECK(src_ld >= cols && dst_ld >= cols, "ConvertRows: row strides %ld, %ld below %ld columns", (long)src_ld,
               (long)dst_ld, (long)cols);
    OK_OR_DIE(cuda_ops::ConvertRows(src, src_ld, dst, dst_ld, rows, cols, ConvertKind(src_dtype, dst_dtype), stream_));
  }

  void Axpy(void* y, const void* x, DType dtype, double alpha, int64_t n) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Axpy");
    OK_OR_DIE(cuda_ops::Axpy(y, x, BF16(dtype), static_cast<float>(alpha), n, stream_));
  }

  void Add(void* out, const void* a, const void* b, DType dtype, int64_t n) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Add");
    OK_OR_DIE(cuda_ops::Add(out, a, b, BF16(dtype), n, stream_));
  }

  void Scale(void* y, DType dtype, double s, int64_t n) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Scale");
    OK_OR_DIE(cuda_ops::Scale(y, BF16(dtype), static_cast<float>(s), n, stream_));
  }

  double SumSquares(const void* x, DType dtype, int64_t n) override {
    Init();
    OpProfiler::Scope scope(&prof_, "SumSquares");
    constexpr int kMax = 4096;
    kc::DeviceBuffer partials;
    OK_OR_DIE(alloc_->Allocate(kMax * sizeof(double), &partials));
    int blocks = 0;
    OK_OR_DIE(cuda_ops::SumSquaresPartials(x, BF16(dtype), n, partials.as<double>(), kMax, &blocks, stream_));
    std::vector<double> host(blocks);
    CUDA_OR_DIE(cudaMemcpyAsync(host.data(), partials.get(), blocks * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    scope.Close();
    CUDA_OR_DIE(cudaStreamSynchronize(stream_));
    double s = 0;
    for (double v : host) s += v;
    return s;
  }

  void Gemm(const CudaGemm& g) override {
    Init();
    OpProfiler::Scope scope(&prof_, prof_.on() ? GemmLabel(g) : std::string(), 2.0 * g.m * g.n * g.k);
    kc::GemmArgs a;
    a.trans_a = g.trans_a;
    a.trans_b = g.trans_b;
    a.m = g.m;
    a.n = g.n;
    a.k = g.k;
    a.a = g.a;
    a.lda = g.lda;
    a.b = g.b;
    a.ldb = g.ldb;
    a.c = g.c;
    a.ldc = g.ldc;
    a.c_dtype = g.c_f32 ? kc::DType::kF32 : kc::DType::kBf16;
    a.alpha = g.alpha;
    a.beta = g.beta;
    a.c_in = g.c_in;
    if (!g.trans_a && g.trans_b && g.m > 0 && g.m <= cuda_infer::kGemmRowsMax && RowInvariantDecode()) {
      // Decoding's few-row products: a summation order that does not depend on m (cuda_infer.h).
      OK_OR_DIE(cuda_infer::GemmRows(a, stream_, GemmRowsWarps()));
      return;
    }
    OK_OR_DIE(gemm_->Gemm(a, stream_));
  }

  void EmbeddingForward(const int32_t* host_ids, int64_t rows, const void* table, int64_t vocab, int64_t dim,
                        void* out) override {
    Init();
    OpProfiler::Scope scope(&prof_, "EmbeddingForward");
    kc::DeviceBuffer ids;
    OK_OR_DIE(alloc_->Allocate(rows * sizeof(int32_t), &ids));
    Upload(ids.get(), host_ids, rows * sizeof(int32_t));
    OK_OR_DIE(kc::EmbeddingForward(ids.as<int32_t>(), static_cast<const bf16*>(table), static_cast<bf16*>(out), rows,
                                   vocab, dim, nullptr, stream_));
    // Upload has left the host buffer by the time it returns; `ids` goes back to the cache and
    // the stream orders its reuse after the kernel.
  }

  void EmbeddingBackward(const int32_t* host_ids, int64_t rows, const void* dy, float* dweight, int64_t vocab,
                         int64_t dim, bool overwrite) override {
    Init();
    OpProfiler::Scope scope(&prof_, "EmbeddingBackward");
    OK_OR_DIE(embedding_plan_.Build(host_ids, rows, vocab, alloc_, stream_, StagedUploads() ? &uploads_ : nullptr));
    OK_OR_DIE(kc::EmbeddingBackward(embedding_plan_, static_cast<const bf16*>(dy), dweight, dim, overwrite, stream_));
  }

  void NormForward(bool layer, int64_t rows, int64_t dim, double eps, const void* x, const void* residual,
                   void* residual_out, const void* weight, const void* bias, void* y, float* mean,
                   float* rstd) override {
    Init();
    OpProfiler::Scope scope(&prof_, residual != nullptr ? "NormForward (+residual)" : "NormForward");
    kc::NormForwardArgs a;
    a.kind = layer ? kc::NormKind::kLayer : kc::NormKind::kRms;
    a.rows = rows;
    a.dim = dim;
    a.eps = static_cast<float>(eps);
    a.x = static_cast<const bf16*>(x);
    a.residual = static_cast<const bf16*>(residual);
    a.residual_out = static_cast<bf16*>(residual_out);
    a.weight = static_cast<const bf16*>(weight);
    a.bias = static_cast<const bf16*>(bias);
    a.y = static_cast<bf16*>(y);
    a.mean = mean;
    a.rstd = rstd;
    OK_OR_DIE(kc::NormForward(a, stream_));
  }

  void NormBackward(bool layer, int64_t rows, int64_t dim, const void* dy, const void* s, const void* weight,
                    const float* mean, const float* rstd, const void* dresidual, void* dx, float* dweight,
                    float* dbias, bool overwrite_dparams) override {
    Init();
    OpProfiler::Scope scope(&prof_, dresidual != nullptr ? "NormBackward (+residual grad)" : "NormBackward");
    kc::NormBackwardArgs a;
    a.kind = layer ? kc::NormKind::kLayer : kc::NormKind::kRms;
    a.rows = rows;
    a.dim = dim;
    a.dy = static_cast<const bf16*>(dy);
    a.s = static_cast<const bf16*>(s);
    a.weight = static_cast<const bf16*>(weight);
    a.mean = mean;
    a.rstd = rstd;
    a.dresidual = static_cast<const bf16*>(dresidual);
    a.dx = static_cast<bf16*>(dx);
    a.dweight = dweight;
    a.dbias = dbias;
    a.accumulate = !overwrite_dparams;
    OK_OR_DIE(kc::NormBackward(a, alloc_, stream_));
  }

  void GatedForward(int act, int64_t rows, int64_t cols, const void* g, const void* u, int64_t ld_in, void* h,
                    int64_t ld_out) override {
    Init();
    OpProfiler::Scope scope(&prof_, "GatedForward");
    kc::GatedArgs a = GatedArgsOf(act, rows, cols, g, u, ld_in, ld_out);
    a.h = static_cast<bf16*>(h);
    OK_OR_DIE(kc::GatedForward(a, stream_));
  }

  void GatedBackward(int act, int64_t rows, int64_t cols, const void* g, const void* u, int64_t ld_in,
                     const void* dh, int64_t ld_out, void* dg, void* du) override {
    Init();
    OpProfiler::Scope scope(&prof_, "GatedBackward");
    kc::GatedArgs a = GatedArgsOf(act, rows, cols, g, u, ld_in, ld_out);
    a.dh = static_cast<const bf16*>(dh);
    a.dg = static_cast<bf16*>(dg);
    a.du = static_cast<bf16*>(du);
    OK_OR_DIE(kc::GatedBackward(a, stream_));
  }

  void Rope(bool inverse, void* x, int64_t rows, int64_t seq, int64_t heads, int64_t head_dim, int64_t row_stride,
            double theta) override {
    Init();
    OpProfiler::Scope scope(&prof_, inverse ? "Rope backward" : "Rope forward");
    const kc::RopeTable& table = RopeTableFor(seq, head_dim, theta);
    kc::RopeArgs a;
    a.x = static_cast<const bf16*>(x);
    a.y = static_cast<bf16*>(x);
    a.rows = rows;
    a.seq = seq;
    a.heads = heads;
    a.row_stride = row_stride;
    OK_OR_DIE(inverse ? kc::RopeBackward(table, a, stream_) : kc::RopeForward(table, a, stream_));
  }

  // kernels/cuda/attention (FA2-class) for head_dim 64 / 128; the plain warp-per-row kernel of
  // ops/cuda_ops.h otherwise, or everywhere with GYRE_CUDA_ATTENTION=plain (a cross-check).
  bool UseFlash(const CudaAttention& a) const {
    return !plain_attention_ && (a.head_dim == 64 || a.head_dim == 128);
  }

  void AttentionForward(const CudaAttention& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, "AttentionForward");
    if (!UseFlash(a)) {
      if (a.rope_theta > 0) {
        Rope(false, const_cast<void*>(a.q), a.batch * a.seq, a.seq, a.heads, a.head_dim,
             RowStrideOr(a.q_row_stride, a.heads, a.head_dim), a.rope_theta);
      }
      OK_OR_DIE(cuda_ops::PlainAttentionForward(Plain(a), stream_));
      return;
    }
    kc::AttentionForwardArgs f;
    SetFlashInputs(a, &f);
    f.out = static_cast<bf16*>(a.out);
    if (a.rope_theta > 0) {
      f.rope = &RopeTableFor(a.seq, a.head_dim, a.rope_theta);
      f.q_rotated = static_cast<bf16*>(const_cast<void*>(a.q));  // in place (see CudaAttention)
    }
    OK_OR_DIE(kc::AttentionForward(f, stream_));
  }

  void AttentionBackward(const CudaAttention& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, "AttentionBackward");
    if (!UseFlash(a)) {
      OK_OR_DIE(cuda_ops::PlainAttentionBackward(Plain(a), alloc_, stream_));
      if (a.rope_theta > 0) {
        const int64_t rows = a.batch * a.seq;
        Rope(true, a.dq, rows, a.seq, a.heads, a.head_dim, RowStrideOr(a.q_row_stride, a.heads, a.head_dim),
             a.rope_theta);
        Rope(true, a.dk, rows, a.seq, a.kv_heads, a.head_dim, RowStrideOr(a.kv_row_stride, a.kv_heads, a.head_dim),
             a.rope_theta);
      }
      return;
    }
    kc::AttentionBackwardArgs b;
    SetFlashInputs(a, &b);
    b.out = static_cast<const bf16*>(a.out);
    b.dout = static_cast<const bf16*>(a.dout);
    b.dq = static_cast<bf16*>(a.dq);
    b.dk = static_cast<bf16*>(a.dk);
    b.dv = static_cast<bf16*>(a.dv);
    if (a.rope_theta > 0) b.rope = &RopeTableFor(a.seq, a.head_dim, a.rope_theta);
    b.deterministic = a.deterministic;
    OK_OR_DIE(kc::AttentionBackward(alloc_, b, stream_));
  }

  double LinearCrossEntropy(const void* h, const void* w, int64_t tokens, int64_t dim, int64_t vocab,
                            const int32_t* host_targets, double loss_scale, void* dh, float* dw,
                            bool overwrite_dw, float logit_soft_cap) override {
    Init();
    OpProfiler::Scope scope(&prof_, "LinearCrossEntropy");
    kc::DeviceBuffer loss_sum;
    OK_OR_DIE(alloc_->Allocate(sizeof(double), &loss_sum));
    EnqueueLinearCrossEntropy(h, w, tokens, dim, vocab, host_targets, loss_scale, dh, dw, overwrite_dw, logit_soft_cap,
                              loss_sum.as<double>());
    double loss = 0;
    CUDA_OR_DIE(cudaMemcpyAsync(&loss, loss_sum.get(), sizeof(double), cudaMemcpyDeviceToHost, stream_));
    scope.Close();
    CUDA_OR_DIE(cudaStreamSynchronize(stream_));
    return loss;
  }

  int LinearCrossEntropyDeferred(const void* h, const void* w, int64_t tokens, int64_t dim, int64_t vocab,
                                 const int32_t* host_targets, double loss_scale, void* dh, float* dw,
                                 bool overwrite_dw, float logit_soft_cap) override {
    Init();
    OpProfiler::Scope scope(&prof_, "LinearCrossEntropy");
    int index = 0;
    double* slot = scalars_.Next(alloc_, stream_, &index);
    EnqueueLinearCrossEntropy(h, w, tokens, dim, vocab, host_targets, loss_scale, dh, dw, overwrite_dw, logit_soft_cap,
                              slot);
    return index;
  }

  std::vector<double> TakeDeferredScalars() override {
    Init();
    return scalars_.TakeAll(stream_);
  }

  void GroupNorm(bool backward, const GroupNormArgs& a) override {
    Init();
    // Labelled by mode: the xLSTM's output norm, its block norms and Mamba-2's gated norm are
    // different kernels of different cost.
    static constexpr const char* kLabels[2][3] = {
        {"GroupNorm forward (plain)", "GroupNorm forward (gated)", "GroupNorm forward (mLSTM out)"},
        {"GroupNorm backward (plain)", "GroupNorm backward (gated)", "GroupNorm backward (mLSTM out)"}};
    OpProfiler::Scope scope(&prof_, kLabels[backward ? 1 : 0][static_cast<int>(a.mode)]);
    OK_OR_DIE(backward ? cuda_ops::GroupNormBackward(a, alloc_, stream_) : cuda_ops::GroupNormForward(a, stream_));
  }

  void XlstmLargeGates(bool backward, const XlstmLargeGateArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, backward ? "XlstmLarge gates backward" : "XlstmLarge gates forward");
    OK_OR_DIE(backward ? cuda_ops::XlstmLargeGatesBackward(a, stream_) : cuda_ops::XlstmLargeGatesForward(a, stream_));
  }

  void XlstmLargeNormGate(bool backward, const XlstmLargeNormGateArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, backward ? "XlstmLarge norm + out gate backward" : "XlstmLarge norm + out gate forward");
    OK_OR_DIE(backward ? cuda_ops::XlstmLargeNormGateBackward(a, stream_) : cuda_ops::XlstmLargeNormGateForward(a, stream_));
  }

  void XlstmLargeHeadWidth(const XlstmLargeHeadWidthArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, a.dst_width > a.src_width ? "XlstmLarge q/k head pad" : "XlstmLarge dq/dk head cut");
    OK_OR_DIE(cuda_ops::XlstmLargeHeadWidth(a, stream_));
  }

  bool MlstmOutNormBackwardWithDots(const GroupNormArgs& a, const void* h_lo, float* dots) override {
    Init();
    if (!cuda_ops::MlstmOutNormDotsCovers(a, h_lo)) {
      GroupNorm(true, a);
      return false;
    }
    OpProfiler::Scope scope(&prof_, "GroupNorm backward (mLSTM out) + cell dots");
    OK_OR_DIE(cuda_ops::MlstmOutNormBackwardWithDots(a, h_lo, dots, alloc_, stream_));
    return true;
  }

  void BlockDiag(bool backward, const BlockDiagArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, a.w2 != nullptr ? (backward ? "BlockDiag backward (2 maps)" : "BlockDiag forward (2 maps)")
                                                    : (backward ? "BlockDiag backward" : "BlockDiag forward"));
    OK_OR_DIE(backward ? cuda_ops::BlockDiagBackward(a, alloc_, stream_) : cuda_ops::BlockDiagForward(a, alloc_, stream_));
  }

  bool BlockDiagQkv(const BlockDiagArgs& qk, const BlockDiagArgs& v) override {
    Init();
    if (!DecodeQkvOneLaunch() || !cuda_ops::BlockDiagQkvRowsCovers(qk, v)) {
      BlockDiag(false, qk);
      BlockDiag(false, v);
      return false;
    }
    OpProfiler::Scope scope(&prof_, "BlockDiag q, k, v forward (one launch, <= 16 rows)");
    OK_OR_DIE(cuda_ops::BlockDiagQkvRowsForward(qk, v, alloc_, stream_));
    return true;
  }

  void AddColumnBias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) override {
    Init();
    OpProfiler::Scope scope(&prof_, "AddColumnBias");
    OK_OR_DIE(cuda_ops::AddColumnBias(y, rows, cols, ld, bias, stream_));
  }

  void ColumnSum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out) override {
    Init();
    OpProfiler::Scope scope(&prof_, "ColumnSum");
    OK_OR_DIE(cuda_ops::ColumnSum(x, rows, cols, ld, out, alloc_, stream_));
  }

  void Conv1d(bool backward, const Conv1dArgs& a) override {
    Init();
    if (a.x_row_stride != 0 && a.x_row_stride != a.channels) {
      // x in rows of x_row_stride (the mLSTM fused up projection's x_m | z): the conv1d kernels
      // take packed rows, so x goes to packed scratch first (one [rows, C] copy; only where the
      // fused mLSTM kernels, which read it in place, are off or do not cover the shape).
      GYRE_CHECK(a.x_row_stride > a.channels, "Conv1d: x_row_stride %ld below %ld channels", (long)a.x_row_stride,
                 (long)a.channels);
      const int64_t rows = a.batch * a.seq;
      kc::DeviceBuffer packed;
      OK_OR_DIE(alloc_->Allocate(static_cast<size_t>(rows * a.channels) * 2 + 1, &packed));
      const size_t row_bytes = static_cast<size_t>(a.channels) * 2;
      Copy2D(packed.get(), row_bytes, a.x, static_cast<size_t>(a.x_row_stride) * 2, row_bytes, static_cast<size_t>(rows));
      Conv1dArgs b = a;
      b.x = packed.get();
      b.x_row_stride = 0;
      Conv1d(backward, b);
      return;  // (packed goes back to the cache, stream-ordered)
    }
    OpProfiler::Scope scope(&prof_, backward ? "Conv1d backward" : "Conv1d forward");
    if (!backward) {
      kc::Conv1dForwardArgs f;
      SetConv1dInputs(a, &f);
      f.y = static_cast<bf16*>(a.y);
      OK_OR_DIE(kc::Conv1dForward(f, stream_));
      return;
    }
    kc::Conv1dBackwardArgs b;
    SetConv1dInputs(a, &b);
    b.dy = static_cast<const bf16*>(a.dy);
    b.dx = static_cast<bf16*>(a.dx);
    b.dx_row_stride = a.dx_row_stride;
    b.dw = a.dw;
    b.dbias = a.dbias;
    b.overwrite_dparams = a.overwrite_dparams;
    OK_OR_DIE(kc::Conv1dBackward(b, alloc_, stream_));
  }

  void MlstmConvQkv(const Conv1dArgs& conv, const BlockDiagArgs& qk, const BlockDiagArgs& v) override {
    Init();
    if (!cuda_ops::MlstmConvQkvFusable(conv, qk, v)) {
      Conv1d(false, conv);
      BlockDiag(false, qk);
      BlockDiag(false, v);
      return;
    }
    OpProfiler::Scope scope(&prof_, "Conv1d + BlockDiag q, k, v forward (fused)");
    OK_OR_DIE(cuda_ops::MlstmConvQkvForward(conv, qk, v, alloc_, stream_));
  }

  void MlstmConvVBackward(const Conv1dArgs& conv, const BlockDiagArgs& v) override {
    Init();
    if (!cuda_ops::MlstmConvVFusable(conv, v)) {
      Conv1d(true, conv);
      BlockDiag(true, v);
      return;
    }
    OpProfiler::Scope scope(&prof_, "Conv1d + BlockDiag v backward (fused)");
    OK_OR_DIE(cuda_ops::MlstmConvVBackward(conv, v, alloc_, stream_));
  }

  bool BlockDiagBackwardTc(const BlockDiagArgs& a) override {
    Init();
    if (!cuda_ops::BlockDiagBackwardTcCovers(a)) {
      BlockDiag(true, a);
      return false;
    }
    OpProfiler::Scope scope(&prof_, "BlockDiag backward (2 maps, tensor cores)");
    OK_OR_DIE(cuda_ops::BlockDiagBackwardTc(a, alloc_, stream_));
    return true;
  }

  // The mLSTM cell's shape and options (kc::MlstmShape, kc::MlstmOptions).
  struct MlstmForm {
    kc::MlstmShape shape;
    kc::MlstmOptions options;
  };
  static MlstmForm MlstmFormOf(const MlstmCellArgs& a) {
    MlstmForm f;
    f.shape.batch = a.batch;
    f.shape.seq_len = a.seq;
    f.shape.num_heads = a.heads;
    f.shape.dk = a.dk;
    f.shape.dv = a.dv;
    f.options.chunk_size = a.chunk;
    f.options.forget_gate = a.sigmoid_forget ? kc::MlstmForgetGate::kSigmoid : kc::MlstmForgetGate::kExponential;
    f.options.eps = a.eps;
    f.options.qk_scale = a.qk_scale;
    // GYRE_MLSTM_PERSIST unset or both: chunk 128's fwd_out and bwd_dqk on persistent grids
    // (kernels/cuda/mlstm.h, MlstmPersist; helpers persist17 and persistdqk17, the default since
    // session 17's merges: the same bytes, the xlstm[1:0]-125m step -1.9 and -1.2 ms); fwd_out /
    // dqk: one of the two; off: one block a tile. The forward and backward of a step get the same
    // value.
    static const kc::MlstmPersist persist = [] {
      const std::string v = EnvChoice("GYRE_MLSTM_PERSIST", {"off", "fwd_out", "dqk", "both"}, "both");
      if (v == "fwd_out") return kc::MlstmPersist::kFwdOut;
      if (v == "dqk") return kc::MlstmPersist::kDqk;
      if (v == "both") return kc::MlstmPersist::kBoth;
      return kc::MlstmPersist::kOff;
    }();
    f.options.persist = persist;
    return f;
  }

  size_t MlstmSavedBytes(const MlstmCellArgs& a) override {
    const auto [shape, options] = MlstmFormOf(a);
    OK_OR_DIE(kc::MlstmCheck(shape, options));
    return kc::MlstmChunkwiseSavedBytes(shape, options);
  }

  static kc::MlstmDeviceInputs MlstmInputsOf(const MlstmCellArgs& a) {
    kc::MlstmDeviceInputs in;
    in.q = static_cast<const bf16*>(a.q);
    in.k = static_cast<const bf16*>(a.k);
    in.v = static_cast<const bf16*>(a.v);
    in.igate = a.ig;
    in.fgate = a.fg;
    return in;
  }

  void Mlstm(bool backward, const MlstmCellArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, backward ? "Mlstm backward" : "Mlstm forward");
    const auto [shape, options] = MlstmFormOf(a);
    const kc::MlstmDeviceInputs in = MlstmInputsOf(a);
    if (!backward) {
      OK_OR_DIE(kc::MlstmChunkwiseForward(shape, options, in, {}, static_cast<bf16*>(a.h), a.saved, {}, stream_));
      return;
    }
    kc::DeviceBuffer scratch;
    OK_OR_DIE(alloc_->Allocate(std::max<size_t>(1, kc::MlstmChunkwiseBackwardScratchBytes(shape, options)), &scratch));
    kc::MlstmDeviceGrads g;
    g.dq = static_cast<bf16*>(a.dq);
    g.dk = static_cast<bf16*>(a.dk_out);
    g.dv = static_cast<bf16*>(a.dv_out);
    g.digate = a.dig;
    g.dfgate = a.dfg;
    if (a.dh_dots != nullptr) {
      OK_OR_DIE(kc::MlstmChunkwiseBackwardWithDots(shape, options, in, {}, static_cast<const bf16*>(a.h), a.saved,
                                                   static_cast<const bf16*>(a.dh), a.dh_dots, {}, g, {},
                                                   scratch.get(), stream_));
      return;
    }
    OK_OR_DIE(kc::MlstmChunkwiseBackward(shape, options, in, {}, static_cast<const bf16*>(a.h), a.saved,
                                         static_cast<const bf16*>(a.dh), {}, g, {}, scratch.get(), stream_));
  }

  const void* MlstmSavedHLo(const MlstmCellArgs& a) override {
    const auto [shape, options] = MlstmFormOf(a);
    return kc::MlstmChunkwiseSavedHLo(shape, options, a.saved);
  }

  size_t MlstmTokenBytes(const MlstmCellArgs& a) override {
    const auto [shape, options] = MlstmFormOf(a);
    OK_OR_DIE(kc::MlstmCheck(shape, options));
    return kc::MlstmChunkwiseTokenBytes(shape, options);
  }

  void MlstmKeepTokens(const MlstmCellArgs& a) override {
    Init();
    const auto [shape, options] = MlstmFormOf(a);
    OK_OR_DIE(kc::MlstmChunkwiseCopyTokens(shape, options, a.saved, a.tokens, stream_));
  }

  void MlstmRecomputeStates(const MlstmCellArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, "Mlstm recompute states");
    const auto [shape, options] = MlstmFormOf(a);
    const kc::MlstmDeviceInputs in = MlstmInputsOf(a);
    OK_OR_DIE(kc::MlstmChunkwiseRecomputeStates(shape, options, in, {}, a.tokens, a.saved, stream_));
  }

  static kc::SlstmShape SlstmShapeOf(const SlstmCellArgs& a) {
    kc::SlstmShape shape;
    shape.batch = a.batch;
    shape.seq_len = a.seq;
    shape.num_heads = a.heads;
    shape.head_dim = a.head_dim;
    return shape;
  }

  size_t SlstmSavedBytes(const SlstmCellArgs& a) override {
    OK_OR_DIE(kc::SlstmCheck(SlstmShapeOf(a)));
    return static_cast<size_t>(kc::SlstmSavedBytes(SlstmShapeOf(a)));
  }

  void Slstm(bool backward, const SlstmCellArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, backward ? "Slstm backward" : "Slstm forward");
    if (!backward) {
      kc::SlstmForwardArgs f;
      f.shape = SlstmShapeOf(a);
      f.gx = static_cast<const bf16*>(a.gx);
      f.r = static_cast<const bf16*>(a.r);
      f.h = static_cast<bf16*>(a.h);
      f.saved = a.saved;
      OK_OR_DIE(kc::SlstmForward(f, alloc_, stream_));
      return;
    }
    kc::SlstmBackwardArgs b;
    b.shape = SlstmShapeOf(a);
    b.r = static_cast<const bf16*>(a.r);
    b.h = static_cast<const bf16*>(a.h);
    b.saved = a.saved;
    b.dh = static_cast<const bf16*>(a.dh);
    b.d_gx = static_cast<bf16*>(a.dgx);
    b.dr = a.dr;
    OK_OR_DIE(kc::SlstmBackward(b, gemm_.get(), alloc_, stream_));
  }

  size_t SsdSavedBytes(const SsdCellArgs& a) override {
    const auto [shape, options] = SsdFormOf(a);
    OK_OR_DIE(kc::SsdCheck(shape, options));
    return static_cast<size_t>(kc::SsdSavedBytes(shape, options));
  }

  void Ssd(bool backward, const SsdCellArgs& a) override {
    Init();
    OpProfiler::Scope scope(&prof_, backward ? "Ssd backward" : "Ssd forward");
    if (!backward) {
      kc::SsdForwardArgs f;
      SetSsdInputs(a, &f);
      f.y = static_cast<bf16*>(a.y);
      OK_OR_DIE(kc::SsdForward(f, stream_));
      return;
    }
    kc::SsdBackwardArgs b;
    SetSsdInputs(a, &b);
    b.dy = static_cast<const bf16*>(a.dy);
    b.dx = static_cast<bf16*>(a.dx);
    b.ddt = a.ddt;
    b.db = static_cast<bf16*>(a.db);
    b.dc = static_cast<bf16*>(a.dc);
    b.da_log = a.da_log;
    b.ddt_bias = a.ddt_bias;
    b.dd = a.dd;
    OK_OR_DIE(kc::SsdBackward(b, alloc_, stream_));
  }

  std::unique_ptr<CudaAdamW> NewAdamW(const std::vector<CudaAdamWTensor>& tensors, double beta1, double beta2,
                                      double eps, double weight_decay) override {
    Init();
    auto adam = std::make_unique<Adam>(alloc_, stream_, &prof_, &scalars_);
    kc::AdamWHyper hyper;
    hyper.beta1 = beta1;
    hyper.beta2 = beta2;
    hyper.eps = eps;
    hyper.weight_decay = weight_decay;
    adam->Init(tensors, hyper);
    return adam;
  }

  void SetOpProfiling(bool on) override {
    Init();
    prof_.set_on(on);
  }

  std::vector<OpTime> TakeOpProfile() override {
    Init();
    return prof_.Take();
  }

  OpGaps TakeOpGaps() override { return prof_.TakeGaps(); }

  void OpProfileStepStart() override {
    Init();
    if (!capturing_) prof_.MarkStepStart();
  }

  int OpProfileBegin(const char* label) override {
    Init();
    return capturing_ ? -1 : prof_.Open(label);
  }
  void OpProfileEnd(int index) override { prof_.Close(index); }

  MemoryStats Memory() override {
    Init();
    const kc::AllocatorStats a = alloc_->stats();
    return {a.bytes_in_use, a.bytes_cached, a.peak_bytes_in_use};
  }

  void ReleaseCachedMemory() override {
    Init();
    OK_OR_DIE(alloc_->ReleaseCached());
  }

  DeviceMemory DeviceMemoryNow() override {
    Init();
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_OR_DIE(cudaMemGetInfo(&free_bytes, &total_bytes));
    return {free_bytes, total_bytes};
  }

 private:
  // The fused LM head + cross entropy (kernels/cuda/cross_entropy.h), its loss sum into the device
  // double *loss_sum; no read-back.
  void EnqueueLinearCrossEntropy(const void* h, const void* w, int64_t tokens, int64_t dim, int64_t vocab,
                                 const int32_t* host_targets, double loss_scale, void* dh, float* dw,
                                 bool overwrite_dw, float logit_soft_cap, double* loss_sum) {
    kc::DeviceBuffer targets, token_loss;
    OK_OR_DIE(alloc_->Allocate(tokens * sizeof(int32_t), &targets));
    OK_OR_DIE(alloc_->Allocate(tokens * sizeof(float), &token_loss));
    Upload(targets.get(), host_targets, tokens * sizeof(int32_t));
    kc::LinearCrossEntropyArgs a;
    a.tokens = tokens;
    a.dim = dim;
    a.vocab = vocab;
    a.h = static_cast<const bf16*>(h);
    a.w = static_cast<const bf16*>(w);
    a.targets = targets.as<int32_t>();
    a.loss_scale = static_cast<float>(loss_scale);
    a.token_loss = token_loss.as<float>();
    a.loss_sum = loss_sum;
    a.dh = static_cast<bf16*>(dh);
    a.dw = dw;
    a.overwrite_dw = overwrite_dw;
    // Token rows per chunk: the bf16 logits buffer is chunk x vocab (16384 x 50304: 1.65 GB, what
    // 8192 fp32 rows took before). Session 6 (lce6, H100, 32K x 50304 x 768, bench/lce_bench.cc):
    // 8192 / 16384 / 32768 took 14.76 / 13.46 / 13.80 ms (first call: within 0.25 ms); at 16384
    // the dh GEMM [chunk, 768] is 2.9 waves of 128x256 tiles on 132 SMs instead of 1.45.
    a.chunk_tokens = 16384;
    // GYRE_LCE_ROWS (kernels/cuda/cross_entropy_notes.md): "lean" (default since session 18) the
    // row kernel with fewer instructions a logit; "staged" its reference, the same bits.
    static const bool lean_rows = EnvChoice("GYRE_LCE_ROWS", {"lean", "staged"}, "lean") == "lean";
    a.lean_rows = lean_rows;
    a.logit_soft_cap = logit_soft_cap;
    OK_OR_DIE(kc::LinearCrossEntropy(gemm_.get(), alloc_, a, stream_));
  }

  // Host -> device uploads of the step (token ids, targets, the embedding plan) through pinned
  // staging buffers (kernels/cuda/pinned_upload.h, ops/step_notes.md), except during a graph
  // capture (an event record there would be captured; eager steps are never captured).
  bool StagedUploads() const { return !capturing_; }
  void Upload(void* device_dst, const void* host_src, size_t bytes) {
    if (StagedUploads()) {
      OK_OR_DIE(uploads_.Upload(device_dst, host_src, bytes, stream_));
      return;
    }
    CUDA_OR_DIE(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  }

  // "gemm M x N x K NT -> f32 (+=)": the row-major shape, transposes, output type, accumulation.
  static std::string GemmLabel(const CudaGemm& g) {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "gemm %lld x %lld x %lld %c%c -> %s%s", static_cast<long long>(g.m),
                  static_cast<long long>(g.n), static_cast<long long>(g.k), g.trans_a ? 'T' : 'N',
                  g.trans_b ? 'T' : 'N', g.c_f32 ? "f32" : "bf16", g.beta != 0.f ? " (+=)" : "");
    return buf;
  }

  static bool BF16(DType dtype) {
    GYRE_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "CUDA pointwise op on %s", DTypeName(dtype));
    return dtype == DType::kBF16;
  }

  static cuda_ops::PlainAttentionArgs Plain(const CudaAttention& a) {
    cuda_ops::PlainAttentionArgs p;
    p.batch = a.batch;
    p.seq = a.seq;
    p.heads = a.heads;
    p.kv_heads = a.kv_heads;
    p.head_dim = a.head_dim;
    p.q = a.q;
    p.k = a.k;
    p.v = a.v;
    p.q_row_stride = a.q_row_stride;
    p.kv_row_stride = a.kv_row_stride;
    p.out = a.out;
    p.lse = a.lse;
    p.dout = a.dout;
    p.dq = a.dq;
    p.dk = a.dk;
    p.dv = a.dv;
    return p;
  }

  const kc::RopeTable& RopeTableFor(int64_t seq, int64_t head_dim, double theta) {
    auto& slot = rope_tables_[{head_dim, theta}];
    if (slot == nullptr || slot->max_positions < seq) {
      // The table's copy runs outside stream_ (BuildRopeTable completes it on the legacy stream
      // before returning), so stream_ is drained first: the allocator hands out blocks that
      // stream_'s pending kernels may still use, ordered only on stream_. Once per head size and
      // theta per process (helper det22, kernels/cuda/attention_notes.md). Not inside a graph
      // capture (a capture's allocations come from its own pool; a sync would end the capture).
      if (!capturing_) CUDA_OR_DIE(cudaStreamSynchronize(stream_));
      slot = std::make_unique<kc::RopeTable>();
      OK_OR_DIE(kc::BuildRopeTable(std::max<int64_t>(seq, 2048), head_dim, theta, alloc_, slot.get()));
    }
    return *slot;
  }

  void Init() {
    std::call_once(once_, [this] {
      const char* attn = std::getenv("GYRE_CUDA_ATTENTION");
      plain_attention_ = attn != nullptr && std::string(attn) == "plain";
      CUDA_OR_DIE(cudaSetDevice(0));
      CUDA_OR_DIE(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      prof_.set_stream(stream_);
      alloc_ = new kc::DeviceAllocator();  // leaked: blocks may be freed during static destruction
      std::unique_ptr<kc::GemmContext> gemm;
      OK_OR_DIE(kc::GemmContext::Create(alloc_, &gemm));
      gemm_ = std::move(gemm);
    });
  }

  std::once_flag once_;
  OpProfiler prof_;
  // Graph capture (BeginCapture .. EndCapture): the open capture's pool, failure and the blocks
  // allocated outside the allocator after a capture miss.
  bool capturing_ = false;
  uint64_t pool_ = 0;
  std::string capture_error_;
  std::vector<void*> capture_spill_;
  std::vector<size_t> capture_misses_;  // bytes of the allocations that missed the cache
  bool plain_attention_ = false;
  cudaStream_t stream_ = nullptr;
  kc::DeviceAllocator* alloc_ = nullptr;
  std::unique_ptr<kc::GemmContext> gemm_;
  kc::EmbeddingBackwardPlan embedding_plan_;
  DeferredScalars scalars_;
  kc::PinnedUploads uploads_;
  std::map<std::pair<int64_t, double>, std::unique_ptr<kc::RopeTable>> rope_tables_;
};

struct Registrar {
  Registrar() { RegisterCudaBackend(new Backend()); }  // leaked, see the file comment
};
Registrar registrar;

}  // namespace
}  // namespace gyre::ops
