// mLSTM step recurrence and chunkwise form, forward and backward. Math, layouts, the gradient
// convention and contracts: mlstm.h. Letters below are MODELS.md §1.1/§1.3's.
//
// Contents
//   StepHead                   one step of one head (shared by the step and recurrent forwards)
//   mlstm_chunkwise_fwd_ref    per (batch, head), per chunk k of length L (last may be shorter):
//       b_t   = Σ_{r≤t in chunk} lf_r,  g = b_last               local log-forget cumsum
//       m_t   = b_t + max(m_k, max_{s≤t}(ĩ_s − b_s))              (= max(m^inter, m^intra))
//       P     = (Q̂Kᵀ) ⊙ W,  W_ts = e^{b_t − b_s + ĩ_s − m_t} (s ≤ t), 0 above the diagonal
//       G_t   = e^{b_t + m_k − m_t}                               weight of the carried state
//       num   = P V + diag(G) Q̂ C_k,  den = P 1 + diag(G) Q̂ n_k
//       h_t   = num_t / (max(|den_t|, e^{−m_t}) + ε)
//       m_{k+1} = max(g + m_k, max_t a_t),  a_t = g − b_t + ĩ_t
//       C_{k+1} = e^{g + m_k − m_{k+1}} C_k + Kᵀ diag(E) V,  E_t = e^{a_t − m_{k+1}}  (n: V → 1)
//     Products (Q̂Kᵀ, PV, Q̂C_k, KᵀEV) go through cblas ?gemm; everything else is O(L²) or
//     O(L·d) loops. Saved: boundary states (C_k, n_k, m_k) k = 0..NC, per-token m_t and den_t.
//   mlstm_chunkwise_bwd_ref    reverse over chunks carrying (dC, dn) = ∂/∂(C_{k+1}, n_{k+1}) with
//     every m frozen ("part (a)" in mlstm.h), then one scalar pass per head for the exact m
//     correction ("part (b)"), then lf → f̃ through σ(−f̃) (sigmoid) or 1 (exponential).
#include "kernels/cpu/mlstm.h"

#include "kernels/cpu/blas_gemm.h"
#include "kernels/cpu/cell_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace gyre::cpu {
namespace {

template <typename T>
T LogSigmoid(T x) {
  return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x));
}

template <typename T>
T Sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
T LogForget(MlstmForgetGate gate, T f_raw) {
  return gate == MlstmForgetGate::kSigmoid ? LogSigmoid(f_raw) : f_raw;
}

// d lf / d f̃.
template <typename T>
T LogForgetDerivative(MlstmForgetGate gate, T f_raw) {
  return gate == MlstmForgetGate::kSigmoid ? Sigmoid(-f_raw) : T(1);
}


// The opaque `saved` buffer: one block per (batch, head) in [B, NH] order, so batch row b's part
// is contiguous (mlstm.h promises this). Offsets below are inside one block.
struct SavedLayout {
  int64_t num_chunks = 0;
  int64_t c = 0, n = 0, m = 0, token_m = 0, token_den = 0, per_head = 0, total = 0;
};

SavedLayout MakeLayout(const MlstmShape& s, const MlstmOptions& o) {
  SavedLayout l;
  l.num_chunks = (s.seq_len + o.chunk_size - 1) / o.chunk_size;
  const int64_t nb = l.num_chunks + 1;
  l.c = 0;                              // [NB, dk, dv]  boundary C_k
  l.n = l.c + nb * s.dk * s.dv;         // [NB, dk]      boundary n_k
  l.m = l.n + nb * s.dk;                // [NB]          boundary m_k
  l.token_m = l.m + nb;                 // [S]           m_t
  l.token_den = l.token_m + s.seq_len;  // [S]        den_t = n_tᵀq̂_t
  l.per_head = l.token_den + s.seq_len;
  l.total = s.batch * s.num_heads * l.per_head;
  return l;
}

