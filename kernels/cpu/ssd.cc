// Mamba-2 SSD: step recurrence and chunked algorithm, forward and backward. Math, layouts and
// contracts: ssd.h. Letters as MODELS.md §4.1–4.2.
//
// Contents
//   ssd_step_fwd_ref / ssd_recurrent_fwd_ref   the recurrence, one token at a time
//   ssd_chunked_fwd_ref   per batch row, per chunk of length Q (last may be shorter), per head:
//       a_t = dt_t·A,  Acs = local cumsum of a,  X̄_s = dt_s x_s
//       M   = (C Bᵀ) ⊙ Lw,  Lw_ls = e^{Acs_l − Acs_s} (s ≤ l), 0 above the diagonal
//       y   = M X̄ + diag(e^{Acs}) C H_{c−1}ᵀ + D x                       (steps 1, 4)
//       H_c = e^{Acs_last} H_{c−1} + (diag(w) X̄)ᵀ B,  w_s = e^{Acs_last − Acs_s}  (steps 2, 3)
//     Products through cblas ?gemm. Saved: boundary states H_0..H_NC and dt (after softplus).
//   ssd_chunked_bwd_ref   reverse over chunks carrying dH = ∂/∂H_c per head; in-chunk gradients
//     are the transposes of the products above; ∂/∂Acs is turned into ∂/∂a by a reverse cumsum,
//     then ∂/∂dt, ∂/∂A (→ A_log), ∂/∂x. B and C are shared by the heads of a group, so dB and dC
//     are zeroed once and summed over heads.
#include "kernels/cpu/ssd.h"

#include "kernels/cpu/blas_gemm.h"
#include "kernels/cpu/cell_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace gyre::cpu {
namespace {

template <typename T>
T Softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
T Sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}


// dt after bias, softplus and clamp; *grad_passes = whether the clamp lets the gradient through.
template <typename T>
T ComputeDt(const SsdOptions& o, T raw, T bias, bool* grad_passes = nullptr) {
  const T sp = Softplus(raw + bias);
  T dt = sp;
  if (sp < T(o.dt_min)) dt = T(o.dt_min);
  if (sp > T(o.dt_max)) dt = T(o.dt_max);
  if (grad_passes != nullptr) *grad_passes = (dt == sp);
  return dt;
}

// The opaque `saved` buffer: one block per batch row (ssd.h promises that batch row b's part is
// contiguous). Offsets below are inside one block.
struct SavedLayout {
  int64_t num_chunks = 0;
  int64_t states = 0, dt = 0, per_batch = 0, total = 0;
};

SavedLayout MakeLayout(const SsdShape& s, const SsdOptions& o) {
  SavedLayout l;
  l.num_chunks = (s.seq_len + o.chunk_size - 1) / o.chunk_size;
  l.states = 0;  // [H, NB, P, N]  boundary states H_c
  l.dt = s.num_heads * (l.num_chunks + 1) * s.head_dim * s.state_dim;  // [S, H] dt
  l.per_batch = l.dt + s.seq_len * s.num_heads;
  l.total = s.batch * l.per_batch;
  return l;
}

}  // namespace

absl::Status ssd_check(const SsdShape& shape, const SsdOptions& options) {
  if (shape.batch < 1 || shape.seq_len < 1 || shape.num_heads < 1 || shape.head_dim < 1 ||
      shape.num_groups < 1 || shape.state_dim < 1) {
    return absl::InvalidArgumentError(
        "ssd: batch, seq_len, num_heads, head_dim, num_groups, state_dim must be >= 1");
  }
  if (shape.num_heads % shape.num_groups != 0) {
    return absl::InvalidArgumentError("ssd: num_groups must divide num_heads");
  }
  if (options.chunk_size < 1) return absl::InvalidArgumentError("ssd: chunk_size must be >= 1");
  if (!(options.dt_min >= 0) || !(options.dt_max >= options.dt_min)) {
    return absl::InvalidArgumentError("ssd: need 0 <= dt_min <= dt_max");
  }
  return absl::OkStatus();
}

int64_t ssd_chunked_saved_size(const SsdShape& shape, const SsdOptions& options) {
  return MakeLayout(shape, options).total;
}

