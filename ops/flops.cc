#include "ops/flops.h"

#include <memory>

#include "base/status_macros.h"
#include "ops/model.h"

namespace gyre::ops {
namespace {

double MixerForwardPerToken(const ModelSpec& s, int64_t seq) {
  double fwd = 0;
  for (BlockType b : s.blocks) {
    switch (b) {
      case BlockType::kAttention:
        fwd += 2.0 * static_cast<double>(s.attn_heads * s.attn_head_dim) * static_cast<double>(seq);
        break;
      case BlockType::kMlstm: {
        // xLSTM v1: q, k and v all have mlstm_inner / mlstm_heads features per head.
        const double d = static_cast<double>(s.mlstm_inner / s.mlstm_heads);
        const double L = static_cast<double>(s.mlstm_chunk);
        fwd += static_cast<double>(s.mlstm_heads) * (L * (d + d) + 4 * d * d);
        break;
      }
      case BlockType::kXlstmLarge: {
        // Chunkwise mLSTM with dk != dv per head (MODELS.md §1.5): the intra-chunk products
        // (q·k over dk, weights·v over dv) and the state products (q·C, kᵀv: 2 dk·dv each, x2 FLOPs).
        const double dk = static_cast<double>(s.xl_qk_dim / s.xl_heads);
        const double dv = static_cast<double>(s.xl_v_dim / s.xl_heads);
        const double L = static_cast<double>(s.mlstm_chunk);
        fwd += static_cast<double>(s.xl_heads) * (L * (dk + dv) + 4 * dk * dv);
        break;
      }
      case BlockType::kMamba2: {
        const double H = static_cast<double>(s.ssm_expand * s.d_model / s.ssm_head_dim);
        const double P = static_cast<double>(s.ssm_head_dim), N = static_cast<double>(s.ssm_state);
        const double Q = static_cast<double>(s.ssm_chunk);
        fwd += H * (Q * (N + P) + 4 * N * P);
        break;
      }
      default:
        break;  // sLSTM: recurrent matrices are parameters
    }
  }
  return fwd;
}

}  // namespace

absl::StatusOr<TrainingFlops> CountTrainingFlops(const ModelSpec& spec, int64_t seq) {
  ASSIGN_OR_RETURN(std::unique_ptr<LanguageModel> model, LanguageModel::Create(spec, DType::kF32, Device::kMeta, 0));
  int64_t n = 0;
  for (const Parameter* p : model->params().All()) {
    if (p->name == "embedding.weight" || p->name == "lm_head.weight") continue;
    n += p->value.numel();
  }
  TrainingFlops f;
  f.dense = 6.0 * static_cast<double>(n);
  f.mixer = 3.0 * MixerForwardPerToken(spec, seq);
  f.head = 6.0 * static_cast<double>(spec.vocab_size * spec.d_model * spec.mtp_heads);
  return f;
}

}  // namespace gyre::ops
