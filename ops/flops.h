// Training FLOPs per token of a model: the numerator of MFU (model FLOPs utilisation), shared by
// the benches and the worker's step metrics so every MFU figure in Gyre means the same thing.
//
//   dense  6 N           N = parameters used once per token: blocks and the final norm (not the
//                        embedding: a lookup; not the LM head: counted apart). 2 FLOPs per
//                        multiply-add forward, 4 backward (input and weight gradients).
//   mixer  3 x forward   sequence mixing that is not a parameter product (forward FLOPs, x3 for
//                        training), per layer and token:
//                          attention  2 · heads · head_dim · T   (QKᵀ and PV, causal: half of
//                                                                  4 · heads · head_dim · T)
//                          mLSTM      NH (L (dk + dv) + 4 dk dv) (chunkwise: intra-chunk L x L
//                                                                  products, state update/read)
//                          Mamba-2    H (Q (N + P) + 4 N P)      (SSD, chunk Q)
//                        sLSTM's recurrent matrices are parameters (in N).
//   head   6 V d k       the LM head (unembedding) for k = mtp_heads output heads.
//
// PaLM's MFU counts all three; the issue targets in PERFORMANCE.md are quoted without the head
// ("6N + attention"), so both sums are offered.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "ops/model_config.h"

namespace gyre::ops {

struct TrainingFlops {
  double dense = 0;  // per token
  double mixer = 0;  // per token, at the sequence length given
  double head = 0;   // per token
  double without_head() const { return dense + mixer; }
  double total() const { return dense + mixer + head; }
};

// Builds `spec` on the meta device (no memory) to count its parameters. `seq`: training context.
absl::StatusOr<TrainingFlops> CountTrainingFlops(const ModelSpec& spec, int64_t seq);

}  // namespace gyre::ops