template <typename T>
void ssd_step_fwd_ref(const SsdShape& shape, const SsdOptions& options, const T* x, const T* dt,
                      const T* a_log, const T* dt_bias, const T* b, const T* c, const T* d,
                      T* state, T* y) {
  const int64_t H = shape.num_heads, P = shape.head_dim, N = shape.state_dim;
  const int64_t G = shape.num_groups, heads_per_group = H / G;
  for (int64_t bb = 0; bb < shape.batch; ++bb) {
    for (int64_t hd = 0; hd < H; ++hd) {
      const int64_t grp = hd / heads_per_group;
      const T* xt = x + (bb * H + hd) * P;
      const T* bt = b + (bb * G + grp) * N;
      const T* ct = c + (bb * G + grp) * N;
      T* st = state + (bb * H + hd) * P * N;
      T* yt = y + (bb * H + hd) * P;
      const T dtv = ComputeDt(options, dt[bb * H + hd], dt_bias[hd]);
      const T decay = DecayExp(-dtv * std::exp(a_log[hd]));
      for (int64_t p = 0; p < P; ++p) {
        T* row = st + p * N;
        const T dx = dtv * xt[p];
        T acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          row[n] = decay * row[n] + dx * bt[n];
          acc += row[n] * ct[n];
        }
        yt[p] = acc + (d != nullptr ? d[hd] * xt[p] : T(0));
      }
    }
  }
}

template <typename T>
void ssd_recurrent_fwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                           const T* initial_state, T* y, T* final_state) {
  const int64_t S = shape.seq_len, H = shape.num_heads, P = shape.head_dim, N = shape.state_dim;
  const int64_t G = shape.num_groups;
  SsdShape one = shape;
  one.batch = 1;
  std::vector<T> state(H * P * N), xt(H * P), dtt(H), bt(G * N), ct(G * N), yt(H * P);
  for (int64_t bb = 0; bb < shape.batch; ++bb) {
    if (initial_state != nullptr) {
      std::memcpy(state.data(), initial_state + bb * H * P * N, sizeof(T) * H * P * N);
    } else {
      std::fill(state.begin(), state.end(), T(0));
    }
    for (int64_t t = 0; t < S; ++t) {
      const int64_t tok = bb * S + t;
      ssd_step_fwd_ref(one, options, in.x + tok * H * P, in.dt + tok * H, in.a_log, in.dt_bias,
                       in.b + tok * G * N, in.c + tok * G * N, in.d, state.data(), y + tok * H * P);
    }
    if (final_state != nullptr) {
      std::memcpy(final_state + bb * H * P * N, state.data(), sizeof(T) * H * P * N);
    }
  }
}

