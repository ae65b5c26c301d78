// The seam between ops/ and the CUDA kernels (kernels/cuda): an interface that the CPU-only
// library declares and that `//ops:cuda_backend` (built only with --config=cuda) implements and
// registers at static-initialisation time. Binaries that want CUDA link that library through
// `select` on //third_party/cuda:enabled; every other binary builds and behaves exactly as
// before, and a CUDA tensor there fails with "this binary was built without CUDA".
//
// The implementation holds one process-wide CUDA context: device 0, one stream (all work is
// ordered on it), the caching DeviceAllocator (no cudaMalloc in a warm step loop) and the
// cuBLASLt GemmContext. The methods are pointer-level (bf16 = 2-byte storage, fp32 statistics
// and gradients); ops/*.cc allocate outputs as Tensors and call them from their CUDA branches.
// Failures of CUDA calls abort with the CUDA message (ops' layer API has no Status; an
// out-of-memory in a step is not recoverable there), except inside a CUDA graph capture, where
// they fail the capture instead (BeginCapture / EndCapture below; nothing has run yet).
//
// Thread-safety: one thread drives the backend (the training loop), like the CPU layers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops/cuda_recurrent.h"

namespace gyre::ops {

enum class Device : uint8_t;
enum class DType : uint8_t;

// Row-major C [m, n] = alpha op(A) op(B) + beta C; A, B bf16; C bf16 or fp32.
struct CudaGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  bool c_f32 = false;
  float alpha = 1.f, beta = 0.f;
  const void* c_in = nullptr;  // beta's operand when not C itself (same dtype/ldc): C = AB + beta·c_in
};

// Causal attention on rotated bf16 q/k/v views (row strides in elements); GQA by head index.
struct CudaAttention {
  int64_t batch = 0, seq = 0, heads = 0, kv_heads = 0, head_dim = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_row_stride = 0, kv_row_stride = 0;
  void* out = nullptr;         // packed [B*T, heads*head_dim]
  float* lse = nullptr;        // [B, heads, T]
  // Backward only.
  const void* dout = nullptr;  // packed
  void* dq = nullptr;          // same layout as q
  void* dk = nullptr;          // same layout as k
  void* dv = nullptr;          // same layout as v
  // > 0: RoPE (whole head, theta, position r % seq) fused into the kernels. Forward: q holds
  // un-rotated values and is rotated IN PLACE (the kernel writes the rotated rows back for the
  // backward); k must already be rotated. Backward: q and k hold the rotated values and dq, dk
  // come back w.r.t. the un-rotated ones. 0: q, k rotated by the caller, dq, dk w.r.t. them.
  double rope_theta = 0;
  // Backward: dQ summed in a fixed order (bitwise repeatable; kernels/cuda/attention.h).
  bool deterministic = false;
};

struct CudaAdamWTensor {
  float* master = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  void* compute = nullptr;  // bf16 copy written each step, or null
  int64_t numel = 0;
  bool decay = true;
};

// Multi-tensor AdamW with on-device global-norm clipping (kernels/cuda/adamw.h).
class CudaAdamW {
 public:
  virtual ~CudaAdamW() = default;
  // One step; returns ||g|| before clipping (reads it back: one stream synchronisation, which
  // also fetches the backend's pending deferred scalars: CudaBackend::TakeDeferredScalars). A
  // non-finite norm means the device skipped the update; the step count is then not advanced.
  virtual double Step(double lr, double max_grad_norm) = 0;
  virtual int64_t steps_taken() const = 0;
  // Restores the count of applied updates (AdamW::LoadState).
  virtual void set_steps_taken(int64_t t) = 0;
};

class CudaBackend {
 public:
  virtual ~CudaBackend() = default;

