// sLSTM forward (sequence and single step) and backward through time. Math, layouts and
// contracts: slstm.h. Letters as MODELS.md §2.
//
// Per time step, for every head: one GEMM [B, dh] × R_hdᵀ [dh, 4dh] adds the recurrent part to
// the precomputed input pre-activations, then the pointwise update runs per unit. The backward
// walks the steps in reverse carrying (dh, dc, dn, dm) and per head does the two transposed
// GEMMs (dh_{t−1} = dG R_hd, dR_hd += dGᵀ h_{t−1}).
#include "kernels/cpu/slstm.h"

#include "kernels/cpu/blas_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace gyre::cpu {
namespace {

template <typename T>
T Sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
T LogSigmoid(T x) {
  return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x));
}

// The stabiliser choice, shared by forward and backward so both take the same branch.
// Returns m_t; *from_input = whether m_t = ĩ (else m_t = logσ(f̃) + m_{t−1}).
template <typename T>
T Stabiliser(T i_raw, T lf_plus_m, T n_prev, bool* from_input) {
  *from_input = n_prev == T(0) || i_raw >= lf_plus_m;
  return *from_input ? i_raw : lf_plus_m;
}

// One unit's pointwise update. Writes c, n, m and returns h.
template <typename T>
T Pointwise(T i_raw, T f_raw, T z_raw, T o_raw, T c_prev, T n_prev, T m_prev, T* c, T* n, T* m) {
  const T lf = LogSigmoid(f_raw) + m_prev;
  bool from_input = false;
  const T m_new = Stabiliser(i_raw, lf, n_prev, &from_input);
  // One of the two exponents is exactly 0 (the one m_t was taken from): skip its exp.
  const T ip = from_input ? T(1) : std::min(std::exp(i_raw - m_new), T(1));
  const T fp = from_input ? std::min(std::exp(lf - m_new), T(1)) : T(1);
  *c = fp * c_prev + ip * std::tanh(z_raw);
  *n = fp * n_prev + ip;
  *m = m_new;
  return Sigmoid(o_raw) * (*c) / (*n);
}

// pre[b, g, hd·dh + j] += Σ_l R[hd][g][j][l] h_prev[b, hd·dh + l] for one batch of B rows.
// pre has row stride 4d, h_prev row stride d; scratch holds [B, 4dh].
template <typename T>
void AddRecurrent(const SlstmShape& s, const T* r, const T* h_prev, T* pre, T* scratch) {
  const int64_t B = s.batch, NH = s.num_heads, dh = s.head_dim, d = NH * dh;
  for (int64_t hd = 0; hd < NH; ++hd) {
    Gemm(false, true, B, 4 * dh, dh, T(1), h_prev + hd * dh, d, r + hd * 4 * dh * dh, dh, T(0),
         scratch, 4 * dh);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < 4; ++g) {
        T* dst = pre + b * 4 * d + g * d + hd * dh;
        const T* src = scratch + b * 4 * dh + g * dh;
        for (int64_t j = 0; j < dh; ++j) dst[j] += src[j];
      }
    }
  }
}

// The opaque `saved` buffer: one block per batch row (slstm.h promises that batch row b's part is
// contiguous): pre [S, 4, d] (gate pre-activations incl. the recurrent part), then c, n, m
// [S, d] each. The loops work on contiguous per-step [B, ·] buffers and copy rows in and out.
struct SavedLayout {
  int64_t pre = 0, c = 0, n = 0, m = 0, per_batch = 0, total = 0;
};

SavedLayout MakeLayout(const SlstmShape& s) {
  const int64_t d = s.num_heads * s.head_dim, S = s.seq_len;
  SavedLayout l;
  l.pre = 0;
  l.c = S * 4 * d;
  l.n = l.c + S * d;
  l.m = l.n + S * d;
  l.per_batch = l.m + S * d;
  l.total = s.batch * l.per_batch;
  return l;
}