template <typename T>
void ssd_chunked_fwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                         const T* initial_state, T* y, T* saved, T* final_state) {
  const int64_t S = shape.seq_len, H = shape.num_heads, P = shape.head_dim, N = shape.state_dim;
  const int64_t G = shape.num_groups, heads_per_group = H / G;
  const int64_t Q = std::min(options.chunk_size, S);
  const SavedLayout lay = MakeLayout(shape, options);
  const int64_t NB = lay.num_chunks + 1;
  const int64_t ldx = H * P, ldbc = G * N;

  std::vector<T> acs(Q), xbar(Q * P), m(Q * Q), yc(Q * P), z(Q * P);
  // Without a backward to feed (saved == nullptr: inference prefill), one batch row's block of
  // scratch stands in for the saved buffer.
  std::vector<T> scratch(saved == nullptr ? lay.per_batch : 0);
  for (int64_t bb = 0; bb < shape.batch; ++bb) {
    T* block = saved != nullptr ? saved + bb * lay.per_batch : scratch.data();
    // dt for every head of this batch row (saved; the backward reads it back).
    T* dts = block + lay.dt;
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t hd = 0; hd < H; ++hd) {
        dts[t * H + hd] = ComputeDt(options, in.dt[(bb * S + t) * H + hd], in.dt_bias[hd]);
      }
    }
    for (int64_t hd = 0; hd < H; ++hd) {
      T* hs = block + lay.states + hd * NB * P * N;
      if (initial_state != nullptr) {
        std::memcpy(hs, initial_state + (bb * H + hd) * P * N, sizeof(T) * P * N);
      } else {
        std::fill(hs, hs + P * N, T(0));
      }
    }
    // Chunk-major: every head of a chunk runs before the next chunk, so the chunk's rows of x,
    // B, C and y stay in cache across heads.
    for (int64_t k = 0; k < lay.num_chunks; ++k) {
      for (int64_t hd = 0; hd < H; ++hd) {
        const int64_t grp = hd / heads_per_group;
        const T A = -std::exp(in.a_log[hd]);
        const T dskip = in.d != nullptr ? in.d[hd] : T(0);
        T* hs = block + lay.states + hd * NB * P * N;
        const T* xh = in.x + bb * S * ldx + hd * P;
        const T* bh = in.b + bb * S * ldbc + grp * N;
        const T* ch = in.c + bb * S * ldbc + grp * N;
        T* yh = y + bb * S * ldx + hd * P;
        const int64_t t0 = k * options.chunk_size;
        const int64_t len = std::min(options.chunk_size, S - t0);
        const T* hprev = hs + k * P * N;
        T* hnext = hs + (k + 1) * P * N;
        T acc = 0;
        for (int64_t t = 0; t < len; ++t) {
          const T dtv = dts[(t0 + t) * H + hd];
          acc += dtv * A;
          acs[t] = acc;
          const T* xt = xh + (t0 + t) * ldx;
          for (int64_t p = 0; p < P; ++p) xbar[t * P + p] = dtv * xt[p];
        }
        // M = (C Bᵀ) ⊙ Lw, causal.
        Gemm(false, true, len, len, N, T(1), ch + t0 * ldbc, ldbc, bh + t0 * ldbc, ldbc, T(0),
             m.data(), len);
        for (int64_t l = 0; l < len; ++l) {
          T* row = m.data() + l * len;
          for (int64_t s = 0; s <= l; ++s) row[s] *= DecayExp(acs[l] - acs[s]);
          for (int64_t s = l + 1; s < len; ++s) row[s] = 0;
        }
        // y = diag(e^{Acs}) C H_{c−1}ᵀ + M X̄ + D x.
        Gemm(false, true, len, P, N, T(1), ch + t0 * ldbc, ldbc, hprev, N, T(0), yc.data(), P);
        for (int64_t l = 0; l < len; ++l) {
          const T e = DecayExp(acs[l]);
          for (int64_t p = 0; p < P; ++p) yc[l * P + p] *= e;
        }
        Gemm(false, false, len, P, len, T(1), m.data(), len, xbar.data(), P, T(1), yc.data(), P);
        for (int64_t l = 0; l < len; ++l) {
          const T* xt = xh + (t0 + l) * ldx;
          T* yt = yh + (t0 + l) * ldx;
          for (int64_t p = 0; p < P; ++p) yt[p] = yc[l * P + p] + dskip * xt[p];
        }
        // H_c = e^{Acs_last} H_{c−1} + (diag(w) X̄)ᵀ B.
        const T last = acs[len - 1];
        for (int64_t t = 0; t < len; ++t) {
          const T w = DecayExp(last - acs[t]);
          for (int64_t p = 0; p < P; ++p) z[t * P + p] = w * xbar[t * P + p];
        }
        const T e_last = DecayExp(last);
        for (int64_t i = 0; i < P * N; ++i) hnext[i] = e_last * hprev[i];
        Gemm(true, false, P, N, len, T(1), z.data(), P, bh + t0 * ldbc, ldbc, T(1), hnext, N);
      }
    }
    if (final_state != nullptr) {
      for (int64_t hd = 0; hd < H; ++hd) {
        const T* hs = block + lay.states + hd * NB * P * N;
        std::memcpy(final_state + (bb * H + hd) * P * N, hs + lay.num_chunks * P * N,
                    sizeof(T) * P * N);
      }
    }
  }
}

