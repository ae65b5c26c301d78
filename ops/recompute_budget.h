// How many of a model's last layers can skip their recomputation (model.xlstm.
// mlstm_recompute_keep_last: -1, "auto"; ops/MLSTM_MEMORY.md). A layer that keeps everything holds
// the bytes its recomputation would have freed from its forward to its backward, so the step's peak
// grows by the sum of the kept layers' bytes. The model measures those bytes in one step with every
// layer recomputing, then keeps layers from the last one backwards while they fit under the device
// memory left above that step's peak, less a margin. Results do not depend on the choice (every
// mode is bitwise the same step), only speed and memory do.
#pragma once

#include <cstdint>
#include <span>

namespace gyre::ops {

// The device's memory as the model sees it after a measured step: the caching allocator's bytes
// held by tensors, on its free lists, and the most ever held; the driver's free and total bytes
// (free counts other users of the device: NCCL, other processes).
struct MemorySnapshot {
  uint64_t in_use = 0, cached = 0, peak = 0;
  uint64_t device_free = 0, device_total = 0;
};

// Bytes kept free at the peak: max(6 GiB, 8% of the card). On an 80 GB H100 the xLSTM 1.3B step
// slowed down again with 1.4 GiB left (bench/RESULTS.md, session 18: the allocator at the edge
// frees and re-allocates), not with 5.5 GiB.
uint64_t RecomputeMarginBytes(uint64_t device_total);

// Bytes the kept layers may add to the measured peak: what the allocator can still hand out
// (device free + its free lists) beyond the peak's excess over what is held now, less the margin;
// 0 when that is negative.
uint64_t RecomputeHeadroomBytes(const MemorySnapshot& m);

// freed_from_last[i]: bytes the i-th layer counted from the last one freed by recomputing (0 for a
// layer that never recomputes, e.g. an sLSTM block; it is passed over). Returns how many entries,
// from the start, are kept: the longest prefix whose recomputing layers' bytes sum to <= headroom.
int64_t KeptLayersFromEnd(std::span<const int64_t> freed_from_last, uint64_t headroom);

}  // namespace gyre::ops
