// A keyed pseudo-random permutation of [0, n) in O(1) memory: a balanced Feistel network over the
// smallest even number of bits covering n, with cycle-walking back into [0, n) (Black & Rogaway,
// "Ciphers with arbitrary finite domains"). 2^bits < 4n, so a call walks fewer than 4 times on
// average. Not cryptographic; the round function is a 64-bit mixer (murmur3's fmix64).
//
// Thread-safe (immutable). Cheap to construct (six round keys).
#pragma once

#include <cstdint>

namespace gyre::data {

// murmur3 fmix64: a bijective 64-bit mixer with full avalanche.
inline uint64_t Mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// Combines keys order-sensitively.
inline uint64_t HashCombine(uint64_t a, uint64_t b) {
  return Mix64(a ^ (Mix64(b) + 0x9e3779b97f4a7c15ULL + (a << 6) + (a >> 2)));
}

class KeyedPermutation {
 public:
  static constexpr int kRounds = 6;

  // n >= 1.
  KeyedPermutation(uint64_t n, uint64_t key) : n_(n) {
    int bits = 2;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    if (bits % 2) ++bits;
    half_bits_ = bits / 2;
    half_mask_ = (uint64_t{1} << half_bits_) - 1;
    uint64_t k = key;
    for (int r = 0; r < kRounds; ++r) {
      k = Mix64(k + 0x9e3779b97f4a7c15ULL * (r + 1));
      round_keys_[r] = k;
    }
  }

  uint64_t size() const { return n_; }

  // The image of i (i < n) under the permutation.
  uint64_t operator()(uint64_t i) const {
    uint64_t x = i;
    do {
      x = Encrypt(x);
    } while (x >= n_);
    return x;
  }

 private:
  uint64_t Encrypt(uint64_t x) const {
    uint64_t left = x >> half_bits_;
    uint64_t right = x & half_mask_;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t f = Mix64(right ^ round_keys_[r]) & half_mask_;
      const uint64_t next_right = left ^ f;
      left = right;
      right = next_right;
    }
    return (left << half_bits_) | right;
  }

  uint64_t n_;
  int half_bits_;
  uint64_t half_mask_;
  uint64_t round_keys_[kRounds];
};

}  // namespace gyre::data