  // Memory. Copies between host and device synchronise the stream; device-to-device copies and
  // memsets are ordered on it.
  virtual std::shared_ptr<void> Allocate(size_t bytes) = 0;
  // Page-locked host memory (cudaHostAlloc), or null when the driver refuses it. Device-to-host
  // copies into it run at link speed without the driver's pageable staging (checkpoint snapshots:
  // ~1 s instead of ~12 s for a 1.3B model's 16 GB of fp32 state). Pinning costs time once per
  // allocation, so callers keep and reuse such buffers. Thread-safe (binds the calling thread to
  // the backend's device).
  virtual std::shared_ptr<void> AllocatePinnedHost(size_t bytes) = 0;
  virtual void CopyBytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) = 0;
  // Device-to-device strided copy of `height` rows of `width` bytes.
  virtual void Copy2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                      size_t height) = 0;
  virtual void Memset0(void* dst, size_t bytes) = 0;
  virtual void Synchronize() = 0;
  virtual std::string DeviceDescription() = 0;
  // The cudaStream_t every op is ordered on (as void*): the distributed worker records CUDA
  // events on it (gradient buckets ready, step timing) for its communication stream to wait on.
  virtual void* ComputeStream() = 0;

  // Pointwise (device arrays of n elements): dtype conversion (f32 <-> bf16), y += alpha x
  // (fp32 math), out = a + b, y *= s, Σ x² (double).
  virtual void Convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) = 0;
  // f32 <-> bf16 of a rows x cols block whose rows are src_ld / dst_ld elements apart (e.g. into
  // a column block of a wider gradient: Mamba-2's ddt into din, no separate strided copy).
  virtual void ConvertRows(const void* src, DType src_dtype, int64_t src_ld, void* dst, DType dst_dtype,
                           int64_t dst_ld, int64_t rows, int64_t cols) = 0;
  virtual void Axpy(void* y, const void* x, DType dtype, double alpha, int64_t n) = 0;
  virtual void Add(void* out, const void* a, const void* b, DType dtype, int64_t n) = 0;
  virtual void Scale(void* y, DType dtype, double s, int64_t n) = 0;
  virtual double SumSquares(const void* x, DType dtype, int64_t n) = 0;

  virtual void Gemm(const CudaGemm& g) = 0;

  // Embedding: host ids (the data loader has them); bf16 table, fp32 dweight (accumulates, or
  // with `overwrite` is set: sums, 0 for ids no row holds; the deferred-zero rule's first write).
  virtual void EmbeddingForward(const int32_t* host_ids, int64_t rows, const void* table, int64_t vocab,
                                int64_t dim, void* out) = 0;
  virtual void EmbeddingBackward(const int32_t* host_ids, int64_t rows, const void* dy, float* dweight,
                                 int64_t vocab, int64_t dim, bool overwrite) = 0;

  // RMSNorm / LayerNorm over the last dim (kernels/cuda/norm.h), optional residual add.
  virtual void NormForward(bool layer, int64_t rows, int64_t dim, double eps, const void* x, const void* residual,
                           void* residual_out, const void* weight, const void* bias, void* y, float* mean,
                           float* rstd) = 0;
  // dweight / dbias accumulate, or are overwritten with `overwrite_dparams` (the deferred-zero
  // rule's first write, ops/module.h).
  virtual void NormBackward(bool layer, int64_t rows, int64_t dim, const void* dy, const void* s,
                            const void* weight, const float* mean, const float* rstd, const void* dresidual,
                            void* dx, float* dweight, float* dbias, bool overwrite_dparams) = 0;

  // Gated activation h = act(g) ⊙ u over 2-D views with row strides (act: 0 SiLU, 1 GeLU).
  virtual void GatedForward(int act, int64_t rows, int64_t cols, const void* g, const void* u, int64_t ld_in,
                            void* h, int64_t ld_out) = 0;
  virtual void GatedBackward(int act, int64_t rows, int64_t cols, const void* g, const void* u, int64_t ld_in,
                             const void* dh, int64_t ld_out, void* dg, void* du) = 0;

  // RoPE (rotate half, whole head) in place on `heads` heads of rows with `row_stride`; position
  // r % seq. inverse = backward.
  virtual void Rope(bool inverse, void* x, int64_t rows, int64_t seq, int64_t heads, int64_t head_dim,
                    int64_t row_stride, double theta) = 0;

  virtual void AttentionForward(const CudaAttention& a) = 0;
  virtual void AttentionBackward(const CudaAttention& a) = 0;

  // Fused LM head + cross-entropy (kernels/cuda/cross_entropy.h): returns loss_scale · Σ loss;
  // dh (bf16, overwritten) and dw (fp32, accumulated; overwritten with `overwrite_dw`) may be null.
  // logit_soft_cap > 0: the loss over c · tanh(logits / c) (xLSTM Large; 0 = off, the kernels
  // of every other model, LinearCrossEntropyArgs::logit_soft_cap).
  virtual double LinearCrossEntropy(const void* h, const void* w, int64_t tokens, int64_t dim, int64_t vocab,
                                    const int32_t* host_targets, double loss_scale, void* dh, float* dw,
                                    bool overwrite_dw, float logit_soft_cap = 0.f) = 0;
  // The same without a read-back: the loss stays in a device slot and the return value is its
  // index in the next TakeDeferredScalars. The training step's form (ops/step_notes.md): the
  // optimizer's read-back (CudaAdamW::Step) fetches the slots with its own state, so a step
  // synchronises once, at its end, instead of also after the LM head, before the backward is
  // enqueued.
  virtual int LinearCrossEntropyDeferred(const void* h, const void* w, int64_t tokens, int64_t dim, int64_t vocab,
                                         const int32_t* host_targets, double loss_scale, void* dh, float* dw,
                                         bool overwrite_dw, float logit_soft_cap = 0.f) = 0;
  // The deferred scalars since the last take, in slot order (synchronises the stream only when
  // some have not been fetched by a read-back yet). One user at a time: indices count from the
  // last take.
  virtual std::vector<double> TakeDeferredScalars() = 0;

  // Recurrent blocks (ops/cuda_recurrent.h): glue kernels of ops/recurrent_cuda.h and the cells
  // of kernels/cuda. `backward` selects the backward pass of the same arguments.
  virtual void GroupNorm(bool backward, const GroupNormArgs& a) = 0;
  // xLSTM Large glue (ops/xlstm_large_cuda.h): the soft-capped gates with their bias, and the
  // per-head LayerNorm with the output gate LN(h)·w ⊙ σ(o) in one kernel each way
  // (XlstmLargeNormGateArgs); `backward` selects the backward of the same arguments.
  virtual void XlstmLargeGates(bool backward, const XlstmLargeGateArgs& a) = 0;
  virtual void XlstmLargeNormGate(bool backward, const XlstmLargeNormGateArgs& a) = 0;
  // The per-head zero padding / cutting of q, k and dq, dk (XlstmLargeHeadWidthArgs).
  virtual void XlstmLargeHeadWidth(const XlstmLargeHeadWidthArgs& a) = 0;
  // The mLSTM output norm's backward (a.mode kMlstmOutput) that also writes the cell's dots
  // [rows, groups] fp32 = Σ_group bf16(dh)·(h + h_lo) (ops/recurrent_cuda.h
  // MlstmOutNormBackwardWithDots; h_lo: MlstmSavedHLo, null = 0). Returns whether it did; where
  // its kernel does not cover `a`, exactly GroupNorm(true, a), dots untouched, and false.
  virtual bool MlstmOutNormBackwardWithDots(const GroupNormArgs& a, const void* h_lo, float* dots) = 0;
  virtual void BlockDiag(bool backward, const BlockDiagArgs& a) = 0;
  // BlockDiag(false, qk) then BlockDiag(false, v) for the mLSTM q, k, v maps with the gates (the
  // decode step's QkvGatesCuda): in one launch (ops/recurrent_cuda.h BlockDiagQkvRowsForward, the
  // same bits) when DecodeQkvOneLaunch() (ops/cuda_infer.h) is on and its kernel covers them (at
  // most 16 rows); otherwise exactly those two calls. Returns whether the one launch ran.
  virtual bool BlockDiagQkv(const BlockDiagArgs& qk, const BlockDiagArgs& v) = 0;
  virtual void AddColumnBias(void* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) = 0;
  virtual void ColumnSum(const void* x, int64_t rows, int64_t cols, int64_t ld, float* out) = 0;
  virtual void Conv1d(bool backward, const Conv1dArgs& a) = 0;
  // The mLSTM block's conv1d forward and the q/k/v block-diagonal maps with the fused gates that
  // read its input and output, in one pass (ops/recurrent_cuda.h MlstmConvQkvForward): the
  // arguments of Conv1d(false, conv), BlockDiag(false, qk), BlockDiag(false, v); where the fused
  // kernel does not cover them, exactly those three calls.
  virtual void MlstmConvQkv(const Conv1dArgs& conv, const BlockDiagArgs& qk, const BlockDiagArgs& v) = 0;
  // The mLSTM block's conv1d backward and the v map's backward with its fused gates, in one pass
  // (ops/recurrent_cuda.h MlstmConvVBackward): the arguments of Conv1d(true, conv) and
  // BlockDiag(true, v) with v.dx == conv.dx accumulated; where the fused kernel does not cover
  // them, exactly those two calls.
  virtual void MlstmConvVBackward(const Conv1dArgs& conv, const BlockDiagArgs& v) = 0;
  // BlockDiag(true, a) of two 4x4 maps with the mLSTM gates, the row sums on tensor cores
  // (ops/recurrent_cuda.h BlockDiagBackwardTc): the same outputs. Returns whether that kernel ran;
  // where it does not cover `a`, exactly BlockDiag(true, a) and false.
  virtual bool BlockDiagBackwardTc(const BlockDiagArgs& a) = 0;
  virtual size_t MlstmSavedBytes(const MlstmCellArgs& a) = 0;
  virtual void Mlstm(bool backward, const MlstmCellArgs& a) = 0;
  // Where the forward's a.saved keeps h's lo part (kernels/cuda/mlstm.h MlstmChunkwiseSavedHLo),
  // or null (no lo part at this precision).
  virtual const void* MlstmSavedHLo(const MlstmCellArgs& a) = 0;
  // States-only recomputation (kernels/cuda/mlstm.h MlstmChunkwiseRecomputeStates): a.tokens
  // (MlstmTokenBytes) <- the per-token part of a forward's a.saved; a.saved <- the forward's bytes
  // from q, k, v, gates and a.tokens (gate scan + state_fwd; h is not rerun).
  virtual size_t MlstmTokenBytes(const MlstmCellArgs& a) = 0;
  virtual void MlstmKeepTokens(const MlstmCellArgs& a) = 0;
  virtual void MlstmRecomputeStates(const MlstmCellArgs& a) = 0;
  virtual size_t SlstmSavedBytes(const SlstmCellArgs& a) = 0;
  virtual void Slstm(bool backward, const SlstmCellArgs& a) = 0;
  virtual size_t SsdSavedBytes(const SsdCellArgs& a) = 0;
  virtual void Ssd(bool backward, const SsdCellArgs& a) = 0;

  virtual std::unique_ptr<CudaAdamW> NewAdamW(const std::vector<CudaAdamWTensor>& tensors, double beta1,
                                              double beta2, double eps, double weight_decay) = 0;

  // CUDA graphs (ops/decode_graph.h). BeginCapture starts capturing the compute stream
  // (cudaStreamCaptureModeRelaxed) into a new graph with its own memory pool (the caching
  // allocator's graph pool, kernels/cuda/device_allocator.h): until EndCapture nothing runs,
  // every op above is recorded instead, allocations come from the free lists (a miss fails the
  // capture rather than calling cudaMalloc), and a failing CUDA call fails the capture (its
  // message kept) instead of stopping the process. EndCapture stops it and returns the
  // instantiated graph, or null and *error saying why (the first failure inside, or the
  // driver's). When the only failures were allocator cache misses, EndCapture allocates the
  // missed sizes once the capture is over, leaves them on the free lists and sets *retry: the
  // same capture again finds them. Destroying the graph waits for the stream, then returns the
  // pool's blocks. One capture at a time; the ops between the two calls must not synchronise
  // with the host.
  class Graph {
   public:
    virtual ~Graph() = default;
    // Runs the recorded work once on the compute stream (asynchronous).
    virtual void Launch() = 0;
    virtual int64_t nodes() const = 0;
  };
  virtual void BeginCapture() = 0;
  virtual std::unique_ptr<Graph> EndCapture(std::string* error, bool* retry) = 0;
  // Whether a capture is open (ops switch handle swaps to in-place copies while it is:
  // MlstmBlock::StepCuda).
  virtual bool Capturing() = 0;
  // Called by code outside this backend (ops/cuda_infer_impl.cc) when one of its CUDA calls
  // failed: during a capture, records `message` as the capture's failure and returns true (the
  // caller carries on; nothing runs until EndCapture discards the graph); otherwise false.
  virtual bool FailCapture(const std::string& message) = 0;
  // cudaMemcpyAsync on the compute stream without a synchronisation, between device memory and
  // page-locked host memory (AllocatePinnedHost) or within the device; capturable. The caller
  // keeps a host buffer untouched until the stream has passed the copy.
  virtual void CopyAsync(void* dst, const void* src, size_t bytes) = 0;

  // Per-op GPU time, for benchmarks. While on, every op above (and CudaAdamW::Step) is bracketed
  // by two CUDA events on the compute stream; GEMMs are labelled by shape and carry their FLOPs.
  // Nothing synchronises until TakeOpProfile, which waits for the stream and returns the sums
  // since the last take (busy time: gaps between ops, where the device waits for the host, are
  // in no label), then clears them. Off by default (no events, no cost).
  struct OpTime {
    std::string label;
    double seconds = 0;
    double flops = 0;  // GEMMs only
    int64_t calls = 0;
    // Device time in no op right before this op's calls (from the previous op's end, or from the
    // step mark for a step's first op), summed; nested ops (an op called inside another) none.
    double gap_seconds = 0;
  };
  virtual void SetOpProfiling(bool on) = 0;
  // cudaProfilerStart / Stop: brackets what an external profiler started with
  // `--profile-from-start off` records (Nsight Compute on the device machine; generate_bench
  // --profile_graph_steps). No effect without one.
  virtual void ProfilerRange(bool start) = 0;
  virtual std::vector<OpTime> TakeOpProfile() = 0;
  // The gaps of the last TakeOpProfile: the largest with the ops on either side, a histogram
  // by size, and the device's span of the marked steps (first mark -> last op of each step).
  struct OpGap {
    double seconds = 0;
    std::string before, after;  // "(step start)" for a step mark
  };
  struct OpGaps {
    std::vector<OpGap> largest;  // the 12 largest, largest first
    // by size: < 2 us, < 5 us, < 20 us, < 100 us, >= 100 us
    int64_t counts[5] = {0, 0, 0, 0, 0};
    double seconds[5] = {0, 0, 0, 0, 0};
    double span_seconds = 0;  // Σ over marked steps of (mark -> the step's last op end)
    int64_t steps = 0;        // step marks
  };
  virtual OpGaps TakeOpGaps() = 0;
  // Marks the start of a step for the gaps (an event alone, recorded when the host starts the
  // step: the step's first op gets the gap since then). No effect when profiling is off.
  virtual void OpProfileStepStart() = 0;
  // Brackets an op launched outside the backend (ops/cuda_infer.h's decode kernels) for the op
  // profile: Begin returns -1 when profiling is off (End(-1) does nothing). Never inside a graph
  // capture (benchmarks profile eager steps only).
  virtual int OpProfileBegin(const char* label) = 0;
  virtual void OpProfileEnd(int index) = 0;

  // The caching allocator's byte counts (class-rounded; kernels/cuda/device_allocator.h), for
  // benchmarks and memory tests: held by tensors now, on free lists now, and the most ever held.
  struct MemoryStats {
    uint64_t bytes_in_use = 0, bytes_cached = 0, peak_bytes_in_use = 0;
  };
  virtual MemoryStats Memory() = 0;
  // The driver's free and total bytes of the current device (cudaMemGetInfo): what the caching
  // allocator could still take, counting other users (NCCL, other processes).
  struct DeviceMemory {
    uint64_t free_bytes = 0, total_bytes = 0;
  };
  virtual DeviceMemory DeviceMemoryNow() = 0;
  // Returns every cached (free) block to the driver. For a process that runs one model after another
  // (the step benchmarks): the earlier model's blocks would otherwise stay cached in its size classes
  // and crowd the next model's, whose misses then release and re-take blocks every step
  // (bench/RESULTS.md, session 20: xlstm[1:0]-125m 136 ms after xlstm-large-bench, 122 ms alone).
  virtual void ReleaseCachedMemory() = 0;
};

// The registered backend, or null in a binary built without //ops:cuda_backend.
CudaBackend* CudaBackendOrNull();
// The registered backend; aborts with a clear message when there is none.
CudaBackend& Cuda();
// Called once by the CUDA backend library's static initialiser.
void RegisterCudaBackend(CudaBackend* backend);

}  // namespace gyre::ops
