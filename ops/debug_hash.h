// MEASUREMENT ONLY (helper det22, session 22; deleted after its device call): GYRE_DEBUG_FORWARD_HASH=1
// prints an FNV-1a hash (8-byte words) of a tensor's bytes to stderr (a synchronising device-to-host copy), so the
// first op whose output differs between two processes (poisoned memory vs clean) can be found.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "ops/tensor.h"

namespace gyre::ops {

inline bool DebugForwardHashOn() {
  static const bool on = [] {
    const char* v = std::getenv("GYRE_DEBUG_FORWARD_HASH");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline void DebugForwardHash(const char* label, int64_t index, const Tensor& t) {
  if (!DebugForwardHashOn() || !t.defined()) return;
  const Tensor host = t.device() == Device::kCpu ? t : t.ToDevice(Device::kCpu);
  const auto* p = static_cast<const unsigned char*>(host.raw());
  uint64_t h = 1469598103934665603ull;
  int64_t nonfinite = 0;
  const size_t words = host.nbytes() / 8;
  for (size_t i = 0; i < words; ++i) {  // FNV-1a over 8-byte words, then the tail bytes
    uint64_t w;
    __builtin_memcpy(&w, p + 8 * i, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (size_t i = 8 * words; i < host.nbytes(); ++i) h = (h ^ p[i]) * 1099511628211ull;
  if (host.dtype() == DType::kBF16) {
    const auto* u = static_cast<const uint16_t*>(host.raw());
    for (int64_t i = 0; i < host.numel(); ++i) nonfinite += (u[i] & 0x7f80) == 0x7f80 ? 1 : 0;
  } else if (host.dtype() == DType::kF32) {
    const auto* u = static_cast<const uint32_t*>(host.raw());
    for (int64_t i = 0; i < host.numel(); ++i) nonfinite += (u[i] & 0x7f800000u) == 0x7f800000u ? 1 : 0;
  }
  std::fprintf(stderr, "fwdhash %s %lld %016llx nonfinite %lld\n", label, (long long)index, (unsigned long long)h,
               (long long)nonfinite);
}

}  // namespace gyre::ops
