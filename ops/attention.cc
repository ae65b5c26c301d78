#include "ops/attention.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "ops/cuda_backend.h"
#include "ops/cuda_infer.h"
#include "ops/gemm.h"
#include "ops/parallel.h"

namespace gyre::ops {
namespace {

struct RopeTable {
  // cos/sin [positions, D/2] for positions 0..max_pos.
  std::vector<double> cos, sin;
  int64_t half = 0;
};

// Rotary frequencies over the first `rotary_dim` features of a head (pairs i, i + rotary_dim/2).
RopeTable MakeRopeTable(int64_t max_pos, int64_t rotary_dim, double theta) {
  RopeTable t;
  t.half = rotary_dim / 2;
  t.cos.resize((max_pos + 1) * t.half);
  t.sin.resize((max_pos + 1) * t.half);
  for (int64_t p = 0; p <= max_pos; ++p) {
    for (int64_t i = 0; i < t.half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
      const double a = static_cast<double>(p) * inv_freq;
      t.cos[p * t.half + i] = std::cos(a);
      t.sin[p * t.half + i] = std::sin(a);
    }
  }
  return t;
}

// y[rows, heads*D] = rotate(x) at positions[row % seq]; inverse rotates by -angle.
template <typename T>
void RopeRows(const T* x, T* y, int64_t rows, int64_t seq, int64_t heads, int64_t head_dim,
              const RopeTable& table, const std::vector<int64_t>& positions, bool inverse) {
  const int64_t half = table.half;  // features >= 2 * half pass through unrotated
  const double sign = inverse ? -1.0 : 1.0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = positions[r % seq];
    const double* c = &table.cos[p * half];
    const double* s = &table.sin[p * half];
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + (r * heads + h) * head_dim;
      T* yr = y + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const double x1 = xr[i], x2 = xr[i + half];
        yr[i] = static_cast<T>(x1 * c[i] - sign * x2 * s[i]);
        yr[i + half] = static_cast<T>(x2 * c[i] + sign * x1 * s[i]);
      }
      for (int64_t i = 2 * half; i < head_dim; ++i) yr[i] = xr[i];
    }
  }
}

struct Positions {
  std::vector<int64_t> neighbour, grouped_q, grouped_k;
  bool self_extend = false;
  int64_t window = 0;
  int64_t max_pos = 0;
};

Positions MakePositions(int64_t seq, const AttentionOptions& o) {
  Positions p;
  p.neighbour.resize(seq);
  for (int64_t i = 0; i < seq; ++i) p.neighbour[i] = i;
  p.max_pos = seq > 0 ? seq - 1 : 0;
  p.self_extend = o.self_extend_group > 0;
  if (p.self_extend) {
    const int64_t g = o.self_extend_group, w = o.self_extend_window;
    p.window = w;
    p.grouped_q.resize(seq);
    p.grouped_k.resize(seq);
    for (int64_t i = 0; i < seq; ++i) {
      p.grouped_q[i] = i / g + w - w / g;
      p.grouped_k[i] = i / g;
      p.max_pos = std::max(p.max_pos, p.grouped_q[i]);
    }
  }
  return p;
}


// Rotated copies of q and k at the neighbour (and, with SelfExtend, the grouped) positions.
struct Rotated {
  Tensor qn, kn, qg, kg;
};

template <typename T>
Rotated Rotate(const AttentionSaved& s, const AttentionOptions& o, const Positions& pos,
                  const RopeTable& table) {
  Rotated r;
  const int64_t rows = s.batch * s.seq;
  r.qn = Tensor::EmptyLike(s.q);
  r.kn = Tensor::EmptyLike(s.k);
  RopeRows<T>(s.q.data<T>(), r.qn.data<T>(), rows, s.seq, o.heads, o.head_dim, table, pos.neighbour, false);
  RopeRows<T>(s.k.data<T>(), r.kn.data<T>(), rows, s.seq, o.kv_heads, o.head_dim, table, pos.neighbour, false);
  if (pos.self_extend) {
    r.qg = Tensor::EmptyLike(s.q);
    r.kg = Tensor::EmptyLike(s.k);
    RopeRows<T>(s.q.data<T>(), r.qg.data<T>(), rows, s.seq, o.heads, o.head_dim, table, pos.grouped_q, false);
    RopeRows<T>(s.k.data<T>(), r.kg.data<T>(), rows, s.seq, o.kv_heads, o.head_dim, table, pos.grouped_k, false);
  }
  return r;
}

// Query rows are processed in blocks of kRowBlock; a block's logits against the keys it can see
// ([rows, i1] with i1 = last row + 1) are one GEMM (two with SelfExtend, merged by the rule
// i - j < W), so memory per task is O(kRowBlock * T) and the products run in BLAS.
constexpr int64_t kRowBlock = 128;

// Fills s[r, j] (r in [i0, i1), j < i1, row stride ld) with scale * logit(i, j), -inf above the
// diagonal.
template <typename T>
void BlockLogits(const Rotated& r, const Positions& pos, const AttentionOptions& o, int64_t S, int64_t b,
                 int64_t h, int64_t hk, int64_t i0, int64_t i1, T scale, T* s, T* tmp) {
  const int64_t H = o.heads, Hk = o.kv_heads, D = o.head_dim;
  const int64_t rows = i1 - i0, ld = i1;
  const T* qn = r.qn.data<T>() + ((b * S + i0) * H + h) * D;
  const T* kn = r.kn.data<T>() + (b * S * Hk + hk) * D;
  Gemm<T>(false, true, rows, i1, D, scale, qn, H * D, kn, Hk * D, T(0), s, ld);
  if (pos.self_extend) {
    const T* qg = r.qg.data<T>() + ((b * S + i0) * H + h) * D;
    const T* kg = r.kg.data<T>() + (b * S * Hk + hk) * D;
    Gemm<T>(false, true, rows, i1, D, scale, qg, H * D, kg, Hk * D, T(0), tmp, ld);
    for (int64_t rr = 0; rr < rows; ++rr) {
      const int64_t i = i0 + rr;
      for (int64_t j = 0; j + pos.window <= i; ++j) s[rr * ld + j] = tmp[rr * ld + j];
    }
  }
  for (int64_t rr = 0; rr < rows; ++rr)
    for (int64_t j = i0 + rr + 1; j < i1; ++j) s[rr * ld + j] = -std::numeric_limits<T>::infinity();
}