// Copies step t of every batch row between the saved buffer and contiguous [B, width] buffers.
template <typename T>
void SaveStep(const SavedLayout& l, int64_t B, int64_t t, int64_t d, const T* pre, const T* c,
              const T* n, const T* m, T* saved) {
  for (int64_t b = 0; b < B; ++b) {
    T* blk = saved + b * l.per_batch;
    std::memcpy(blk + l.pre + t * 4 * d, pre + b * 4 * d, sizeof(T) * 4 * d);
    std::memcpy(blk + l.c + t * d, c + b * d, sizeof(T) * d);
    std::memcpy(blk + l.n + t * d, n + b * d, sizeof(T) * d);
    std::memcpy(blk + l.m + t * d, m + b * d, sizeof(T) * d);
  }
}

template <typename T>
void LoadRows(const SavedLayout& l, int64_t B, int64_t offset, int64_t width, const T* saved,
              T* out) {
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(out + b * width, saved + b * l.per_batch + offset, sizeof(T) * width);
  }
}

}  // namespace

absl::Status slstm_check(const SlstmShape& shape) {
  if (shape.batch < 1 || shape.seq_len < 1 || shape.num_heads < 1 || shape.head_dim < 1) {
    return absl::InvalidArgumentError(
        "slstm: batch, seq_len, num_heads and head_dim must all be >= 1");
  }
  return absl::OkStatus();
}

int64_t slstm_saved_size(const SlstmShape& shape) { return MakeLayout(shape).total; }

template <typename T>
void slstm_step_fwd_ref(const SlstmShape& shape, const T* gx, const T* r, SlstmStateRef<T> state,
                        T* h) {
  const int64_t B = shape.batch, d = shape.num_heads * shape.head_dim;
  std::vector<T> pre(gx, gx + B * 4 * d), scratch(B * 4 * shape.head_dim);
  AddRecurrent(shape, r, state.h, pre.data(), scratch.data());
  for (int64_t b = 0; b < B; ++b) {
    const T* p = pre.data() + b * 4 * d;
    for (int64_t u = 0; u < d; ++u) {
      const int64_t i = b * d + u;
      T c, n, m;
      h[i] = Pointwise(p[u], p[d + u], p[2 * d + u], p[3 * d + u], state.c[i], state.n[i],
                       state.m[i], &c, &n, &m);
      state.c[i] = c;
      state.n[i] = n;
      state.m[i] = m;
    }
  }
  std::memcpy(state.h, h, sizeof(T) * B * d);
}

template <typename T>
void slstm_fwd_ref(const SlstmShape& shape, const T* gx, const T* r, SlstmStateRef<const T> initial,
                   T* h, T* saved, SlstmStateRef<T> final_state) {
  const int64_t B = shape.batch, S = shape.seq_len, d = shape.num_heads * shape.head_dim;
  const SavedLayout lay = MakeLayout(shape);
  std::vector<T> h_prev(B * d, T(0)), c_prev(B * d, T(0)), n_prev(B * d, T(0)), m_prev(B * d, T(0));
  if (initial.h != nullptr) {
    std::memcpy(h_prev.data(), initial.h, sizeof(T) * B * d);
    std::memcpy(c_prev.data(), initial.c, sizeof(T) * B * d);
    std::memcpy(n_prev.data(), initial.n, sizeof(T) * B * d);
    std::memcpy(m_prev.data(), initial.m, sizeof(T) * B * d);
  }
  std::vector<T> pre(B * 4 * d), c_cur(B * d), n_cur(B * d), m_cur(B * d),
      scratch(B * 4 * shape.head_dim);
  for (int64_t t = 0; t < S; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(pre.data() + b * 4 * d, gx + (b * S + t) * 4 * d, sizeof(T) * 4 * d);
    }
    AddRecurrent(shape, r, h_prev.data(), pre.data(), scratch.data());
    for (int64_t b = 0; b < B; ++b) {
      const T* p = pre.data() + b * 4 * d;
      T* hb = h + (b * S + t) * d;
      for (int64_t u = 0; u < d; ++u) {
        const int64_t i = b * d + u;
        hb[u] = Pointwise(p[u], p[d + u], p[2 * d + u], p[3 * d + u], c_prev[i], n_prev[i],
                          m_prev[i], &c_cur[i], &n_cur[i], &m_cur[i]);
        h_prev[i] = hb[u];
      }
    }
    if (saved != nullptr) {
      SaveStep(lay, B, t, d, pre.data(), c_cur.data(), n_cur.data(), m_cur.data(), saved);
    }
    c_prev.swap(c_cur);
    n_prev.swap(n_cur);
    m_prev.swap(m_cur);
  }
  if (final_state.h != nullptr) {
    std::memcpy(final_state.h, h_prev.data(), sizeof(T) * B * d);
    std::memcpy(final_state.c, c_prev.data(), sizeof(T) * B * d);
    std::memcpy(final_state.n, n_prev.data(), sizeof(T) * B * d);
    std::memcpy(final_state.m, m_prev.data(), sizeof(T) * B * d);
  }
}

