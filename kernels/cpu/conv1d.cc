// Causal depthwise conv1d (+ optional SiLU). Math, layouts and contracts: conv1d.h.
//
// Implementation: each batch row is processed over an "extended" input of K−1+S rows, the
// K−1 state rows first, so every output reads the same window ext[t .. t+K−1] and the backward
// is the transpose of that gather. Loops run channels innermost (contiguous); the weight is
// transposed to [K, C] once so that its reads are contiguous too.
#include "kernels/cpu/conv1d.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace gyre::cpu {
namespace {

template <typename T>
T Sigmoid(T u) {
  return T(1) / (T(1) + std::exp(-u));
}

// ext [K−1+S, C]: rows 0..K−2 = initial state (or zeros), rows K−1.. = x of batch row b.
template <typename T>
void FillExtended(const Conv1dShape& s, int64_t b, const T* x, const T* initial_state,
                  std::vector<T>& ext) {
  const int64_t C = s.channels, K = s.width, S = s.seq_len;
  ext.assign((K - 1 + S) * C, T(0));
  if (initial_state != nullptr) {
    std::memcpy(ext.data(), initial_state + b * (K - 1) * C, sizeof(T) * (K - 1) * C);
  }
  std::memcpy(ext.data() + (K - 1) * C, x + b * S * C, sizeof(T) * S * C);
}

// wt [K, C] = transpose of w [C, K].
template <typename T>
std::vector<T> TransposeWeight(const Conv1dShape& s, const T* w) {
  const int64_t C = s.channels, K = s.width;
  std::vector<T> wt(K * C);
  for (int64_t ch = 0; ch < C; ++ch) {
    for (int64_t j = 0; j < K; ++j) wt[j * C + ch] = w[ch * K + j];
  }
  return wt;
}

// u [S, C] = bias + Σ_j wt[j] ⊙ ext[t + j].
template <typename T>
void ConvRows(const Conv1dShape& s, const std::vector<T>& ext, const std::vector<T>& wt,
              const T* bias, T* u) {
  const int64_t C = s.channels, K = s.width, S = s.seq_len;
  for (int64_t t = 0; t < S; ++t) {
    T* ut = u + t * C;
    for (int64_t ch = 0; ch < C; ++ch) ut[ch] = bias != nullptr ? bias[ch] : T(0);
    for (int64_t j = 0; j < K; ++j) {
      const T* xr = ext.data() + (t + j) * C;
      const T* wr = wt.data() + j * C;
      for (int64_t ch = 0; ch < C; ++ch) ut[ch] += wr[ch] * xr[ch];
    }
  }
}

}  // namespace

absl::Status conv1d_check(const Conv1dShape& shape) {
  if (shape.batch < 1 || shape.seq_len < 1 || shape.channels < 1 || shape.width < 1) {
    return absl::InvalidArgumentError(
        "conv1d: batch, seq_len, channels and width must all be >= 1");
  }
  return absl::OkStatus();
}

template <typename T>
void conv1d_fwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x, const T* w,
                    const T* bias, const T* initial_state, T* y, T* final_state) {
  const int64_t C = shape.channels, K = shape.width, S = shape.seq_len;
  const std::vector<T> wt = TransposeWeight(shape, w);
  std::vector<T> ext;
  for (int64_t b = 0; b < shape.batch; ++b) {
    FillExtended(shape, b, x, initial_state, ext);
    T* yb = y + b * S * C;
    ConvRows(shape, ext, wt, bias, yb);
    if (options.silu) {
      for (int64_t i = 0; i < S * C; ++i) yb[i] = yb[i] * Sigmoid(yb[i]);
    }
    if (final_state != nullptr && K > 1) {
      // The last K−1 rows of ext are x_{S−K+1} .. x_{S−1} (state rows where S < K−1).
      std::memcpy(final_state + b * (K - 1) * C, ext.data() + S * C, sizeof(T) * (K - 1) * C);
    }
  }
}

