// mLSTM generation step (MlstmStepForward): one token per head, the state streamed by a cluster
// of CTAs. (ssm_step.cu's MlstmStepChunk is the row-invariant decode path.) Included by mlstm.cu
// inside its anonymous namespace.

// ---------------------------------------------------------------- step

// One generation step. A head's dk×dv fp32 state is 512 KB at the 7B layout and the step is a
// pure stream over it (read C, write C, h = q̂ᵀC/den), so the work is spread over a CLUSTER of
// CTAs per head: CTA r of the cluster owns dk rows [r·rows, (r+1)·rows) and every dv column,
// updates them in place and leaves its partial q̂ᵀC row sums in shared memory; after a cluster
// barrier CTA r sums the cluster's partials for its share of the columns through distributed
// shared memory and writes h. Every CTA computes den over all dk (dk loads, cheap), so only
// h needs the exchange. Old n and m are read by all CTAs before the barrier and written after it.
constexpr int kStepThreads = 256;

__global__ void __launch_bounds__(kStepThreads) mlstm_step(Dims d, int rows, const bf16* q,
                                                           const bf16* k, const bf16* v,
                                                           const float* ig, const float* fg,
                                                           float* cst, float* nst, float* mst,
                                                           bf16* h) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ float sh[];
  float* hpart = sh;         // [DV] Σ over this CTA's rows of q̂_a C_new[a][j]
  float* qs = hpart + d.DV;  // [rows] q̂ of the slice
  float* kn = qs + rows;     // [rows] i'·k of the slice
  float* red = kn + rows;    // [kStepThreads / 32]
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.x / csize, tid = threadIdx.x;
  const int a_begin = rank * rows, a_end = min(d.DK, a_begin + rows);
  const float lf = LogForget(d.sigmoid, fg[bh]);
  const float m_old = mst[bh];
  const float m_new = fmaxf(lf + m_old, ig[bh]);
  const float fp = __expf(lf + m_old - m_new), ip = __expf(ig[bh] - m_new);
  float den_part = 0.f;
  for (int a = tid; a < d.DK; a += kStepThreads) {
    const float qa = __bfloat162float(q[static_cast<int64_t>(bh) * d.DK + a]) * d.scale;
    const float ka = ip * __bfloat162float(k[static_cast<int64_t>(bh) * d.DK + a]);
    if (a >= a_begin && a < a_end) {
      qs[a - a_begin] = qa;
      kn[a - a_begin] = ka;
    }
    den_part += qa * (fp * nst[static_cast<int64_t>(bh) * d.DK + a] + ka);
  }
  den_part = WarpSumT(den_part);
  if ((tid & 31) == 0) red[tid >> 5] = den_part;
  __syncthreads();
  float den = 0.f;
  for (int i = 0; i < kStepThreads / 32; ++i) den += red[i];
  const float inv = 1.f / (fmaxf(fabsf(den), __expf(-m_new)) + d.eps);
  float* cb = cst + static_cast<int64_t>(bh) * d.DK * d.DV;
  const int my_rows = max(0, a_end - a_begin);
  // Each thread owns kStepCols columns (j, j + 256, ...) and walks its rows in batches of
  // kStepRows: all loads of a batch are issued before any store (a load after a store to C could
  // alias it, so the compiler would otherwise wait one memory latency per row).
  constexpr int kStepCols = 2, kStepRows = 16;
  for (int jb = 0; jb < d.DV; jb += kStepCols * kStepThreads) {
    float vj[kStepCols], acc[kStepCols];
#pragma unroll
    for (int u = 0; u < kStepCols; ++u) {
      const int j = jb + u * kStepThreads + tid;
      vj[u] = j < d.DV ? __bfloat162float(v[static_cast<int64_t>(bh) * d.DV + j]) : 0.f;
      acc[u] = 0.f;
    }
    for (int r0 = 0; r0 < my_rows; r0 += kStepRows) {
      float cv[kStepCols][kStepRows];
#pragma unroll
      for (int u = 0; u < kStepCols; ++u) {
        const int j = jb + u * kStepThreads + tid;
#pragma unroll
        for (int i = 0; i < kStepRows; ++i) {
          const bool ok = j < d.DV && r0 + i < my_rows;
          cv[u][i] = ok ? cb[static_cast<int64_t>(a_begin + r0 + i) * d.DV + j] : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kStepCols; ++u) {
        const int j = jb + u * kStepThreads + tid;
#pragma unroll
        for (int i = 0; i < kStepRows; ++i) {
          if (j < d.DV && r0 + i < my_rows) {
            const float cn = fp * cv[u][i] + kn[r0 + i] * vj[u];
            cb[static_cast<int64_t>(a_begin + r0 + i) * d.DV + j] = cn;
            acc[u] += qs[r0 + i] * cn;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStepCols; ++u) {
      const int j = jb + u * kStepThreads + tid;
      if (j < d.DV) hpart[j] = acc[u];
    }
  }
  cluster.sync();  // partials visible cluster-wide; every CTA has read the old n and m
  const int cols = (d.DV + csize - 1) / csize;
  for (int j = rank * cols + tid; j < min(d.DV, (rank + 1) * cols); j += kStepThreads) {
    float sum = 0.f;
    for (int r = 0; r < csize; ++r) sum += cluster.map_shared_rank(hpart, r)[j];
    h[static_cast<int64_t>(bh) * d.DV + j] = __float2bfloat16_rn(sum * inv);
  }
  for (int r = tid; r < my_rows; r += kStepThreads) {
    float* na = nst + static_cast<int64_t>(bh) * d.DK + a_begin + r;
    *na = fp * *na + kn[r];
  }
  if (rank == 0 && tid == 0) mst[bh] = m_new;
  cluster.sync();  // no CTA leaves while another still reads its partials
}
