// MakeBlock: the one place that maps a BlockType to its layer class.
#include "absl/strings/str_cat.h"
#include "ops/llama_block.h"
#include "ops/model.h"
#include "ops/recurrent_blocks.h"
#include "ops/xlstm_large_block.h"

namespace gyre::ops {

absl::StatusOr<std::unique_ptr<Block>> MakeBlock(BlockType type, const BuildContext& ctx, const ModelSpec& spec,
                                                 int64_t layer, int64_t n_layers) {
  switch (type) {
    case BlockType::kAttention:
      if (!spec.attn_mlp) return std::unique_ptr<Block>(new AttentionMixerBlock(ctx, spec, n_layers));
      return std::unique_ptr<Block>(new LlamaBlock(ctx, spec, n_layers));
    case BlockType::kMlstm:
      return std::unique_ptr<Block>(new MlstmBlock(ctx, spec, n_layers, layer));
    case BlockType::kSlstm:
      return std::unique_ptr<Block>(new SlstmBlock(ctx, spec, layer, n_layers));
    case BlockType::kMamba2:
      return std::unique_ptr<Block>(new Mamba2Block(ctx, spec, n_layers));
    case BlockType::kXlstmLarge:
      return std::unique_ptr<Block>(new XlstmLargeBlock(ctx, spec, n_layers));
  }
  return absl::InternalError(absl::StrCat("unknown block type at layer ", layer));
}

}  // namespace gyre::ops