// One step of one head. c [dk, dv], n [dk], m scalar updated in place; h [dv] written.
template <typename T>
void StepHead(int64_t dk, int64_t dv, const MlstmOptions& o, const T* q, const T* k, const T* v,
              T i_raw, T f_raw, T* c, T* n, T* m, T* h) {
  const T lf = LogForget(o.forget_gate, f_raw);
  const T m_new = std::max(lf + *m, i_raw);
  const T fp = DecayExp(lf + *m - m_new), ip = DecayExp(i_raw - m_new);
  const T scale = T(1) / std::sqrt(T(dk));
  for (int64_t a = 0; a < dk; ++a) {
    T* row = c + a * dv;
    const T ik = ip * k[a];
    for (int64_t j = 0; j < dv; ++j) row[j] = fp * row[j] + ik * v[j];
    n[a] = fp * n[a] + ik;
  }
  *m = m_new;
  T den = 0;
  for (int64_t j = 0; j < dv; ++j) h[j] = 0;
  for (int64_t a = 0; a < dk; ++a) {
    const T qa = q[a] * scale;
    den += qa * n[a];
    const T* row = c + a * dv;
    for (int64_t j = 0; j < dv; ++j) h[j] += qa * row[j];
  }
  const T denom = std::max(std::abs(den), std::exp(-m_new)) + T(o.eps);
  for (int64_t j = 0; j < dv; ++j) h[j] /= denom;
}

}  // namespace

absl::Status mlstm_check(const MlstmShape& shape, const MlstmOptions& options) {
  if (shape.batch < 1 || shape.seq_len < 1 || shape.num_heads < 1 || shape.dk < 1 || shape.dv < 1) {
    return absl::InvalidArgumentError("mlstm: batch, seq_len, num_heads, dk, dv must be >= 1");
  }
  if (options.chunk_size < 1) {
    return absl::InvalidArgumentError("mlstm: chunk_size must be >= 1");
  }
  if (!(options.eps >= 0)) return absl::InvalidArgumentError("mlstm: eps must be >= 0");
  return absl::OkStatus();
}

int64_t mlstm_chunkwise_saved_size(const MlstmShape& shape, const MlstmOptions& options) {
  return MakeLayout(shape, options).total;
}

template <typename T>
void mlstm_step_fwd_ref(const MlstmShape& shape, const MlstmOptions& options, const T* q,
                        const T* k, const T* v, const T* igate, const T* fgate,
                        MlstmStateRef<T> state, T* h) {
  const int64_t dk = shape.dk, dv = shape.dv;
  for (int64_t bh = 0; bh < shape.batch * shape.num_heads; ++bh) {
    StepHead(dk, dv, options, q + bh * dk, k + bh * dk, v + bh * dv, igate[bh], fgate[bh],
             state.c + bh * dk * dv, state.n + bh * dk, state.m + bh, h + bh * dv);
  }
}

template <typename T>
void mlstm_recurrent_fwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, T* h,
                             MlstmStateRef<T> final_state) {
  const int64_t S = shape.seq_len, NH = shape.num_heads, dk = shape.dk, dv = shape.dv;
  std::vector<T> c(dk * dv), n(dk);
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t hd = 0; hd < NH; ++hd) {
      const int64_t bh = b * NH + hd;
      T m = 0;
      if (initial.c != nullptr) {
        std::memcpy(c.data(), initial.c + bh * dk * dv, sizeof(T) * dk * dv);
        std::memcpy(n.data(), initial.n + bh * dk, sizeof(T) * dk);
        m = initial.m[bh];
      } else {
        std::fill(c.begin(), c.end(), T(0));
        std::fill(n.begin(), n.end(), T(0));
      }
      for (int64_t t = 0; t < S; ++t) {
        const int64_t tok = (b * S + t) * NH + hd;
        StepHead(dk, dv, options, in.q + tok * dk, in.k + tok * dk, in.v + tok * dv, in.igate[tok],
                 in.fgate[tok], c.data(), n.data(), &m, h + tok * dv);
      }
      if (final_state.c != nullptr) {
        std::memcpy(final_state.c + bh * dk * dv, c.data(), sizeof(T) * dk * dv);
        std::memcpy(final_state.n + bh * dk, n.data(), sizeof(T) * dk);
        final_state.m[bh] = m;
      }
    }
  }
}

