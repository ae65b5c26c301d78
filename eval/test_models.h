// Small model specs of every family for the eval tests (CPU, seconds to build and run).
#pragma once

#include <string>

#include "ops/model.h"

namespace gyre::eval::testing {

// "llama", "xlstm" (mLSTM + one sLSTM), "mamba2", "hybrid" (Mamba-2 + one attention layer), with
// `mtp_heads` heads, d_model 16, vocabulary `vocab` (unpadded).
ops::ModelSpec TinySpec(const std::string& family, int64_t mtp_heads, int64_t vocab = 23);
// The ModelConfig TinySpec resolves.
gyre::v1::ModelConfig TinyModelConfig(const std::string& family, int64_t mtp_heads, int64_t vocab = 23);

}  // namespace gyre::eval::testing