template <typename T>
void ssd_chunked_bwd_ref(const SsdShape& shape, const SsdOptions& options, const SsdInputs<T>& in,
                         const T* initial_state, const T* saved, const T* dy,
                         const T* d_final_state, const SsdGrads<T>& grads, T* d_initial_state) {
  (void)initial_state;  // its value lives in `saved` (boundary state 0)
  const int64_t S = shape.seq_len, H = shape.num_heads, P = shape.head_dim, N = shape.state_dim;
  const int64_t G = shape.num_groups, heads_per_group = H / G;
  const int64_t Q = std::min(options.chunk_size, S);
  const SavedLayout lay = MakeLayout(shape, options);
  const int64_t NB = lay.num_chunks + 1;
  const int64_t ldx = H * P, ldbc = G * N;

  std::fill(grads.db, grads.db + shape.batch * S * ldbc, T(0));
  std::fill(grads.dc, grads.dc + shape.batch * S * ldbc, T(0));

  std::vector<T> acs(Q), dacs(Q), xbar(Q * P), lw(Q * Q), m(Q * Q), dm(Q * Q), z(Q * P), zc(Q * P),
      dxbar(Q * P), dzw(Q * P), dbl(Q * N), dcl(Q * N);
  // Per head: the carried dH (one [P, N] block each) and double accumulators for dA and dD
  // (these sums cancel heavily: Acs terms enter with both signs).
  std::vector<T> dh_all(H * P * N), dh_prev(P * N);
  std::vector<double> dA_all(H), dD_all(H);
  for (int64_t bb = 0; bb < shape.batch; ++bb) {
    const T* dts = saved + bb * lay.per_batch + lay.dt;
    if (d_final_state != nullptr) {
      std::memcpy(dh_all.data(), d_final_state + bb * H * P * N, sizeof(T) * H * P * N);
    } else {
      std::fill(dh_all.begin(), dh_all.end(), T(0));
    }
    std::fill(dA_all.begin(), dA_all.end(), 0.0);
    std::fill(dD_all.begin(), dD_all.end(), 0.0);
    // Chunk-major, as in the forward.
    for (int64_t k = lay.num_chunks - 1; k >= 0; --k) {
      for (int64_t hd = 0; hd < H; ++hd) {
        const int64_t grp = hd / heads_per_group;
        const T A = -std::exp(in.a_log[hd]);
        const T dskip = in.d != nullptr ? in.d[hd] : T(0);
        const T* hs = saved + bb * lay.per_batch + lay.states + hd * NB * P * N;
        const T* xh = in.x + bb * S * ldx + hd * P;
        const T* bh = in.b + bb * S * ldbc + grp * N;
        const T* ch = in.c + bb * S * ldbc + grp * N;
        const T* dyh = dy + bb * S * ldx + hd * P;
        T* dxh = grads.dx + bb * S * ldx + hd * P;
        T* dbh = grads.db + bb * S * ldbc + grp * N;
        T* dch = grads.dc + bb * S * ldbc + grp * N;
        T* dh = dh_all.data() + hd * P * N;
        double& dA = dA_all[hd];
        double& dD = dD_all[hd];
        const int64_t t0 = k * options.chunk_size;
        const int64_t len = std::min(options.chunk_size, S - t0);
        const T* hprev = hs + k * P * N;
        const T* bc = bh + t0 * ldbc;
        const T* cc = ch + t0 * ldbc;
        const T* dyc = dyh + t0 * ldx;
        T acc = 0;
        for (int64_t t = 0; t < len; ++t) {
          const T dtv = dts[(t0 + t) * H + hd];
          acc += dtv * A;
          acs[t] = acc;
          dacs[t] = 0;
          const T* xt = xh + (t0 + t) * ldx;
          for (int64_t p = 0; p < P; ++p) xbar[t * P + p] = dtv * xt[p];
        }
        const T last = acs[len - 1];
        const T e_last = DecayExp(last);

        // D skip.
        for (int64_t l = 0; l < len; ++l) {
          const double term = Dot(dyc + l * ldx, xh + (t0 + l) * ldx, P);
          dD += term;
          if (grads.dd_terms != nullptr && in.d != nullptr) {
            grads.dd_terms[(bb * S + t0 + l) * H + hd] = T(term);
          }
        }

        // State: H_c = e_last·H_{c−1} + Zᵀ B, Z = diag(w) X̄.
        //   dH_{c−1} = e_last·dH;  dZ = B dHᵀ;  dB += Z dH;  dX̄ += w ⊙ dZ;
        //   dlog w_s = w_s X̄_s·dZ_s  → dAcs_last += , dAcs_s −= ;  dAcs_last += e_last <dH,
        //   H_{c−1}>.
        for (int64_t i = 0; i < P * N; ++i) dh_prev[i] = e_last * dh[i];
        dacs[len - 1] += e_last * Dot(dh, hprev, P * N);
        for (int64_t t = 0; t < len; ++t) {
          const T w = DecayExp(last - acs[t]);
          for (int64_t p = 0; p < P; ++p) z[t * P + p] = w * xbar[t * P + p];
        }
        Gemm(false, true, len, P, N, T(1), bc, ldbc, dh, N, T(0), dzw.data(), P);
        Gemm(false, false, len, N, P, T(1), z.data(), P, dh, N, T(0), dbl.data(), N);
        for (int64_t t = 0; t < len; ++t) {
          const T w = DecayExp(last - acs[t]);
          const T dlogw = Dot(z.data() + t * P, dzw.data() + t * P, P);
          dacs[len - 1] += dlogw;
          dacs[t] -= dlogw;
          for (int64_t p = 0; p < P; ++p) dxbar[t * P + p] = w * dzw[t * P + p];
        }

        // Intra: y = M X̄, M = CB ⊙ Lw.  dM = dY X̄ᵀ;  dX̄ += Mᵀ dY;  dCB = dM ⊙ Lw;
        //   dC = dCB B;  dB += dCBᵀ C;  dlogLw_ls = dM_ls M_ls.
        Gemm(false, true, len, len, N, T(1), cc, ldbc, bc, ldbc, T(0), m.data(), len);
        Gemm(false, true, len, len, P, T(1), dyc, ldx, xbar.data(), P, T(0), dm.data(), len);
        for (int64_t l = 0; l < len; ++l) {
          T* mrow = m.data() + l * len;
          T* dmrow = dm.data() + l * len;
          T row_sum = 0;
          for (int64_t s = 0; s <= l; ++s) {
            const T w = DecayExp(acs[l] - acs[s]);
            mrow[s] *= w;
            const T dlog = dmrow[s] * mrow[s];
            row_sum += dlog;
            dacs[s] -= dlog;
            dmrow[s] *= w;  // now dCB
          }
          dacs[l] += row_sum;
          for (int64_t s = l + 1; s < len; ++s) {
            mrow[s] = 0;
            dmrow[s] = 0;
          }
        }
        Gemm(true, false, len, P, len, T(1), m.data(), len, dyc, ldx, T(1), dxbar.data(), P);
        Gemm(false, false, len, N, len, T(1), dm.data(), len, bc, ldbc, T(0), dcl.data(), N);
        Gemm(true, false, len, N, len, T(1), dm.data(), len, cc, ldbc, T(1), dbl.data(), N);

        // Inter: y_l += e^{Acs_l} (H_{c−1} C_l).  Zc = C H_{c−1}ᵀ;  dZc = diag(e^{Acs}) dY;
        //   dC += dZc H_{c−1};  dH_{c−1} += dZcᵀ C;  dAcs_l += e^{Acs_l} dY_l·Zc_l.
        Gemm(false, true, len, P, N, T(1), cc, ldbc, hprev, N, T(0), zc.data(), P);
        for (int64_t l = 0; l < len; ++l) {
          const T e = DecayExp(acs[l]);
          const T* dyl = dyc + l * ldx;
          dacs[l] += e * Dot(dyl, zc.data() + l * P, P);
          for (int64_t p = 0; p < P; ++p) z[l * P + p] = e * dyl[p];  // reuse z as dZc
        }
        Gemm(false, false, len, N, P, T(1), z.data(), P, hprev, N, T(1), dcl.data(), N);
        Gemm(true, false, P, N, len, T(1), z.data(), P, cc, ldbc, T(1), dh_prev.data(), N);

        // Acs = cumsum(a), a_t = dt_t·A, X̄ = dt·x.
        double rev = 0;
        for (int64_t t = len - 1; t >= 0; --t) {
          rev += dacs[t];
          const int64_t tok = t0 + t;
          const T dtv = dts[tok * H + hd];
          const T* xt = xh + tok * ldx;
          const T* dyt = dyh + tok * ldx;
          T* dxt = dxh + tok * ldx;
          T ddt = T(rev * A);
          dA += rev * double(dtv);
          if (grads.da_log_terms != nullptr) {
            grads.da_log_terms[(bb * S + tok) * H + hd] =
                T(rev * double(dtv) * -std::exp(double(in.a_log[hd])));
          }
          for (int64_t p = 0; p < P; ++p) {
            ddt += xt[p] * dxbar[t * P + p];
            dxt[p] = dtv * dxbar[t * P + p] + dskip * dyt[p];
          }
          bool passes = true;
          const T raw = in.dt[(bb * S + tok) * H + hd];
          ComputeDt(options, raw, in.dt_bias[hd], &passes);
          const T draw = passes ? ddt * Sigmoid(raw + in.dt_bias[hd]) : T(0);
          grads.ddt[(bb * S + tok) * H + hd] = draw;
          grads.ddt_bias[hd] += draw;
          T* dbt = dbh + tok * ldbc;
          T* dct = dch + tok * ldbc;
          for (int64_t n = 0; n < N; ++n) {
            dbt[n] += dbl[t * N + n];
            dct[n] += dcl[t * N + n];
          }
        }
        std::memcpy(dh, dh_prev.data(), sizeof(T) * P * N);
      }
    }
    for (int64_t hd = 0; hd < H; ++hd) {
      const double A = -std::exp(double(in.a_log[hd]));
      grads.da_log[hd] += T(dA_all[hd] * A);  // A = −exp(A_log): dA/dA_log = A
      if (grads.dd != nullptr && in.d != nullptr) grads.dd[hd] += T(dD_all[hd]);
    }
    if (d_initial_state != nullptr) {
      std::memcpy(d_initial_state + bb * H * P * N, dh_all.data(), sizeof(T) * H * P * N);
    }
  }
}