template <typename T>
void mlstm_chunkwise_fwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, T* h,
                             T* saved, MlstmStateRef<T> final_state) {
  const int64_t S = shape.seq_len, NH = shape.num_heads, DK = shape.dk, DV = shape.dv;
  const int64_t L = std::min(options.chunk_size, S);
  const SavedLayout lay = MakeLayout(shape, options);
  const int64_t ldqk = NH * DK, ldv = NH * DV;  // token strides of q/k and v/h
  const T scale = T(1) / std::sqrt(T(DK));
  const T eps = T(options.eps);

  std::vector<T> lf(S), bl(L), mt(L), gw(L), qs(L * DK), ps(L * L), num(L * DV), ke(L * DK);
  // Without a backward to feed (saved == nullptr: inference prefill), one head's block of
  // scratch stands in for the saved buffer.
  std::vector<T> scratch(saved == nullptr ? lay.per_head : 0);
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t hd = 0; hd < NH; ++hd) {
      const int64_t bh = b * NH + hd;
      T* block = saved != nullptr ? saved + bh * lay.per_head : scratch.data();
      T* cb = block + lay.c;
      T* nb = block + lay.n;
      T* mb = block + lay.m;
      T* tok_m = block + lay.token_m;
      T* tok_den = block + lay.token_den;
      if (initial.c != nullptr) {
        std::memcpy(cb, initial.c + bh * DK * DV, sizeof(T) * DK * DV);
        std::memcpy(nb, initial.n + bh * DK, sizeof(T) * DK);
        mb[0] = initial.m[bh];
      } else {
        std::fill(cb, cb + DK * DV, T(0));
        std::fill(nb, nb + DK, T(0));
        mb[0] = 0;
      }
      const int64_t tok0 = b * S * NH + hd;  // token index of (b, t = 0, hd)
      const T* qh = in.q + tok0 * DK;
      const T* kh = in.k + tok0 * DK;
      const T* vh = in.v + tok0 * DV;
      T* hh = h + tok0 * DV;
      const T* ig = in.igate + tok0;  // stride NH
      const T* fg = in.fgate + tok0;
      for (int64_t t = 0; t < S; ++t) lf[t] = LogForget(options.forget_gate, fg[t * NH]);

      for (int64_t k = 0; k < lay.num_chunks; ++k) {
        const int64_t t0 = k * options.chunk_size;
        const int64_t len = std::min(options.chunk_size, S - t0);
        const T* ck = cb + k * DK * DV;
        const T* nk = nb + k * DK;
        const T mk = mb[k];
        // Local cumsum b_t and the stabiliser m_t.
        T acc = 0, run = -std::numeric_limits<T>::infinity();
        for (int64_t t = 0; t < len; ++t) {
          acc += lf[t0 + t];
          bl[t] = acc;
          run = std::max(run, ig[(t0 + t) * NH] - acc);
          mt[t] = acc + std::max(mk, run);
          gw[t] = DecayExp(acc + mk - mt[t]);
        }
        const T g = bl[len - 1];
        // Q̂ = q / sqrt(dk), contiguous [len, DK].
        for (int64_t t = 0; t < len; ++t) {
          const T* qt = qh + (t0 + t) * ldqk;
          for (int64_t a = 0; a < DK; ++a) qs[t * DK + a] = qt[a] * scale;
        }
        // P = (Q̂ Kᵀ) ⊙ W, causal.
        Gemm(false, true, len, len, DK, T(1), qs.data(), DK, kh + t0 * ldqk, ldqk, T(0), ps.data(),
             len);
        for (int64_t t = 0; t < len; ++t) {
          T* row = ps.data() + t * len;
          for (int64_t s = 0; s <= t; ++s) {
            row[s] *= DecayExp(bl[t] - bl[s] + ig[(t0 + s) * NH] - mt[t]);
          }
          for (int64_t s = t + 1; s < len; ++s) row[s] = 0;
        }
        // num = diag(G) Q̂ C_k + P V.
        Gemm(false, false, len, DV, DK, T(1), qs.data(), DK, ck, DV, T(0), num.data(), DV);
        for (int64_t t = 0; t < len; ++t) {
          for (int64_t j = 0; j < DV; ++j) num[t * DV + j] *= gw[t];
        }
        Gemm(false, false, len, DV, len, T(1), ps.data(), len, vh + t0 * ldv, ldv, T(1), num.data(),
             DV);
        for (int64_t t = 0; t < len; ++t) {
          T den = gw[t] * Dot(qs.data() + t * DK, nk, DK);
          const T* row = ps.data() + t * len;
          for (int64_t s = 0; s <= t; ++s) den += row[s];
          const T denom = std::max(std::abs(den), std::exp(-mt[t])) + eps;
          T* ht = hh + (t0 + t) * ldv;
          for (int64_t j = 0; j < DV; ++j) ht[j] = num[t * DV + j] / denom;
          tok_m[t0 + t] = mt[t];
          tok_den[t0 + t] = den;
        }
        // Boundary state k+1.
        T m_next = g + mk;
        for (int64_t t = 0; t < len; ++t) {
          m_next = std::max(m_next, g - bl[t] + ig[(t0 + t) * NH]);
        }
        const T decay = DecayExp(g + mk - m_next);
        T* cn = cb + (k + 1) * DK * DV;
        T* nn = nb + (k + 1) * DK;
        for (int64_t a = 0; a < DK; ++a) nn[a] = decay * nk[a];
        for (int64_t t = 0; t < len; ++t) {
          const T e = DecayExp(g - bl[t] + ig[(t0 + t) * NH] - m_next);
          const T* kt = kh + (t0 + t) * ldqk;
          for (int64_t a = 0; a < DK; ++a) {
            ke[t * DK + a] = e * kt[a];
            nn[a] += ke[t * DK + a];
          }
        }
        for (int64_t i = 0; i < DK * DV; ++i) cn[i] = decay * ck[i];
        Gemm(true, false, DK, DV, len, T(1), ke.data(), DK, vh + t0 * ldv, ldv, T(1), cn, DV);
        mb[k + 1] = m_next;
      }
      if (final_state.c != nullptr) {
        std::memcpy(final_state.c + bh * DK * DV, cb + lay.num_chunks * DK * DV,
                    sizeof(T) * DK * DV);
        std::memcpy(final_state.n + bh * DK, nb + lay.num_chunks * DK, sizeof(T) * DK);
        final_state.m[bh] = mb[lay.num_chunks];
      }
    }
  }
}

