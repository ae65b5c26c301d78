// mlstm_bench --store_probe (session 17, helper stateio17): the store / load streams of
// mlstm_state_fwd_ws_tail without its math, to find what holds the state kernels at ~2.4 TB/s
// (kernels/cuda/mlstm_notes.md, "Session 17 (helper stateio17)"). Bench code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "kernels/cuda/device_info.h"  // CudaResult

namespace gyre::cuda {

// The mLSTM layout at chunk 128 ([B][S][NH][d] tokens; states [B·NH][NC+1][dk][dv]).
struct StoreProbeShape {
  int batch, seq_len, num_heads, dk, dv;
};

// Buffers as mlstm_state_fwd_ws_tail writes / reads them: k, v tokens (bf16, read by the modes
// with loads), the saved states' hi / lo planes (bf16, [BH][NC+1][dk][dv] or the blocked layout
// [BH][NC+1][dv/64][dk][64], the same size), the last state (fp32 [BH][dk][dv]) and n
// ([BH][NC+1][dk] fp32).
struct StoreProbeBuffers {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  __nv_bfloat16* c;
  __nv_bfloat16* c_lo;
  float* c_last;
  float* sn;
};

// One probe mode's result: median ms over `reps` launches (modes interleaved round by round),
// the DRAM bytes it must move at least (writes; reads = K and V once), and how many 16-byte words
// of c / c_lo / c_last / sn were still not zero after one launch on buffers poisoned with 0xff
// (0 = every output byte written).
struct StoreProbeLine {
  std::string name;
  double ms = 0;
  double write_bytes = 0, read_bytes = 0;
  unsigned long long unwritten_words = 0;
};

CudaResult RunMlstmStoreProbe(const StoreProbeShape& s, const StoreProbeBuffers& b, int reps,
                              cudaStream_t stream, std::vector<StoreProbeLine>* lines);

// Bytes of each buffer (for the caller's allocation).
struct StoreProbeSizes {
  size_t tokens_k, tokens_v, plane, c_last, sn;
};
StoreProbeSizes StoreProbeBytes(const StoreProbeShape& s);

}  // namespace gyre::cuda