template <typename T>
void ForwardCpu(AttentionSaved* s, const AttentionOptions& o) {
  const int64_t B = s->batch, S = s->seq, H = o.heads, Hk = o.kv_heads, D = o.head_dim;
  const int64_t group = H / Hk;
  const Positions pos = MakePositions(S, o);
  const RopeTable table = MakeRopeTable(pos.max_pos, o.rotary_dim > 0 ? o.rotary_dim : D, o.rope_theta);
  Rotated r = Rotate<T>(*s, o, pos, table);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  const T* v = s->v.data<T>();
  T* out = s->out.data<T>();
  double* lse = s->lse.data<double>();
  ParallelFor(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    std::vector<T> buf(kRowBlock * S), tmp(pos.self_extend ? kRowBlock * S : 0);
    for (int64_t i0 = 0; i0 < S; i0 += kRowBlock) {
      const int64_t i1 = std::min(S, i0 + kRowBlock), rows = i1 - i0, ld = i1;
      BlockLogits<T>(r, pos, o, S, b, h, hk, i0, i1, scale, buf.data(), tmp.data());
      for (int64_t rr = 0; rr < rows; ++rr) {
        T* row = buf.data() + rr * ld;
        const int64_t n = i0 + rr + 1;
        T m = row[0];
        for (int64_t j = 1; j < n; ++j) m = std::max(m, row[j]);
        double l = 0;
        for (int64_t j = 0; j < n; ++j) {
          row[j] = std::exp(row[j] - m);
          l += row[j];
        }
        const T inv = static_cast<T>(1.0 / l);
        for (int64_t j = 0; j < n; ++j) row[j] *= inv;
        for (int64_t j = n; j < ld; ++j) row[j] = T(0);
        lse[(b * H + h) * S + i0 + rr] = static_cast<double>(m) + std::log(l);
      }
      // out rows = P V
      Gemm<T>(false, false, rows, D, i1, T(1), buf.data(), ld, v + (b * S * Hk + hk) * D, Hk * D, T(0),
              out + ((b * S + i0) * H + h) * D, H * D);
    }
  });
}

template <typename T>
void BackwardCpu(const AttentionSaved& s, const Tensor& dout, const AttentionOptions& o, Tensor* dq, Tensor* dk,
                 Tensor* dv) {
  const int64_t B = s.batch, S = s.seq, H = o.heads, Hk = o.kv_heads, D = o.head_dim;
  const int64_t group = H / Hk;
  const Positions pos = MakePositions(S, o);
  const RopeTable table = MakeRopeTable(pos.max_pos, o.rotary_dim > 0 ? o.rotary_dim : D, o.rope_theta);
  Rotated r = Rotate<T>(s, o, pos, table);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(D)));
  // Gradients w.r.t. the rotated q/k (neighbour and grouped), un-rotated at the end.
  Tensor dqn = Tensor::ZerosLike(s.q), dkn = Tensor::ZerosLike(s.k);
  Tensor dqg, dkg;
  if (pos.self_extend) {
    dqg = Tensor::ZerosLike(s.q);
    dkg = Tensor::ZerosLike(s.k);
  }
  *dv = Tensor::ZerosLike(s.v);
  const T* v = s.v.data<T>();
  const T* out = s.out.data<T>();
  const T* d_out = dout.data<T>();
  const double* lse = s.lse.data<double>();
  // One task per (batch, kv head): every gradient row it writes belongs to it alone.
  ParallelFor(B * Hk, [&](int64_t bk) {
    const int64_t b = bk / Hk, hk = bk % Hk;
    std::vector<T> p(kRowBlock * S), dp(kRowBlock * S), tmp(pos.self_extend ? kRowBlock * S : 0);
    const int64_t kv_off = (b * S * Hk + hk) * D;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i0 = 0; i0 < S; i0 += kRowBlock) {
        const int64_t i1 = std::min(S, i0 + kRowBlock), rows = i1 - i0, ld = i1;
        const int64_t q_off = ((b * S + i0) * H + h) * D;
        BlockLogits<T>(r, pos, o, S, b, h, hk, i0, i1, scale, p.data(), tmp.data());
        // dP = dO Vᵀ
        Gemm<T>(false, true, rows, i1, D, T(1), d_out + q_off, H * D, v + kv_off, Hk * D, T(0), dp.data(), ld);
        for (int64_t rr = 0; rr < rows; ++rr) {
          const int64_t i = i0 + rr, n = i + 1;
          const double l = lse[(b * H + h) * S + i];
          double delta = 0;
          const T* doi = d_out + q_off + rr * H * D;
          const T* oi = out + q_off + rr * H * D;
          for (int64_t d = 0; d < D; ++d) delta += static_cast<double>(doi[d]) * oi[d];
          T* prow = p.data() + rr * ld;
          T* dsrow = dp.data() + rr * ld;
          for (int64_t j = 0; j < n; ++j) {
            prow[j] = static_cast<T>(std::exp(static_cast<double>(prow[j]) - l));
            dsrow[j] = static_cast<T>(prow[j] * (dsrow[j] - delta)) * scale;  // dS, scaled for dq/dk
          }
          for (int64_t j = n; j < ld; ++j) prow[j] = dsrow[j] = T(0);
        }
        // dV += Pᵀ dO
        Gemm<T>(true, false, i1, D, rows, T(1), p.data(), ld, d_out + q_off, H * D, T(1), dv->data<T>() + kv_off, Hk * D);
        if (pos.self_extend) {
          // Split dS into neighbour (kept in dp) and grouped (moved to tmp) entries.
          for (int64_t rr = 0; rr < rows; ++rr) {
            const int64_t i = i0 + rr;
            T* dsrow = dp.data() + rr * ld;
            T* grow = tmp.data() + rr * ld;
            for (int64_t j = 0; j < ld; ++j) {
              const bool grouped = j <= i && i - j >= pos.window;
              grow[j] = grouped ? dsrow[j] : T(0);
              if (grouped) dsrow[j] = T(0);
            }
          }
          Gemm<T>(false, false, rows, D, i1, T(1), tmp.data(), ld, r.kg.data<T>() + kv_off, Hk * D, T(1),
                  dqg.data<T>() + q_off, H * D);
          Gemm<T>(true, false, i1, D, rows, T(1), tmp.data(), ld, r.qg.data<T>() + q_off, H * D, T(1),
                  dkg.data<T>() + kv_off, Hk * D);
        }
        Gemm<T>(false, false, rows, D, i1, T(1), dp.data(), ld, r.kn.data<T>() + kv_off, Hk * D, T(1),
                dqn.data<T>() + q_off, H * D);
        Gemm<T>(true, false, i1, D, rows, T(1), dp.data(), ld, r.qn.data<T>() + q_off, H * D, T(1),
                dkn.data<T>() + kv_off, Hk * D);
      }
    }
  });
  const int64_t rows = B * S;
  *dq = Tensor::EmptyLike(s.q);
  *dk = Tensor::EmptyLike(s.k);
  RopeRows<T>(dqn.data<T>(), dq->data<T>(), rows, S, H, D, table, pos.neighbour, true);
  RopeRows<T>(dkn.data<T>(), dk->data<T>(), rows, S, Hk, D, table, pos.neighbour, true);
  if (pos.self_extend) {
    Tensor tq = Tensor::EmptyLike(s.q), tk = Tensor::EmptyLike(s.k);
    RopeRows<T>(dqg.data<T>(), tq.data<T>(), rows, S, H, D, table, pos.grouped_q, true);
    RopeRows<T>(dkg.data<T>(), tk.data<T>(), rows, S, Hk, D, table, pos.grouped_k, true);
    AddInPlace(dq, tq);
    AddInPlace(dk, tk);
  }
}