#define GYRE_SSD_INSTANTIATE(T)                                                                    \
  template void ssd_step_fwd_ref<T>(const SsdShape&, const SsdOptions&, const T*, const T*,        \
                                    const T*, const T*, const T*, const T*, const T*, T*, T*);     \
  template void ssd_recurrent_fwd_ref<T>(const SsdShape&, const SsdOptions&, const SsdInputs<T>&,  \
                                         const T*, T*, T*);                                        \
  template void ssd_chunked_fwd_ref<T>(const SsdShape&, const SsdOptions&, const SsdInputs<T>&,    \
                                       const T*, T*, T*, T*);                                      \
  template void ssd_chunked_bwd_ref<T>(const SsdShape&, const SsdOptions&, const SsdInputs<T>&,    \
                                       const T*, const T*, const T*, const T*, const SsdGrads<T>&, \
                                       T*);
GYRE_SSD_INSTANTIATE(float)
GYRE_SSD_INSTANTIATE(double)
#undef GYRE_SSD_INSTANTIATE

SsdSumOfTermsCheck ssd_check_sum_of_terms(const double* got, const double* want,
                                          const double* abs_sums, int64_t heads, double rel_tol,
                                          double terms_tol) {
  double diff = 0, norm_want = 0, norm_abs = 0;
  bool finite = true;
  for (int64_t h = 0; h < heads; ++h) {
    finite = finite && std::isfinite(got[h]);
    diff += (got[h] - want[h]) * (got[h] - want[h]);
    norm_want += want[h] * want[h];
    norm_abs += abs_sums[h] * abs_sums[h];
  }
  diff = std::sqrt(diff);
  norm_want = std::sqrt(norm_want);
  norm_abs = std::sqrt(norm_abs);
  auto ratio = [](double num, double den) {
    return den > 0 ? num / den : (num == 0 ? 0.0 : std::numeric_limits<double>::infinity());
  };
  SsdSumOfTermsCheck c;
  const double inf = std::numeric_limits<double>::infinity();
  c.rel_err = finite ? ratio(diff, norm_want) : inf;
  c.terms_err = finite ? ratio(diff, norm_abs) : inf;
  c.cancel = norm_abs > 0 ? norm_want / norm_abs : 0.0;
  c.pass = finite && (c.rel_err <= rel_tol || c.terms_err <= terms_tol);
  return c;
}

void ssd_sum_abs_terms(const double* terms, int64_t tokens, int64_t heads, double* abs_sums) {
  for (int64_t h = 0; h < heads; ++h) abs_sums[h] = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) abs_sums[h] += std::abs(terms[t * heads + h]);
}

}  // namespace gyre::cpu
