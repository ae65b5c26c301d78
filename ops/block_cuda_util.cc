#include "ops/block_cuda_util.h"

#include <utility>

#include "ops/cuda_backend.h"

namespace gyre::ops {

Tensor CudaEmpty(Shape shape, DType dtype) { return Tensor::Empty(std::move(shape), dtype, Device::kCuda); }

Tensor CudaBytes(size_t bytes) {
  return Tensor::Empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::kF32, Device::kCuda);
}

const void* BytePtr(const Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

void* MutBytePtr(const Tensor& t, int64_t elements) {
  return static_cast<char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

void Mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
        void* c, int64_t ldc, bool c_f32, float beta) {
  if (m == 0 || n == 0) return;
  CudaGemm g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m; g.n = n; g.k = k;
  g.a = a; g.lda = lda;
  g.b = b; g.ldb = ldb;
  g.c = c; g.ldc = ldc;
  g.c_f32 = c_f32;
  g.beta = beta;
  Cuda().Gemm(g);
}

void StateOnDevice(Tensor* t) {
  if (!IsCuda(*t)) *t = t->To(DType::kF32).ToDevice(Device::kCuda);
}

void StepMlstmCells(CudaMlstmStepArgs s, int64_t chunk, bool rewindable, Tensor* c, Tensor* n, Tensor* m,
                    StateHistory* history) {
  Tensor hc, hn, hm;
  if (rewindable && chunk > 1) {
    hc = Tensor::Empty({(chunk - 1) * c->numel()}, DType::kF32, Device::kCuda);
    hn = Tensor::Empty({(chunk - 1) * n->numel()}, DType::kF32, Device::kCuda);
    hm = Tensor::Empty({(chunk - 1) * m->numel()}, DType::kF32, Device::kCuda);
    s.c_history = hc.data<float>(); s.n_history = hn.data<float>(); s.m_history = hm.data<float>();
  }
  s.c = c->data<float>(); s.n = n->data<float>(); s.m = m->data<float>();
  s.positions = chunk;
  const bool chunk_kernel = chunk > 1 || RowInvariantDecode();
  Tensor n_out, m_out;
  if (chunk_kernel) {
    n_out = Tensor::Empty(n->shape(), DType::kF32, Device::kCuda);
    m_out = Tensor::Empty(m->shape(), DType::kF32, Device::kCuda);
    s.n_out = n_out.data<float>();
    s.m_out = m_out.data<float>();
  }
  if (s.batch > 0) CudaInfer().MlstmStep(s);
  if (chunk_kernel && Cuda().Capturing()) {
    n->CopyFrom(n_out);
    m->CopyFrom(m_out);
  } else if (chunk_kernel) {
    *n = n_out;
    *m = m_out;
  }
  if (hc.defined()) {
    for (int64_t j = 0; j + 1 < chunk; ++j) {
      history->Adopt({hc.Slice(j * c->numel(), c->shape()), hn.Slice(j * n->numel(), n->shape()),
                      hm.Slice(j * m->numel(), m->shape())});
    }
  }
}

}  // namespace gyre::ops