// ---------------------------------------------------------------- CUDA core op

const void* ByteAt(const Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}
void* MutByteAt(const Tensor& t, int64_t elements) {
  return static_cast<char*>(t.raw()) + elements * static_cast<int64_t>(DTypeSize(t.dtype()));
}

// Rotates `heads` heads starting at element `col` of each row of x [rows, row_stride] (bf16, in
// place) at positions offset + r % seq, grouped (p / group + shift) when group > 0.
void RopeCuda(const Tensor& x, int64_t col, int64_t rows, int64_t seq, int64_t heads, int64_t row_stride,
              const AttentionOptions& o, int64_t offset, int64_t group, int64_t shift, bool inverse,
              const int32_t* position_dev = nullptr, int64_t position_stride = 0) {
  CudaRopeArgs r;
  r.position_dev = position_dev; r.position_stride = position_stride;
  r.x = MutByteAt(x, col);
  r.rows = rows; r.seq = seq; r.heads = heads; r.head_dim = o.head_dim;
  r.rotary_dim = o.rotary_dim > 0 ? o.rotary_dim : o.head_dim;
  r.row_stride = row_stride; r.offset = offset; r.group = group; r.shift = shift;
  r.theta = o.rope_theta; r.inverse = inverse;
  if (rows > 0) CudaInfer().Rope(r);
}

int64_t GroupedQueryShift(const AttentionOptions& o) {
  return o.self_extend_window - o.self_extend_window / o.self_extend_group;
}

CudaAttention CudaArgs(const AttentionSaved& s, const AttentionOptions& o, const Tensor& qkv) {
  const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, width = qd + 2 * kvd;
  CudaAttention a;
  a.batch = s.batch; a.seq = s.seq; a.heads = o.heads; a.kv_heads = o.kv_heads; a.head_dim = o.head_dim;
  a.q = qkv.raw(); a.k = ByteAt(qkv, qd); a.v = ByteAt(qkv, qd + kvd);
  a.q_row_stride = width; a.kv_row_stride = width;
  a.out = s.out.raw();
  a.lse = static_cast<float*>(s.lse.raw());
  a.deterministic = o.deterministic;
  return a;
}

Tensor ForwardCudaCore(const Tensor& q, const Tensor& k, const Tensor& v, int64_t batch, int64_t seq,
                       const AttentionOptions& o, AttentionSaved* saved) {
  const int64_t rows = batch * seq, qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, width = qd + 2 * kvd;
  for (const Tensor* t : {&q, &k, &v})
    GYRE_CHECK(IsCuda(*t) && t->dtype() == DType::kBF16, "causal_attention: CUDA q/k/v must be bf16");
  *saved = AttentionSaved();
  saved->batch = batch;
  saved->seq = seq;
  saved->qkv = ConcatColumns({q.Reshape({rows, qd}), k.Reshape({rows, kvd}), v.Reshape({rows, kvd})});
  Tensor grouped;
  const bool se = o.self_extend_group > 0;
  if (se) {
    GYRE_CHECK(o.head_dim == 64 || o.head_dim == 128,
               "no CUDA kernel yet for SelfExtend attention with head_dim %ld (fused kernel: 64 or 128)",
               (long)o.head_dim);
    grouped = saved->qkv.Clone();
    RopeCuda(grouped, 0, rows, seq, o.heads, width, o, 0, o.self_extend_group, GroupedQueryShift(o), false);
    RopeCuda(grouped, qd, rows, seq, o.kv_heads, width, o, 0, o.self_extend_group, 0, false);
  }
  RopeCuda(saved->qkv, 0, rows, seq, o.heads, width, o, 0, 0, 0, false);
  RopeCuda(saved->qkv, qd, rows, seq, o.kv_heads, width, o, 0, 0, 0, false);
  saved->out = Tensor::Empty({rows, qd}, DType::kBF16, Device::kCuda);
  saved->lse = Tensor::Empty({batch, o.heads, seq}, DType::kF32, Device::kCuda);
  if (rows > 0) {
    const CudaAttention a = CudaArgs(*saved, o, saved->qkv);
    if (se) {
      CudaInfer().AttentionForwardSelfExtend(a, grouped.raw(), ByteAt(grouped, qd), o.self_extend_group,
                                             o.self_extend_window);
    } else {
      Cuda().AttentionForward(a);
    }
  }
  return saved->out.Reshape(q.shape());
}

void BackwardCudaCore(const AttentionSaved& s, const Tensor& dout, const AttentionOptions& o, Tensor* dq, Tensor* dk,
                      Tensor* dv) {
  GYRE_CHECK(o.self_extend_group == 0, "SelfExtend is an inference mode: no CUDA backward for it");
  GYRE_CHECK(s.qkv.defined(), "attention backward without forward");
  GYRE_CHECK(IsCuda(dout) && dout.dtype() == DType::kBF16 && dout.numel() == s.out.numel(),
             "attention: CUDA dout must be bf16 like out");
  const int64_t rows = s.batch * s.seq, qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim;
  const int64_t width = qd + 2 * kvd;
  Tensor dqkv = Tensor::Empty({rows, width}, DType::kBF16, Device::kCuda);
  if (rows > 0) {
    CudaAttention a = CudaArgs(s, o, s.qkv);
    a.dout = dout.raw();
    a.dq = dqkv.raw(); a.dk = MutByteAt(dqkv, qd); a.dv = MutByteAt(dqkv, qd + kvd);
    Cuda().AttentionBackward(a);
  }
  RopeCuda(dqkv, 0, rows, s.seq, o.heads, width, o, 0, 0, 0, true);
  RopeCuda(dqkv, qd, rows, s.seq, o.kv_heads, width, o, 0, 0, 0, true);
  *dq = SliceColumns(dqkv, 0, qd);
  *dk = SliceColumns(dqkv, qd, qd + kvd);
  *dv = SliceColumns(dqkv, qd + kvd, width);
}

// Appends `src` [B, cols] as row `t` of buf [B, capacity, cols].
void AppendRow(const Tensor& buf, int64_t t, const Tensor& src) {
  const int64_t B = buf.dim(0), cap = buf.dim(1), cols = buf.dim(2);
  Cuda().Copy2D(MutByteAt(buf, t * cols), cap * cols * 2, src.raw(), cols * 2, cols * 2, B);
}

