// The SSD forward's chunk scan and the backward's dB / dC on Hopper warpgroup MMA (helper ssdf13,
// session 13): the default kernels for head_dim 64 and state_dim a multiple of 64 (ssd.cu keeps
// ssd_chunk_scan_fwd_pair_xs / ssd_bwd_dbc_smem for the other shapes); same inputs and outputs.
// Called only from ssd.cu; the layout of `saved` (offsets below) is ssd.cu's MakeDims.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device_info.h"

namespace gyre::cuda {

struct SsdScanFwdWgArgs {
  int B = 0, S = 0, H = 0, P = 0, N = 0, Q = 0, NC = 0, hpg = 0;
  // Row strides (elements) of x, of B / C and of y; `saved`'s per-batch-row size and offsets
  // (floats; ssd.cu Dims).
  int64_t ldx = 0, ldbc = 0, ldy = 0, per_batch = 0, dt_off = 0, acs_off = 0, cb_off = 0,
          hbf_off = 0;
  const __nv_bfloat16* x = nullptr;
  const __nv_bfloat16* c = nullptr;
  const float* dskip = nullptr;  // [H] or null
  const float* saved = nullptr;
  __nv_bfloat16* y = nullptr;
};

// Whether the wgmma scan handles this shape (P = 64, N a multiple of 64 up to 256, Q a multiple
// of 64 up to 1024).
bool SsdScanFwdWgSupports(int P, int N, int Q);

// ssd_chunk_scan_fwd_wg: three ring slots, four blocks per SM at P64 N128 Q256.
CudaResult LaunchSsdScanFwdWg(const SsdScanFwdWgArgs& a, cudaStream_t stream);

// The backward's dB and dC (ssd.cu's ssd_bwd_dbc_smem) on wgmma (GYRE_SSD_BWD_DBC=wg; ssd.h).
// Same inputs and outputs as ssd_bwd_dbc_smem; two launches (dC blocks, then dB blocks) on
// `stream`.
struct SsdDbcWgArgs {
  int B = 0, S = 0, H = 0, P = 0, N = 0, Q = 0, NC = 0, G = 0, hpg = 0;
  int64_t ldx = 0, ldbc = 0, ldy = 0, per_batch = 0, dt_off = 0, acs_off = 0, hbf_off = 0;
  const __nv_bfloat16* x = nullptr;
  const __nv_bfloat16* b = nullptr;
  const __nv_bfloat16* c = nullptr;
  const float* saved = nullptr;
  const __nv_bfloat16* dy = nullptr;
  const __nv_bfloat16* st_g = nullptr;    // bf16 G_{c+1}, [B, H, NC, P, N]
  const __nv_bfloat16* dcb_bf = nullptr;  // bf16 dCB and its transposed copy (ssd_bwd_dcb_sum)
  __nv_bfloat16* db = nullptr;
  __nv_bfloat16* dc = nullptr;
  float* inter_out = nullptr;  // the dC blocks' inter-chunk ∂Acs terms, or null
};
bool SsdDbcWgSupports(int P, int N, int Q);
CudaResult LaunchSsdDbcWg(const SsdDbcWgArgs& a, cudaStream_t stream);

}  // namespace gyre::cuda