template <typename T>
void mlstm_chunkwise_bwd_ref(const MlstmShape& shape, const MlstmOptions& options,
                             const MlstmInputs<T>& in, MlstmStateRef<const T> initial, const T* h,
                             const T* saved, const T* dh, MlstmStateRef<const T> d_final,
                             const MlstmGrads<T>& grads, MlstmStateRef<T> d_initial) {
  const int64_t S = shape.seq_len, NH = shape.num_heads, DK = shape.dk, DV = shape.dv;
  const int64_t L = std::min(options.chunk_size, S);
  const SavedLayout lay = MakeLayout(shape, options);
  const int64_t ldqk = NH * DK, ldv = NH * DV;
  const T scale = T(1) / std::sqrt(T(DK));
  const T eps = T(options.eps);

  // Per head, whole sequence.
  std::vector<T> lf(S), dlf(S), dig(S), dm(S), dbig(S);
  // Per chunk.
  std::vector<T> bl(L), gw(L), ew(L), dnum(L * DV), dden(L), db(L);
  std::vector<T> qs(L * DK), sc(L * L), wm(L * L), dp(L * L), ke(L * DK), u(L * DK);
  std::vector<T> dq(L * DK), dkk(L * DK), dvv(L * DV), y(L * DK);
  std::vector<T> dc(DK * DV), dn(DK), dc_acc(DK * DV), dn_acc(DK);

  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t hd = 0; hd < NH; ++hd) {
      const int64_t bh = b * NH + hd;
      const T* cb = saved + bh * lay.per_head + lay.c;
      const T* nb = saved + bh * lay.per_head + lay.n;
      const T* mb = saved + bh * lay.per_head + lay.m;
      const T* tok_m = saved + bh * lay.per_head + lay.token_m;
      const T* tok_den = saved + bh * lay.per_head + lay.token_den;
      const int64_t tok0 = b * S * NH + hd;
      const T* qh = in.q + tok0 * DK;
      const T* kh = in.k + tok0 * DK;
      const T* vh = in.v + tok0 * DV;
      const T* hh = h + tok0 * DV;
      const T* dhh = dh + tok0 * DV;
      const T* ig = in.igate + tok0;
      const T* fg = in.fgate + tok0;
      for (int64_t t = 0; t < S; ++t) lf[t] = LogForget(options.forget_gate, fg[t * NH]);
      std::fill(dlf.begin(), dlf.end(), T(0));
      std::fill(dig.begin(), dig.end(), T(0));

      if (d_final.c != nullptr) {
        std::memcpy(dc.data(), d_final.c + bh * DK * DV, sizeof(T) * DK * DV);
        std::memcpy(dn.data(), d_final.n + bh * DK, sizeof(T) * DK);
      } else {
        std::fill(dc.begin(), dc.end(), T(0));
        std::fill(dn.begin(), dn.end(), T(0));
      }

      // ---- Part (a): every m frozen. ----
      for (int64_t k = lay.num_chunks - 1; k >= 0; --k) {
        const int64_t t0 = k * options.chunk_size;
        const int64_t len = std::min(options.chunk_size, S - t0);
        const T* ck = cb + k * DK * DV;
        const T* nk = nb + k * DK;
        const T mk = mb[k], m_next = mb[k + 1];
        const T* mt = tok_m + t0;
        T acc = 0;
        for (int64_t t = 0; t < len; ++t) {
          acc += lf[t0 + t];
          bl[t] = acc;
          gw[t] = DecayExp(acc + mk - mt[t]);
        }
        const T g = bl[len - 1];
        const T decay = DecayExp(g + mk - m_next);
        for (int64_t t = 0; t < len; ++t) {
          ew[t] = DecayExp(g - bl[t] + ig[(t0 + t) * NH] - m_next);
          const T* kt = kh + (t0 + t) * ldqk;
          const T* qt = qh + (t0 + t) * ldqk;
          for (int64_t a = 0; a < DK; ++a) {
            ke[t * DK + a] = ew[t] * kt[a];
            qs[t * DK + a] = qt[a] * scale;
          }
        }
        // Output-side upstream gradients: dnum, dden, and the m correction dm (part (b)).
        for (int64_t t = 0; t < len; ++t) {
          const T* ht = hh + (t0 + t) * ldv;
          const T* dht = dhh + (t0 + t) * ldv;
          const T den = tok_den[t0 + t];
          const T floor = std::exp(-mt[t]);
          const T denom = std::max(std::abs(den), floor) + eps;
          const T dh_dot_h = Dot(dht, ht, DV);
          for (int64_t j = 0; j < DV; ++j) dnum[t * DV + j] = dht[j] / denom;
          if (options.stop_normaliser_gradient) {
            dden[t] = 0;
            dm[t0 + t] = 0;
          } else {
            const T dd = -dh_dot_h / denom;
            dden[t] = std::abs(den) >= floor ? (den >= 0 ? dd : -dd) : T(0);
            dm[t0 + t] = -dh_dot_h * eps / denom;
          }
          db[t] = 0;
        }
        T dg = 0;

        // State update C_{k+1} = decay·C_k + Kᵀ diag(E) V (n: V → 1).
        //   U = V dCᵀ + 1 dnᵀ;  dK = diag(E) U;  dV = diag(E) K dC;  da_t = E_t k_t·U_t.
        Gemm(false, true, len, DK, DV, T(1), vh + t0 * ldv, ldv, dc.data(), DV, T(0), u.data(), DK);
        for (int64_t t = 0; t < len; ++t) {
          T* ut = u.data() + t * DK;
          for (int64_t a = 0; a < DK; ++a) ut[a] += dn[a];
          const T da = Dot(ke.data() + t * DK, ut, DK);
          for (int64_t a = 0; a < DK; ++a) dkk[t * DK + a] = ew[t] * ut[a];
          dig[t0 + t] += da;
          dg += da;
          db[t] -= da;
        }
        Gemm(false, false, len, DV, DK, T(1), ke.data(), DK, dc.data(), DV, T(0), dvv.data(), DV);
        dg += decay * (Dot(dc.data(), ck, DK * DV) + Dot(dn.data(), nk, DK));
        for (int64_t i = 0; i < DK * DV; ++i) dc_acc[i] = decay * dc[i];
        for (int64_t a = 0; a < DK; ++a) dn_acc[a] = decay * dn[a];

        // Intra-chunk: S = Q̂Kᵀ, W, P = S⊙W;  dP = dnum Vᵀ + dden 1ᵀ (causal).
        Gemm(false, true, len, len, DK, T(1), qs.data(), DK, kh + t0 * ldqk, ldqk, T(0), sc.data(),
             len);
        Gemm(false, true, len, len, DV, T(1), dnum.data(), DV, vh + t0 * ldv, ldv, T(0), dp.data(),
             len);
        for (int64_t t = 0; t < len; ++t) {
          T* wrow = wm.data() + t * len;
          T* prow = sc.data() + t * len;   // becomes P
          T* dprow = dp.data() + t * len;  // becomes dS = dP ⊙ W
          T row_sum = 0;
          for (int64_t s = 0; s <= t; ++s) {
            wrow[s] = DecayExp(bl[t] - bl[s] + ig[(t0 + s) * NH] - mt[t]);
            prow[s] *= wrow[s];
            const T dps = dprow[s] + dden[t];
            const T dlog = dps * prow[s];  // ∂/∂logD_ts
            row_sum += dlog;
            dig[t0 + s] += dlog;
            db[s] -= dlog;
            dprow[s] = dps * wrow[s];
          }
          db[t] += row_sum;
          for (int64_t s = t + 1; s < len; ++s) {
            prow[s] = 0;
            dprow[s] = 0;
          }
        }
        // dV += Pᵀ dnum;  dQ̂ = dS K;  dK += dSᵀ Q̂.
        Gemm(true, false, len, DV, len, T(1), sc.data(), len, dnum.data(), DV, T(1), dvv.data(),
             DV);
        Gemm(false, false, len, DK, len, T(1), dp.data(), len, kh + t0 * ldqk, ldqk, T(0),
             dq.data(), DK);
        Gemm(true, false, len, DK, len, T(1), dp.data(), len, qs.data(), DK, T(1), dkk.data(), DK);

        // Inter-chunk (carried state): num += G_t C_kᵀq̂_t, den += G_t n_k·q̂_t.
        //   Y = dnum C_kᵀ;  dQ̂_t += G_t (Y_t + dden_t n_k);  dlogG_t = q̂_t·(that);
        //   dC_k += Q̂ᵀ diag(G) dnum;  dn_k += Q̂ᵀ (G ⊙ dden).
        Gemm(false, true, len, DK, DV, T(1), dnum.data(), DV, ck, DV, T(0), y.data(), DK);
        for (int64_t t = 0; t < len; ++t) {
          T* yt = y.data() + t * DK;
          for (int64_t a = 0; a < DK; ++a) yt[a] += dden[t] * nk[a];
          db[t] += gw[t] * Dot(qs.data() + t * DK, yt, DK);
          T* ut = u.data() + t * DK;  // reuse U as diag(G) Q̂
          for (int64_t a = 0; a < DK; ++a) {
            dq[t * DK + a] += gw[t] * yt[a];
            ut[a] = gw[t] * qs[t * DK + a];
            dn_acc[a] += ut[a] * dden[t];
          }
        }
        Gemm(true, false, DK, DV, len, T(1), u.data(), DK, dnum.data(), DV, T(1), dc_acc.data(),
             DV);

        // Write this chunk's dq, dk, dv (each token belongs to exactly one chunk).
        for (int64_t t = 0; t < len; ++t) {
          T* dqt = grads.dq + (tok0 + (t0 + t) * NH) * DK;
          T* dkt = grads.dk + (tok0 + (t0 + t) * NH) * DK;
          T* dvt = grads.dv + (tok0 + (t0 + t) * NH) * DV;
          for (int64_t a = 0; a < DK; ++a) {
            dqt[a] = dq[t * DK + a] * scale;
            dkt[a] = dkk[t * DK + a];
          }
          std::memcpy(dvt, dvv.data() + t * DV, sizeof(T) * DV);
        }
        // b_t = Σ_{r≤t} lf_r and g = b_last:  dlf_r = dg + Σ_{t≥r} db_t.
        T rev = 0;
        for (int64_t t = len - 1; t >= 0; --t) {
          rev += db[t];
          dlf[t0 + t] += rev + dg;
        }
        dc.swap(dc_acc);
        dn.swap(dn_acc);
      }
      // dc, dn now hold ∂/∂(C_0, n_0) with m_0 frozen.

      // ---- Part (b): the exact m correction. ----
      // m_t = B_t + max(m_0, max_{s≤t}(ĩ_s − B_s)), B = global cumsum of lf. The final state's
      // m_S is m_{S−1}; its C_S, n_S carry e^{−m_S}: ∂/∂m_S = d m_S − <dC_S, C_S> − <dn_S, n_S>.
      if (d_final.c != nullptr) {
        const T* cs = cb + lay.num_chunks * DK * DV;
        const T* ns = nb + lay.num_chunks * DK;
        dm[S - 1] += d_final.m[bh] - Dot(d_final.c + bh * DK * DV, cs, DK * DV) -
                     Dot(d_final.n + bh * DK, ns, DK);
      }
      T dm0 = 0;
      if (initial.c != nullptr) {
        // C_0 enters as e^{m_0}·C_0 (unstabilised): ∂/∂m_0 = <dC_0, C_0> + <dn_0, n_0>.
        dm0 += Dot(dc.data(), initial.c + bh * DK * DV, DK * DV) +
               Dot(dn.data(), initial.n + bh * DK, DK);
      }
      {
        const double m0 = initial.c != nullptr ? double(initial.m[bh]) : 0.0;
        double big_b = 0, best = m0;
        int64_t arg = -1;  // -1: the initial m_0 is the maximum
        T* dB = dbig.data();
        std::fill(dB, dB + S, T(0));
        for (int64_t t = 0; t < S; ++t) {
          big_b += double(lf[t]);
          const double cand = double(ig[t * NH]) - big_b;
          if (cand > best) {
            best = cand;
            arg = t;
          }
          dB[t] += dm[t];
          if (arg >= 0) {
            dig[arg] += dm[t];
            dB[arg] -= dm[t];
          } else {
            dm0 += dm[t];
          }
        }
        T rev = 0;
        for (int64_t t = S - 1; t >= 0; --t) {
          rev += dB[t];
          dlf[t] += rev;
        }
      }

      for (int64_t t = 0; t < S; ++t) {
        grads.digate[tok0 + t * NH] = dig[t];
        grads.dfgate[tok0 + t * NH] = dlf[t] * LogForgetDerivative(options.forget_gate, fg[t * NH]);
      }
      if (d_initial.c != nullptr) {
        std::memcpy(d_initial.c + bh * DK * DV, dc.data(), sizeof(T) * DK * DV);
        std::memcpy(d_initial.n + bh * DK, dn.data(), sizeof(T) * DK);
        d_initial.m[bh] = dm0;
      }
    }
  }
}