// Grows buf [B, cap, cols] to capacity `cap_new`, keeping its first `t` rows.
Tensor Grow(const Tensor& buf, int64_t B, int64_t cols, int64_t t, int64_t cap_new) {
  Tensor grown = Tensor::Empty({B, cap_new, cols}, DType::kBF16, Device::kCuda);
  if (buf.defined() && t > 0) {
    const int64_t cap = buf.dim(1);
    Cuda().Copy2D(grown.raw(), cap_new * cols * 2, buf.raw(), cap * cols * 2, t * cols * 2, B);
  }
  return grown;
}

// DecodeCuda / DecodeChunkCuda with DecodeRopeAppendOneLaunch() (GYRE_DECODE_ROPE_APPEND=1):
// cache rows t .. t + queries - 1 of every sequence take k rotated, v (and the grouped k,
// SelfExtend), and *qn (*qg) the rotated queries, in one launch instead of the append / clone /
// RoPE launches (5 a layer, 9 with SelfExtend); the same bits (the kernel rotates through the
// RoPE kernel's own device functions, on the same bf16 values). Rows r = j·batch + b; t comes
// from `pos` (device) when set, else the host t. The caches must have room (grown by the caller).
// q, k, v: rows of ld elements (three tensors, or the column blocks of one packed qkv tensor).
struct QkvRows {
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0;
};
QkvRows Separate(const Tensor& q, const Tensor& k, const Tensor& v) {
  return {q.raw(), k.raw(), v.raw(), q.cols(), k.cols(), v.cols()};
}

void RopeAppendOneLaunch(const QkvRows& in, int64_t batch, int64_t queries, const AttentionOptions& o,
                         KvCache* cache, int64_t t, const int32_t* pos, Tensor* qn, Tensor* qg) {
  const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, rows = batch * queries;
  const bool se = o.self_extend_group > 0;
  *qn = Tensor::Empty({rows, qd}, DType::kBF16, Device::kCuda);
  if (se) *qg = Tensor::Empty({rows, qd}, DType::kBF16, Device::kCuda);
  CudaRopeAppendArgs r;
  r.batch = batch; r.queries = queries; r.heads = o.heads; r.kv_heads = o.kv_heads; r.head_dim = o.head_dim;
  r.rotary_dim = o.rotary_dim; r.theta = o.rope_theta;
  r.offset = t; r.position_dev = pos;
  r.group = se ? o.self_extend_group : 0; r.shift = se ? GroupedQueryShift(o) : 0;
  r.q = in.q; r.k = in.k; r.v = in.v; r.ldq = in.ldq; r.ldk = in.ldk; r.ldv = in.ldv;
  r.q_out = qn->raw(); r.q_grouped_out = se ? qg->raw() : nullptr;
  r.k_cache = cache->cuda_k.raw(); r.v_cache = cache->cuda_v.raw();
  r.k_grouped_cache = se ? cache->cuda_k_grouped.raw() : nullptr;
  r.cache_batch_stride = cache->cuda_k.dim(1) * kvd;
  CudaInfer().RopeAppend(r);
}

// The decode attention launch after the appends (t: the length before them): `queries` query
// rows per sequence against the cache; under a capture (pos set) the kernel reads the length from
// the device and its shared memory is sized for the capacity.
Tensor DecodeAttention(const Tensor& qn, const Tensor& qg, int64_t B, int64_t queries, const AttentionOptions& o,
                       const KvCache& cache, int64_t t, const int32_t* pos) {
  const bool se = o.self_extend_group > 0;
  const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, cap = cache.cuda_k.dim(1);
  Tensor out = Tensor::Empty({B * queries, qd}, DType::kBF16, Device::kCuda);
  CudaAttentionDecodeArgs a;
  a.batch = B; a.heads = o.heads; a.kv_heads = o.kv_heads; a.head_dim = o.head_dim;
  a.length = pos != nullptr ? cap : t + queries;
  a.queries = queries;
  a.position_dev = pos;
  a.split = DecodeAttnSplit();
  a.cluster = DecodeAttnCluster();
  a.q = qn.raw(); a.q_grouped = se ? qg.raw() : nullptr;
  a.k = cache.cuda_k.raw(); a.k_grouped = se ? cache.cuda_k_grouped.raw() : nullptr; a.v = cache.cuda_v.raw();
  a.cache_batch_stride = cap * kvd;
  a.window = se ? o.self_extend_window : 0;
  a.out = out.raw();
  CudaInfer().AttentionDecode(a);
  return out;
}

// A chunk of `chunk` tokens of one sequence (B = 1, rows = positions): the keys/values appended
// with one copy each, one RoPE launch for the new keys and one for the queries, one decode launch
// with `chunk` queries (causal inside the chunk). Same numbers as `chunk` DecodeCuda calls.
// Under a speculative decode graph's capture (cache->graph_position set, ops/decode_graph.h
// SpeculativeGraph) t is read from the device as in DecodeCuda: the appends are AppendRows with
// the chunk's rows as its "batch" (row stride kvd: rows t .. t + chunk - 1), RoPE advances by
// t·kvd and rotates at t + r, the decode kernel's length is t + chunk; the same copies and the
// same arithmetic, so the same bits. The cache must have room for the chunk (no Grow recorded).
Tensor DecodeChunkCuda(const Tensor& q, const Tensor& k, const Tensor& v, int64_t chunk, const AttentionOptions& o,
                       KvCache* cache) {
  const int64_t H = o.heads, Hk = o.kv_heads, D = o.head_dim, qd = H * D, kvd = Hk * D;
  for (const Tensor* x : {&q, &k, &v})
    GYRE_CHECK(IsCuda(*x) && x->dtype() == DType::kBF16, "attention decode: CUDA q/k/v must be bf16");
  GYRE_CHECK(q.rows() == chunk && q.cols() == qd && k.cols() == kvd && v.cols() == kvd && k.rows() == chunk &&
                 v.rows() == chunk, "attention decode chunk shapes q %s k %s", ShapeString(q.shape()).c_str(),
             ShapeString(k.shape()).c_str());
  GYRE_CHECK(cache->v.empty(), "attention decode: a CPU cache fed CUDA tensors");
  const bool se = o.self_extend_group > 0;
  const int64_t t = cache->cuda_length;
  const int32_t* pos = cache->graph_position;
  GYRE_CHECK(pos == nullptr || (cache->cuda_k.defined() && t + chunk <= cache->cuda_k.dim(1)),
             "speculative decode graph capture without room for a chunk of %ld (length %ld)", (long)chunk, (long)t);
  GYRE_CHECK(t == 0 || cache->cuda_k.dim(0) == 1, "attention decode: batch changed from %ld to 1",
             (long)cache->cuda_k.dim(0));
  GYRE_CHECK(t == 0 || se == cache->cuda_k_grouped.defined(), "SelfExtend switched in the middle of decoding");
  if (!cache->cuda_k.defined() || t + chunk > cache->cuda_k.dim(1)) {
    const int64_t cap = std::max<int64_t>(64, 2 * (t + chunk));
    cache->cuda_k = Grow(cache->cuda_k, 1, kvd, t, cap);
    cache->cuda_v = Grow(cache->cuda_v, 1, kvd, t, cap);
    if (se) cache->cuda_k_grouped = Grow(cache->cuda_k_grouped, 1, kvd, t, cap);
  }
  const auto append = [&](const Tensor& buf, const Tensor& src) {
    if (pos != nullptr) {
      CudaInfer().AppendRows(buf.raw(), kvd, src.raw(), chunk, kvd, pos);
    } else {
      Cuda().CopyBytes(MutByteAt(buf, t * kvd), Device::kCuda, src.raw(), Device::kCuda, chunk * kvd * 2);
    }
  };
  const int64_t row_col = pos != nullptr ? 0 : t * kvd;
  Tensor qn, qg;
  if (DecodeRopeAppendOneLaunch()) {
    RopeAppendOneLaunch(Separate(q, k, v), 1, chunk, o, cache, t, pos, &qn, &qg);
  } else {
    append(cache->cuda_k, k);
    RopeCuda(cache->cuda_k, row_col, chunk, chunk, Hk, kvd, o, t, 0, 0, false, pos, kvd);
    append(cache->cuda_v, v);
    qn = q.Clone();
    RopeCuda(qn, 0, chunk, chunk, H, qd, o, t, 0, 0, false, pos, 0);
    if (se) {
      append(cache->cuda_k_grouped, k);
      RopeCuda(cache->cuda_k_grouped, row_col, chunk, chunk, Hk, kvd, o, t, o.self_extend_group, 0, false, pos, kvd);
      qg = q.Clone();
      RopeCuda(qg, 0, chunk, chunk, H, qd, o, t, o.self_extend_group, GroupedQueryShift(o), false, pos, 0);
    }
  }
  cache->cuda_length = t + chunk;
  return DecodeAttention(qn, qg, 1, chunk, o, *cache, t, pos);
}

