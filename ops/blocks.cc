// MakeBlock: the one place that maps a BlockType to its layer class.
#include "absl/strings/str_cat.h"
#include "ops/llama_block.h"
#include "ops/model.h"

namespace gyre::ops {

absl::StatusOr<std::unique_ptr<Block>> MakeBlock(BlockType type, const BuildContext& ctx, const ModelSpec& spec,
                                                 int64_t layer, int64_t n_layers) {
  switch (type) {
    case BlockType::kAttention:
      return std::unique_ptr<Block>(new LlamaBlock(ctx, spec, n_layers));
    default:
      return absl::UnimplementedError(absl::StrCat("block type ", BlockTypeName(type), " (layer ", layer,
                                                   ") is not wired yet"));
  }
}

}  // namespace gyre::ops