template <typename T>
void conv1d_bwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x, const T* w,
                    const T* bias, const T* initial_state, const T* dy, const T* d_final_state,
                    T* dx, T* dw, T* dbias, T* d_initial_state) {
  const int64_t C = shape.channels, K = shape.width, S = shape.seq_len;
  const std::vector<T> wt = TransposeWeight(shape, w);
  std::vector<T> ext, du(S * C), dext, dwt(K * C, T(0));
  for (int64_t b = 0; b < shape.batch; ++b) {
    FillExtended(shape, b, x, initial_state, ext);
    const T* dyb = dy + b * S * C;
    if (options.silu) {
      // du = dy · SiLU'(u),  SiLU'(u) = σ(u)·(1 + u·(1 − σ(u))); u recomputed.
      ConvRows(shape, ext, wt, bias, du.data());
      for (int64_t i = 0; i < S * C; ++i) {
        const T u = du[i], sg = Sigmoid(u);
        du[i] = dyb[i] * sg * (T(1) + u * (T(1) - sg));
      }
    } else {
      std::memcpy(du.data(), dyb, sizeof(T) * S * C);
    }
    dext.assign((K - 1 + S) * C, T(0));
    if (d_final_state != nullptr && K > 1) {
      const T* dfs = d_final_state + b * (K - 1) * C;
      for (int64_t i = 0; i < (K - 1) * C; ++i) dext[S * C + i] += dfs[i];
    }
    for (int64_t t = 0; t < S; ++t) {
      const T* dut = du.data() + t * C;
      if (dbias != nullptr) {
        for (int64_t ch = 0; ch < C; ++ch) dbias[ch] += dut[ch];
      }
      for (int64_t j = 0; j < K; ++j) {
        const T* xr = ext.data() + (t + j) * C;
        const T* wr = wt.data() + j * C;
        T* dxr = dext.data() + (t + j) * C;
        T* dwr = dwt.data() + j * C;
        for (int64_t ch = 0; ch < C; ++ch) {
          dxr[ch] += wr[ch] * dut[ch];
          dwr[ch] += xr[ch] * dut[ch];
        }
      }
    }
    std::memcpy(dx + b * S * C, dext.data() + (K - 1) * C, sizeof(T) * S * C);
    if (d_initial_state != nullptr && K > 1) {
      std::memcpy(d_initial_state + b * (K - 1) * C, dext.data(), sizeof(T) * (K - 1) * C);
    }
  }
  for (int64_t ch = 0; ch < C; ++ch) {
    for (int64_t j = 0; j < K; ++j) dw[ch * K + j] += dwt[j * C + ch];
  }
}

template <typename T>
void conv1d_step_fwd_ref(const Conv1dShape& shape, const Conv1dOptions& options, const T* x,
                         const T* w, const T* bias, T* state, T* y) {
  const int64_t C = shape.channels, K = shape.width;
  for (int64_t b = 0; b < shape.batch; ++b) {
    const T* xb = x + b * C;
    T* st = state + b * (K - 1) * C;
    T* yb = y + b * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      T u = bias != nullptr ? bias[ch] : T(0);
      for (int64_t j = 0; j < K - 1; ++j) u += w[ch * K + j] * st[j * C + ch];
      u += w[ch * K + K - 1] * xb[ch];
      yb[ch] = options.silu ? u * Sigmoid(u) : u;
    }
    if (K > 1) {
      std::memmove(st, st + C, sizeof(T) * (K - 2) * C);
      std::memcpy(st + (K - 2) * C, xb, sizeof(T) * C);
    }
  }
}

#define GYRE_CONV1D_INSTANTIATE(T)                                                              \
  template void conv1d_fwd_ref<T>(const Conv1dShape&, const Conv1dOptions&, const T*, const T*, \
                                  const T*, const T*, T*, T*);                                  \
  template void conv1d_bwd_ref<T>(const Conv1dShape&, const Conv1dOptions&, const T*, const T*, \
                                  const T*, const T*, const T*, const T*, T*, T*, T*, T*);      \
  template void conv1d_step_fwd_ref<T>(const Conv1dShape&, const Conv1dOptions&, const T*,      \
                                       const T*, const T*, T*, T*);
GYRE_CONV1D_INSTANTIATE(float)
GYRE_CONV1D_INSTANTIATE(double)
#undef GYRE_CONV1D_INSTANTIATE

}  // namespace gyre::cpu