Tensor DecodeCuda(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& o, KvCache* cache) {
  const int64_t B = q.rows(), H = o.heads, Hk = o.kv_heads, D = o.head_dim, qd = H * D, kvd = Hk * D;
  for (const Tensor* x : {&q, &k, &v})
    GYRE_CHECK(IsCuda(*x) && x->dtype() == DType::kBF16, "attention decode: CUDA q/k/v must be bf16");
  GYRE_CHECK(q.cols() == qd && k.cols() == kvd && v.cols() == kvd && k.rows() == B && v.rows() == B,
             "attention decode shapes q %s k %s", ShapeString(q.shape()).c_str(), ShapeString(k.shape()).c_str());
  GYRE_CHECK(cache->v.empty(), "attention decode: a CPU cache fed CUDA tensors");
  const bool se = o.self_extend_group > 0;
  const int64_t t = cache->cuda_length;
  GYRE_CHECK(t == 0 || cache->cuda_k.dim(0) == B, "attention decode: batch changed from %ld to %ld",
             (long)cache->cuda_k.dim(0), (long)B);
  GYRE_CHECK(t == 0 || se == cache->cuda_k_grouped.defined(), "SelfExtend switched in the middle of decoding");
  // Under a decode graph's capture the position t is a device value (the kernels below read it
  // at replay time) and the cache must have room: a Grow would be recorded with this t's copy.
  const int32_t* pos = cache->graph_position;
  GYRE_CHECK(pos == nullptr || (cache->cuda_k.defined() && t < cache->cuda_k.dim(1)),
             "decode graph capture with a full KV cache (length %ld)", (long)t);
  if (!cache->cuda_k.defined() || t == cache->cuda_k.dim(1)) {
    const int64_t cap = std::max<int64_t>(64, 2 * t);
    cache->cuda_k = Grow(cache->cuda_k, B, kvd, t, cap);
    cache->cuda_v = Grow(cache->cuda_v, B, kvd, t, cap);
    if (se) cache->cuda_k_grouped = Grow(cache->cuda_k_grouped, B, kvd, t, cap);
  }
  const int64_t cap = cache->cuda_k.dim(1);
  // Appends row t of each cache and rotates it there (the row's address depends on t: the
  // graph's kernels compute it from the device t).
  const auto append = [&](const Tensor& buf, const Tensor& src) {
    if (pos != nullptr) {
      CudaInfer().AppendRows(buf.raw(), cap * kvd, src.raw(), B, kvd, pos);
    } else {
      AppendRow(buf, t, src);
    }
  };
  const int64_t row_col = pos != nullptr ? 0 : t * kvd;
  Tensor qn, qg;
  if (DecodeRopeAppendOneLaunch()) {
    RopeAppendOneLaunch(Separate(q, k, v), B, 1, o, cache, t, pos, &qn, &qg);
  } else {
    append(cache->cuda_k, k);
    RopeCuda(cache->cuda_k, row_col, B, 1, Hk, cap * kvd, o, t, 0, 0, false, pos, kvd);
    append(cache->cuda_v, v);
    qn = q.Clone();
    RopeCuda(qn, 0, B, 1, H, qd, o, t, 0, 0, false, pos, 0);
    if (se) {
      append(cache->cuda_k_grouped, k);
      RopeCuda(cache->cuda_k_grouped, row_col, B, 1, Hk, cap * kvd, o, t, o.self_extend_group, 0, false, pos, kvd);
      qg = q.Clone();
      RopeCuda(qg, 0, B, 1, H, qd, o, t, o.self_extend_group, GroupedQueryShift(o), false, pos, 0);
    }
  }
  cache->cuda_length = t + 1;
  return DecodeAttention(qn, qg, B, 1, o, *cache, t, pos);
}