template <typename T>
void slstm_bwd_ref(const SlstmShape& shape, const T* r, SlstmStateRef<const T> initial, const T* h,
                   const T* saved, const T* dh, SlstmStateRef<const T> d_final, T* d_gx, T* dr,
                   SlstmStateRef<T> d_initial) {
  const int64_t B = shape.batch, S = shape.seq_len, NH = shape.num_heads, dhd = shape.head_dim;
  const int64_t d = NH * dhd;
  const SavedLayout lay = MakeLayout(shape);
  const std::vector<T> zeros(B * d, T(0));
  // Carried gradients w.r.t. the state after step t: (h, c, n, m).
  std::vector<T> gh(B * d, T(0)), gc(B * d, T(0)), gn(B * d, T(0)), gm(B * d, T(0));
  if (d_final.h != nullptr) {
    std::memcpy(gh.data(), d_final.h, sizeof(T) * B * d);
    std::memcpy(gc.data(), d_final.c, sizeof(T) * B * d);
    std::memcpy(gn.data(), d_final.n, sizeof(T) * B * d);
    std::memcpy(gm.data(), d_final.m, sizeof(T) * B * d);
  }
  std::vector<T> dpre(B * 4 * d), h_prev(B * d), dpre_head(B * 4 * dhd), gh_prev(B * d);
  std::vector<T> pre_buf(B * 4 * d), c_buf(B * d), n_buf(B * d), cp_buf(B * d), np_buf(B * d),
      mp_buf(B * d);
  for (int64_t t = S - 1; t >= 0; --t) {
    LoadRows(lay, B, lay.pre + t * 4 * d, 4 * d, saved, pre_buf.data());
    LoadRows(lay, B, lay.c + t * d, d, saved, c_buf.data());
    LoadRows(lay, B, lay.n + t * d, d, saved, n_buf.data());
    if (t > 0) {
      LoadRows(lay, B, lay.c + (t - 1) * d, d, saved, cp_buf.data());
      LoadRows(lay, B, lay.n + (t - 1) * d, d, saved, np_buf.data());
      LoadRows(lay, B, lay.m + (t - 1) * d, d, saved, mp_buf.data());
    }
    const T* pre = pre_buf.data();
    const T* ct = c_buf.data();
    const T* nt = n_buf.data();
    const T* c_prev = t > 0 ? cp_buf.data() : (initial.h != nullptr ? initial.c : zeros.data());
    const T* n_prev = t > 0 ? np_buf.data() : (initial.h != nullptr ? initial.n : zeros.data());
    const T* m_prev = t > 0 ? mp_buf.data() : (initial.h != nullptr ? initial.m : zeros.data());
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t u = 0; u < d; ++u) {
        h_prev[b * d + u] = t > 0 ? h[(b * S + t - 1) * d + u]
                                  : (initial.h != nullptr ? initial.h[b * d + u] : T(0));
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* p = pre + b * 4 * d;
      T* dp = dpre.data() + b * 4 * d;
      for (int64_t u = 0; u < d; ++u) {
        const int64_t i = b * d + u;
        const T i_raw = p[u], f_raw = p[d + u], z_raw = p[2 * d + u], o_raw = p[3 * d + u];
        // Recompute the step's intermediates.
        const T lf = LogSigmoid(f_raw) + m_prev[i];
        bool from_input = false;
        const T m_new = Stabiliser(i_raw, lf, n_prev[i], &from_input);
        // One of the two exponents is exactly 0 (the one m_t was taken from): skip its exp.
        const T ip = from_input ? T(1) : std::min(std::exp(i_raw - m_new), T(1));
        const T fp = from_input ? std::min(std::exp(lf - m_new), T(1)) : T(1);
        const T tz = std::tanh(z_raw);
        const T so = Sigmoid(o_raw);
        const T c = ct[i], n = nt[i];
        // h = σ(õ)·c/n.
        const T g_h = gh[i] + dh[(b * S + t) * d + u];
        const T d_o = g_h * (c / n) * so * (T(1) - so);
        T g_c = gc[i] + g_h * so / n;
        T g_n = gn[i] - g_h * so * c / (n * n);
        // c = f'·c_prev + i'·tanh(z̃), n = f'·n_prev + i'.
        const T g_fp = g_c * c_prev[i] + g_n * n_prev[i];
        const T g_ip = g_c * tz + g_n;
        const T d_z = g_c * ip * (T(1) - tz * tz);
        // i' = exp(ĩ − m), f' = exp(lf − m) (min(·, 1) passes the gradient of exp).
        T d_i = g_ip * ip;
        T g_lf = g_fp * fp;
        const T g_m = gm[i] - g_ip * ip - g_fp * fp;
        if (from_input) {
          d_i += g_m;
        } else {
          g_lf += g_m;
        }
        // lf = logσ(f̃) + m_{t−1}.
        const T d_f = g_lf * Sigmoid(-f_raw);
        dp[u] = d_i;
        dp[d + u] = d_f;
        dp[2 * d + u] = d_z;
        dp[3 * d + u] = d_o;
        gc[i] = g_c * fp;
        gn[i] = g_n * fp;
        gm[i] = g_lf;
      }
      std::memcpy(d_gx + (b * S + t) * 4 * d, dp, sizeof(T) * 4 * d);
    }
    // Recurrent part: pre_hd = h_prev_hd R_hdᵀ  ⇒  dh_prev_hd = dpre_hd R_hd, dR_hd += dpre_hdᵀ
    // h_prev_hd.
    for (int64_t hd = 0; hd < NH; ++hd) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t g = 0; g < 4; ++g) {
          std::memcpy(dpre_head.data() + b * 4 * dhd + g * dhd,
                      dpre.data() + b * 4 * d + g * d + hd * dhd, sizeof(T) * dhd);
        }
      }
      const T* r_hd = r + hd * 4 * dhd * dhd;
      Gemm(false, false, B, dhd, 4 * dhd, T(1), dpre_head.data(), 4 * dhd, r_hd, dhd, T(0),
           gh_prev.data() + hd * dhd, d);
      Gemm(true, false, 4 * dhd, dhd, B, T(1), dpre_head.data(), 4 * dhd, h_prev.data() + hd * dhd,
           d, T(1), dr + hd * 4 * dhd * dhd, dhd);
    }
    gh.swap(gh_prev);
  }
  if (d_initial.h != nullptr) {
    std::memcpy(d_initial.h, gh.data(), sizeof(T) * B * d);
    std::memcpy(d_initial.c, gc.data(), sizeof(T) * B * d);
    std::memcpy(d_initial.n, gn.data(), sizeof(T) * B * d);
    std::memcpy(d_initial.m, gm.data(), sizeof(T) * B * d);
  }
}

#define GYRE_SLSTM_INSTANTIATE(T)                                                               \
  template void slstm_fwd_ref<T>(const SlstmShape&, const T*, const T*, SlstmStateRef<const T>, \
                                 T*, T*, SlstmStateRef<T>);                                     \
  template void slstm_step_fwd_ref<T>(const SlstmShape&, const T*, const T*, SlstmStateRef<T>,  \
                                      T*);                                                      \
  template void slstm_bwd_ref<T>(const SlstmShape&, const T*, SlstmStateRef<const T>, const T*, \
                                 const T*, const T*, SlstmStateRef<const T>, T*, T*,            \
                                 SlstmStateRef<T>);
GYRE_SLSTM_INSTANTIATE(float)
GYRE_SLSTM_INSTANTIATE(double)
#undef GYRE_SLSTM_INSTANTIATE

}  // namespace gyre::cpu