#define GYRE_MLSTM_INSTANTIATE(T)                                                                 \
  template void mlstm_step_fwd_ref<T>(const MlstmShape&, const MlstmOptions&, const T*, const T*, \
                                      const T*, const T*, const T*, MlstmStateRef<T>, T*);        \
  template void mlstm_recurrent_fwd_ref<T>(const MlstmShape&, const MlstmOptions&,                \
                                           const MlstmInputs<T>&, MlstmStateRef<const T>, T*,     \
                                           MlstmStateRef<T>);                                     \
  template void mlstm_chunkwise_fwd_ref<T>(const MlstmShape&, const MlstmOptions&,                \
                                           const MlstmInputs<T>&, MlstmStateRef<const T>, T*, T*, \
                                           MlstmStateRef<T>);                                     \
  template void mlstm_chunkwise_bwd_ref<T>(const MlstmShape&, const MlstmOptions&,                \
                                           const MlstmInputs<T>&, MlstmStateRef<const T>,         \
                                           const T*, const T*, const T*, MlstmStateRef<const T>,  \
                                           const MlstmGrads<T>&, MlstmStateRef<T>);
GYRE_MLSTM_INSTANTIATE(float)
GYRE_MLSTM_INSTANTIATE(double)
#undef GYRE_MLSTM_INSTANTIATE

}  // namespace gyre::cpu