// A decode step (queries 1, batch B) or a chunk (queries k, batch 1) whose q, k, v are the
// column blocks [0, qd), [qd, qd + kvd), [qd + kvd, qd + 2 kvd) of one [rows, qd + 2 kvd] tensor:
// DecodeCuda / DecodeChunkCuda with the one-launch appends + RoPE reading them in place (no
// column copies, no separate products). The same checks and the same growth (a step: capacity
// max(64, 2 t) when full; a chunk: max(64, 2 (t + k)) when short), so the same cache and bits.
Tensor DecodePackedCuda(const Tensor& qkv, int64_t B, int64_t queries, const AttentionOptions& o, KvCache* cache) {
  const int64_t qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, width = qd + 2 * kvd;
  GYRE_CHECK(IsCuda(qkv) && qkv.dtype() == DType::kBF16, "attention decode: CUDA qkv must be bf16");
  GYRE_CHECK(qkv.rows() == B * queries && qkv.cols() == width && (queries == 1 || B == 1),
             "attention decode packed qkv %s for batch %ld x %ld queries", ShapeString(qkv.shape()).c_str(), (long)B,
             (long)queries);
  GYRE_CHECK(DecodeRopeAppendOneLaunch(), "packed q/k/v need the one-launch appends (GYRE_DECODE_ROPE_APPEND=1)");
  GYRE_CHECK(cache->v.empty(), "attention decode: a CPU cache fed CUDA tensors");
  const bool se = o.self_extend_group > 0;
  const int64_t t = cache->cuda_length;
  const int32_t* pos = cache->graph_position;
  GYRE_CHECK(t == 0 || cache->cuda_k.dim(0) == B, "attention decode: batch changed from %ld to %ld",
             (long)cache->cuda_k.dim(0), (long)B);
  GYRE_CHECK(t == 0 || se == cache->cuda_k_grouped.defined(), "SelfExtend switched in the middle of decoding");
  GYRE_CHECK(pos == nullptr || (cache->cuda_k.defined() && t + queries <= cache->cuda_k.dim(1)),
             "decode graph capture without room for %ld rows (length %ld)", (long)queries, (long)t);
  if (!cache->cuda_k.defined() || t + queries > cache->cuda_k.dim(1)) {
    const int64_t cap = queries == 1 ? std::max<int64_t>(64, 2 * t) : std::max<int64_t>(64, 2 * (t + queries));
    cache->cuda_k = Grow(cache->cuda_k, B, kvd, t, cap);
    cache->cuda_v = Grow(cache->cuda_v, B, kvd, t, cap);
    if (se) cache->cuda_k_grouped = Grow(cache->cuda_k_grouped, B, kvd, t, cap);
  }
  QkvRows in;
  in.q = qkv.raw(); in.k = ByteAt(qkv, qd); in.v = ByteAt(qkv, qd + kvd);
  in.ldq = in.ldk = in.ldv = width;
  Tensor qn, qg;
  RopeAppendOneLaunch(in, B, queries, o, cache, t, pos, &qn, &qg);
  cache->cuda_length = t + queries;
  return DecodeAttention(qn, qg, B, queries, o, *cache, t, pos);
}

void CheckOptions(const AttentionOptions& o) {
  GYRE_CHECK(o.heads > 0 && o.kv_heads > 0 && o.heads % o.kv_heads == 0, "heads %ld kv_heads %ld",
             (long)o.heads, (long)o.kv_heads);
  GYRE_CHECK(o.head_dim > 0, "head_dim %ld", (long)o.head_dim);
  GYRE_CHECK(o.rotary_dim >= 0 && o.rotary_dim <= o.head_dim && o.rotary_dim % 2 == 0, "rotary_dim %ld of head_dim %ld",
             (long)o.rotary_dim, (long)o.head_dim);
  GYRE_CHECK(o.self_extend_group == 0 || o.self_extend_window > 0, "SelfExtend needs a window");
}

}  // namespace

