// Device helpers shared by the SSD kernels' two translation units: ssd.cu (with the .cuh kernels
// it includes) and ssd_fwd_wgmma.cu. Helpers used by one unit only stay in it.
#pragma once

#include <cuda_bf16.h>

namespace gyre::cuda {

// cp.async groups: close this thread's open group; wait until at most kPending of its groups are
// still in flight.
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// The forward scan's diagonal 64×64 tile (l-tile = s-tile) in the m16n8 accumulator layout
// s[j][e] (row r0 + 8·(e/2), column 8j + 2tq + e%2): C Bᵀ times dt_s e^{Acs_l − Acs_s} on and
// below the diagonal (the exponent clamped at 0 so the masked entries stay finite), zero above.
// al0 / al1: Acs of this thread's rows r0, r0 + 8; as / ds: the s-tile's Acs and dt.
__device__ __forceinline__ void ScaleDiagCausal(float (&s)[8][4], int tq, int r0, float al0,
                                                float al1, const float* as, const float* ds) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = 8 * j + 2 * tq + (e & 1), row = r0 + 8 * (e >> 1);
      const float al = e < 2 ? al0 : al1;
      const float v = s[j][e] * ds[col] * __expf(fminf(al - as[col], 0.f));
      s[j][e] = col <= row ? v : 0.f;
    }
}

}  // namespace gyre::cuda