Tensor ApplyRope(const Tensor& x, int64_t seq, int64_t heads, int64_t head_dim, double theta,
                 const std::vector<int64_t>& positions, bool inverse, int64_t rotary_dim) {
  CheckCpu(x, "rope");
  // A table row per entry of `positions` only (a decode step at position t asks for {t}: building
  // rows 0..t would cost O(t) sin/cos per call, quadratic over a generation).
  const int64_t rd = rotary_dim > 0 ? rotary_dim : head_dim;
  RopeTable table;
  table.half = rd / 2;
  table.cos.resize(positions.size() * table.half);
  table.sin.resize(positions.size() * table.half);
  std::vector<double> inv_freq(table.half);
  for (int64_t i = 0; i < table.half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
  std::vector<int64_t> rows(positions.size());
  for (size_t j = 0; j < positions.size(); ++j) {
    rows[j] = static_cast<int64_t>(j);
    for (int64_t i = 0; i < table.half; ++i) {
      const double a = static_cast<double>(positions[j]) * inv_freq[i];
      table.cos[j * table.half + i] = std::cos(a);
      table.sin[j * table.half + i] = std::sin(a);
    }
  }
  Tensor y = Tensor::EmptyLike(x);
  DispatchFloat(x.dtype(), [&]<typename T>() {
    RopeRows<T>(x.data<T>(), y.data<T>(), x.rows(), seq, heads, head_dim, table, rows, inverse);
  });
  return y;
}

Tensor CausalAttentionForward(const Tensor& q, const Tensor& k, const Tensor& v, int64_t batch,
                              int64_t seq, const AttentionOptions& options, AttentionSaved* saved) {
  CheckOptions(options);
  if (IsCuda(q)) {
    GYRE_CHECK(q.numel() == batch * seq * options.heads * options.head_dim &&
                   k.numel() == batch * seq * options.kv_heads * options.head_dim && v.numel() == k.numel(),
               "attention q %s k %s", ShapeString(q.shape()).c_str(), ShapeString(k.shape()).c_str());
    return ForwardCudaCore(q, k, v, batch, seq, options, saved);
  }
  CheckCpu(q, "causal_attention");
  GYRE_CHECK(q.numel() == batch * seq * options.heads * options.head_dim, "attention q %s",
             ShapeString(q.shape()).c_str());
  GYRE_CHECK(k.numel() == batch * seq * options.kv_heads * options.head_dim &&
                 v.numel() == k.numel(), "attention k/v %s", ShapeString(k.shape()).c_str());
  saved->q = q;
  saved->k = k;
  saved->v = v;
  saved->batch = batch;
  saved->seq = seq;
  saved->out = Tensor::EmptyLike(q);
  saved->lse = Tensor::Empty({batch, options.heads, seq}, DType::kF64);
  DispatchFloat(q.dtype(), [&]<typename T>() { ForwardCpu<T>(saved, options); });
  return saved->out;
}

void CausalAttentionBackward(const AttentionSaved& saved, const Tensor& dout,
                             const AttentionOptions& options, Tensor* dq, Tensor* dk, Tensor* dv) {
  if (IsCuda(dout)) return BackwardCudaCore(saved, dout, options, dq, dk, dv);
  CheckCpu(dout, "causal_attention_backward");
  GYRE_CHECK(saved.q.defined(), "attention backward without forward");
  GYRE_CHECK(dout.numel() == saved.out.numel(), "attention dout %s", ShapeString(dout.shape()).c_str());
  DispatchFloat(dout.dtype(), [&]<typename T>() { BackwardCpu<T>(saved, dout, options, dq, dk, dv); });
}

SelfAttention::SelfAttention(const BuildContext& ctx, int64_t dim, AttentionOptions options)
    : options_(options),
      store_(ctx.store),
      q_proj_(ctx.Sub("q_proj"), dim, options.heads * options.head_dim, false),
      k_proj_(ctx.Sub("k_proj"), dim, options.kv_heads * options.head_dim, false),
      v_proj_(ctx.Sub("v_proj"), dim, options.kv_heads * options.head_dim, false),
      o_proj_(ctx.Sub("o_proj"), options.heads * options.head_dim, dim, false) {
  CheckOptions(options_);
}

Tensor SelfAttention::ForwardCuda(const Tensor& x, int64_t batch, int64_t seq) {
  const AttentionOptions& o = options_;
  const int64_t rows = x.rows(), qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim, width = qd + 2 * kvd;
  GYRE_CHECK(rows == batch * seq, "attention: %ld rows for batch %ld x seq %ld", (long)rows, (long)batch, (long)seq);
  Tensor w, gw;
  saved_ = AttentionSaved();
  saved_.batch = batch;
  saved_.seq = seq;
  if (store_->AdjacentSpan({q_proj_.weight(), k_proj_.weight(), v_proj_.weight()}, &w, &gw)) {
    saved_.x = x;
    saved_.qkv = LinearForward(x, w).Reshape({rows, width});
  } else {
    saved_.qkv = ConcatColumns({q_proj_.Forward(x).Reshape({rows, qd}), k_proj_.Forward(x).Reshape({rows, kvd}),
                                v_proj_.Forward(x).Reshape({rows, kvd})});
  }
  Tensor& qkv = saved_.qkv;
  char* base = static_cast<char*>(qkv.raw());
  CudaBackend& cuda = Cuda();
  // RoPE: k by a separate pass in place (every query block reads every earlier key tile), q
  // inside the attention kernel as it loads its query tile (written back in place for the
  // backward, which reads the rotated q and k and returns dq, dk un-rotated).
  const char* mode = std::getenv("GYRE_ATTN_ROPE");
  const std::string rope_mode = mode != nullptr ? mode : "";
  rope_in_fwd_ = rope_mode != "separate" && rope_mode != "bwd";
  rope_in_bwd_ = rope_mode != "separate";
  if (rope_in_fwd_) {
    cuda.Rope(false, base + qd * 2, rows, seq, o.kv_heads, o.head_dim, width, o.rope_theta);
  } else {  // q and k are adjacent in each qkv row: one launch rotates both
    cuda.Rope(false, base, rows, seq, o.heads + o.kv_heads, o.head_dim, width, o.rope_theta);
  }
  saved_.out = Tensor::Empty({rows, qd}, DType::kBF16, Device::kCuda);
  saved_.lse = Tensor::Empty({batch, o.heads, seq}, DType::kF32, Device::kCuda);
  CudaAttention a;
  a.batch = batch; a.seq = seq; a.heads = o.heads; a.kv_heads = o.kv_heads; a.head_dim = o.head_dim;
  a.q = base; a.k = base + qd * 2; a.v = base + (qd + kvd) * 2;
  a.q_row_stride = width; a.kv_row_stride = width;
  a.out = saved_.out.raw();
  a.lse = saved_.lse.data<float>();
  if (rope_in_fwd_) a.rope_theta = o.rope_theta;
  cuda.AttentionForward(a);
  Shape shape = x.shape();
  shape.back() = qd;
  return o_proj_.Forward(saved_.out.Reshape(shape));
}

Tensor SelfAttention::BackwardCuda(const Tensor& dy) {
  const AttentionOptions& o = options_;
  Tensor da = o_proj_.Backward(dy);
  const int64_t rows = saved_.qkv.rows(), qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim;
  const int64_t width = qd + 2 * kvd;
  Tensor dqkv = Tensor::Empty({rows, width}, DType::kBF16, Device::kCuda);
  const char* base = static_cast<const char*>(saved_.qkv.raw());
  char* dbase = static_cast<char*>(dqkv.raw());
  CudaAttention a;
  a.batch = saved_.batch; a.seq = saved_.seq; a.heads = o.heads; a.kv_heads = o.kv_heads; a.head_dim = o.head_dim;
  a.q = base; a.k = base + qd * 2; a.v = base + (qd + kvd) * 2;
  a.q_row_stride = width; a.kv_row_stride = width;
  a.out = saved_.out.raw();
  a.lse = saved_.lse.data<float>();
  a.dout = da.raw();
  a.dq = dbase; a.dk = dbase + qd * 2; a.dv = dbase + (qd + kvd) * 2;
  a.deterministic = o.deterministic;
  CudaBackend& cuda = Cuda();
  if (rope_in_bwd_) {
    a.rope_theta = o.rope_theta;  // inverse RoPE of dq, dk fused into the attention backward
    cuda.AttentionBackward(a);
  } else {
    cuda.AttentionBackward(a);
    cuda.Rope(true, dbase, rows, saved_.seq, o.heads + o.kv_heads, o.head_dim, width, o.rope_theta);
  }
  Tensor dx;
  if (saved_.x.defined()) {
    Tensor w, gw;
    GYRE_CHECK(store_->AdjacentSpan({q_proj_.weight(), k_proj_.weight(), v_proj_.weight()}, &w, &gw),
               "q/k/v no longer adjacent");
    dx = LinearBackward(saved_.x, w, dqkv, &gw, FirstGradWrite({q_proj_.weight(), k_proj_.weight(), v_proj_.weight()}));
  } else {
    dx = q_proj_.Backward(SliceColumns(dqkv, 0, qd));
    AddInPlace(&dx, k_proj_.Backward(SliceColumns(dqkv, qd, qd + kvd)));
    AddInPlace(&dx, v_proj_.Backward(SliceColumns(dqkv, qd + kvd, width)));
  }
  saved_ = AttentionSaved();
  return dx.Reshape(dy.shape());
}

Tensor SelfAttention::Forward(const Tensor& x, int64_t batch, int64_t seq) {
  // Whole-head rotary without SelfExtend: the fused-projection path; otherwise (either device)
  // the separate projections around the device-dispatched core op.
  fused_cuda_ = IsCuda(x) && options_.self_extend_group == 0 &&
                (options_.rotary_dim == 0 || options_.rotary_dim == options_.head_dim);
  if (fused_cuda_) return ForwardCuda(x, batch, seq);
  Tensor q = q_proj_.Forward(x), k = k_proj_.Forward(x), v = v_proj_.Forward(x);
  Tensor a = CausalAttentionForward(q, k, v, batch, seq, options_, &saved_);
  return o_proj_.Forward(a);
}

Tensor SelfAttention::Backward(const Tensor& dy) {
  if (fused_cuda_) return BackwardCuda(dy);
  Tensor da = o_proj_.Backward(dy);
  Tensor dq, dk, dv;
  CausalAttentionBackward(saved_, da, options_, &dq, &dk, &dv);
  saved_ = AttentionSaved();
  Tensor dx = q_proj_.Backward(dq);
  AddInPlace(&dx, k_proj_.Backward(dk));
  AddInPlace(&dx, v_proj_.Backward(dv));
  return dx;
}

void SelfAttention::ReleaseActivations() {
  saved_ = AttentionSaved();
  q_proj_.ReleaseActivations();
  k_proj_.ReleaseActivations();
  v_proj_.ReleaseActivations();
  o_proj_.ReleaseActivations();
}

Tensor CausalAttentionDecode(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& o,
                             KvCache* cache) {
  CheckOptions(o);
  if (IsCuda(q)) return DecodeCuda(q, k, v, o, cache);
  CheckCpu(q, "causal_attention_decode");
  const int64_t B = q.rows(), H = o.heads, Hk = o.kv_heads, D = o.head_dim, group = H / Hk;
  GYRE_CHECK(q.cols() == H * D && k.cols() == Hk * D && v.cols() == Hk * D && k.rows() == B && v.rows() == B,
             "attention decode shapes q %s k %s", ShapeString(q.shape()).c_str(), ShapeString(k.shape()).c_str());
  const int64_t t = cache->length();
  const int64_t rd = o.rotary_dim > 0 ? o.rotary_dim : D;
  const bool se = o.self_extend_group > 0;
  const int64_t G = o.self_extend_group, W = o.self_extend_window;
  Tensor qn = ApplyRope(q, 1, H, D, o.rope_theta, {t}, false, rd);
  Tensor qg;
  cache->k_neighbour.push_back(ApplyRope(k, 1, Hk, D, o.rope_theta, {t}, false, rd));
  cache->v.push_back(v);
  if (se) {
    qg = ApplyRope(q, 1, H, D, o.rope_theta, {t / G + W - W / G}, false, rd);
    cache->k_grouped.push_back(ApplyRope(k, 1, Hk, D, o.rope_theta, {t / G}, false, rd));
  } else {
    cache->k_grouped.push_back(Tensor());
  }
  Tensor out = Tensor::Empty(q.shape(), q.dtype());
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  DispatchFloat(q.dtype(), [&]<typename T>() {
    std::vector<double> p(t + 1);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t hk = h / group;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= t; ++j) {
          const bool neighbour = !se || t - j < W;
          const Tensor& kj = neighbour ? cache->k_neighbour[j] : cache->k_grouped[j];
          GYRE_CHECK(kj.defined(), "SelfExtend switched on in the middle of decoding");
          const T* qr = (neighbour ? qn : qg).data<T>() + (b * H + h) * D;
          const T* kr = kj.data<T>() + (b * Hk + hk) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qr[d]) * kr[d];
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double z = 0;
        for (int64_t j = 0; j <= t; ++j) z += (p[j] = std::exp(p[j] - mx));
        T* o_row = out.data<T>() + (b * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j <= t; ++j) acc += p[j] * cache->v[j].data<T>()[(b * Hk + hk) * D + d];
          o_row[d] = static_cast<T>(acc / z);
        }
      }
    }
  });
  return out;
}

Tensor CausalAttentionDecodeChunkPacked(const Tensor& qkv, int64_t chunk, const AttentionOptions& o, KvCache* cache) {
  CheckOptions(o);
  GYRE_CHECK(IsCuda(qkv) && chunk > 0 && qkv.rows() % chunk == 0, "attention decode packed: %ld rows, chunk %ld",
             (long)qkv.rows(), (long)chunk);
  const int64_t B = qkv.rows() / chunk, qd = o.heads * o.head_dim, kvd = o.kv_heads * o.head_dim;
  if (chunk == 1 || B == 1) return DecodePackedCuda(qkv, B, chunk, o, cache);
  return CausalAttentionDecodeChunk(SliceColumns(qkv, 0, qd), SliceColumns(qkv, qd, qd + kvd),
                                    SliceColumns(qkv, qd + kvd, qd + 2 * kvd), chunk, o, cache);
}

Tensor CausalAttentionDecodeChunk(const Tensor& q, const Tensor& k, const Tensor& v, int64_t chunk,
                                  const AttentionOptions& o, KvCache* cache) {
  if (chunk == 1) return CausalAttentionDecode(q, k, v, o, cache);
  GYRE_CHECK(chunk > 0 && q.rows() % chunk == 0, "attention decode chunk %ld of %ld rows", (long)chunk, (long)q.rows());
  const int64_t B = q.rows() / chunk;
  if (IsCuda(q) && B == 1) {
    CheckOptions(o);
    return DecodeChunkCuda(q, k, v, chunk, o, cache);
  }
  Tensor out = Tensor::EmptyLike(q);
  for (int64_t j = 0; j < chunk; ++j) {
    const int64_t r0 = j * B, r1 = (j + 1) * B;
    out.Rows(r0, r1).CopyFrom(CausalAttentionDecode(q.Rows(r0, r1), k.Rows(r0, r1), v.Rows(r0, r1), o, cache));
  }
  return out;
}

void TruncateKvCache(KvCache* cache, int64_t length) {
  GYRE_CHECK(length >= 0 && length <= cache->length(), "truncate a KV cache of %ld to %ld", (long)cache->length(),
             (long)length);
  if (cache->cuda_k.defined()) {
    cache->cuda_length = length;  // rows past it are overwritten by the next appends
    return;
  }
  cache->k_neighbour.resize(length);
  cache->k_grouped.resize(length);
  cache->v.resize(length);
}

bool SelfAttention::PackedDecodeQkv(const Tensor& x, Tensor* qkv) {
  // One product over the adjacent q / k / v weights gives every column the bits of its own
  // product only where GemmRows computes both (a column's arithmetic does not depend on n there;
  // cuBLASLt would pick another algorithm for another n): CUDA, row-invariant decoding, <= 16 rows.
  if (!IsCuda(x) || !DecodeRopeAppendOneLaunch() || !RowInvariantDecode() || x.rows() > kDecodeGemmRowsMax) return false;
  Tensor w, gw;
  if (!store_->AdjacentSpan({q_proj_.weight(), k_proj_.weight(), v_proj_.weight()}, &w, &gw)) return false;
  *qkv = LinearForward(x, w);
  return true;
}

Tensor SelfAttention::StepChunk(const Tensor& x, int64_t chunk, KvCache* cache) {
  Tensor qkv;
  if (PackedDecodeQkv(x, &qkv)) {
    Tensor y = o_proj_.Forward(CausalAttentionDecodeChunkPacked(qkv, chunk, options_, cache));
    ReleaseActivations();
    return y;
  }
  Tensor a = CausalAttentionDecodeChunk(q_proj_.Forward(x), k_proj_.Forward(x), v_proj_.Forward(x), chunk, options_,
                                        cache);
  Tensor y = o_proj_.Forward(a);
  ReleaseActivations();
  return y;
}

Tensor SelfAttention::Step(const Tensor& x, KvCache* cache) {
  Tensor qkv;
  if (PackedDecodeQkv(x, &qkv)) {
    Tensor y = o_proj_.Forward(CausalAttentionDecodeChunkPacked(qkv, 1, options_, cache));
    ReleaseActivations();
    return y;
  }
  Tensor a = CausalAttentionDecode(q_proj_.Forward(x), k_proj_.Forward(x), v_proj_.Forward(x), options_, cache);
  Tensor y = o_proj_.Forward(a);
  ReleaseActivations();
  return y;
}

}  // namespace gyre::ops
