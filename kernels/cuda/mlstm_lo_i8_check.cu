// Host-side check of the int8 lo planes (MlstmStateLo::kInt8, helper mlstm14): the codec
// (LoToI8 / I8ToLoBits / SplitI8 / SplitPackI8), the state kernels' staging layout (StageAccI8) and the
// consumers' rebuild of the swizzled bf16 lo tile (RebuildLoTile), on the CPU, with the very
// functions mlstm.cu's kernels call (they are __host__ __device__). Not a Bazel target (the
// kernels/cuda BUILD file is outside this helper's folders); build and run by hand:
//
//   nvcc -std=c++20 -O2 -gencode=arch=compute_90a,code=sm_90a -I. -I/usr/local/cuda/include \
//     kernels/cuda/mlstm_lo_i8_check.cu -o /tmp/mlstm_lo_i8_check -lcuda && /tmp/mlstm_lo_i8_check
//
// Exit status 0 when every check passes; prints one [PASS] / [FAIL] line per check.
#include "kernels/cuda/mlstm.cu"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using gyre::cuda::FloatToBits;
using gyre::cuda::BitsToFloat;

float Bf16ToFloat(uint32_t bits16) { return BitsToFloat(bits16 << 16); }

// bf16 round-to-nearest-even of x (the same rounding as __floats2bfloat162_rn for finite x).
uint32_t Bf16Bits(float x) {
  uint32_t u = FloatToBits(x);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return u >> 16;
}

// The 128-byte swizzle of a [rows][64] bf16 tile whose base is 1024-byte aligned (TMA's
// CU_TENSOR_MAP_SWIZZLE_128B): 16-byte chunk c of row r lands at chunk c ^ (r % 8). Written here
// independently of hopper_mma.cuh.
int Sw(int r, int col) { return r * 128 + (((col / 8) ^ (r % 8)) * 16) + (col % 8) * 2; }

int g_fail = 0;
void Report(bool ok, const char* what, const char* detail) {
  std::printf("[%s] %s: %s\n", ok ? "PASS" : "FAIL", what, detail);
  if (!ok) ++g_fail;
}

// 1. Codec error bound: |x − (hi + rebuilt lo)| <= ulp(hi) / 512 for every x (no clamp: where q
// would be +128 the stored hi is bf16(x)'s upper neighbour); the bf16 lo plane's bound, measured
// beside it, is ulp(hi) / 1024. The stored hi alone stays within ulp / 2 + ulp / 512 of x.
void CheckCodec() {
  std::mt19937_64 rng(14);
  std::uniform_real_distribution<float> mant(1.f, 2.f);
  std::uniform_int_distribution<int> expo(-125, 120);
  std::vector<float> xs;
  for (int i = 0; i < 4000000; ++i) {
    const float x = std::ldexp(mant(rng), expo(rng)) * (rng() & 1 ? -1.f : 1.f);
    xs.push_back(x);
  }
  for (int e = -130; e < 127; ++e) {  // binade edges, ties, tiny values
    const float p = std::ldexp(1.f, e);
    for (const float sgn : {1.f, -1.f}) {
      xs.push_back(sgn * p);
      xs.push_back(sgn * std::nextafter(p, 0.f));
      xs.push_back(sgn * std::nextafter(p, 4.f * p));
      xs.push_back(sgn * p * (1.f + 1.f / 256.f));              // a tie between two bf16 neighbours
      xs.push_back(sgn * p * (1.f + 255.f / 65536.f));          // just below that tie (q = +128)
      xs.push_back(sgn * p * (2.f - 1.f / 256.f));              // near the top of the binade
      xs.push_back(sgn * std::nextafter(p * (2.f - 1.f / 256.f), 0.f));
    }
  }
  xs.push_back(0.f);
  xs.push_back(-0.f);
  xs.push_back(3.0e38f);
  xs.push_back(-3.3e38f);
  double worst_i8 = 0, worst_bf = 0, worst_rel_i8 = 0, worst_rel_bf = 0, worst_hi = 0;
  long bad = 0, bumped = 0, qmin = 0;
  for (size_t i = 0; i + 1 < xs.size(); i += 2) {
    const float x = xs[i], y = xs[i + 1];
    uint32_t hi, q2;
    gyre::cuda::SplitPackI8(x, y, hi, q2);
    for (int j = 0; j < 2; ++j) {
      const float v = j == 0 ? x : y;
      const uint32_t hb = j == 0 ? (hi & 0xFFFFu) : (hi >> 16);
      const uint32_t hn = Bf16Bits(v);  // round to nearest even
      if (hb != hn) {  // only the upper neighbour, and only where lo was >= 127.5/256 ulp
        const uint32_t up = (hn & 0x8000u) != 0 ? hn - 1u : hn + 1u;
        const int eb = static_cast<int>((hn >> 7) & 0xFFu);
        const double lo_n = double(v) - Bf16ToFloat(hn);
        if (hb != up || lo_n < 127.5 / 256 * std::ldexp(1.0, eb - 134)) ++bad;
        ++bumped;
      }
      const int q = static_cast<int>(static_cast<int8_t>((q2 >> (8 * j)) & 0xFFu));
      qmin += q == -128;
      const double h = Bf16ToFloat(hb);
      const double lo_i8 = Bf16ToFloat(gyre::cuda::I8ToLoBits(q, hb));
      const double hnv = Bf16ToFloat(hn);
      const double lo_bf = Bf16ToFloat(Bf16Bits(static_cast<float>(v - static_cast<float>(hnv))));
      const int eb = static_cast<int>((hb >> 7) & 0xFFu);
      const double e_i8 = std::abs(double(v) - (h + lo_i8)), e_bf = std::abs(double(v) - (hnv + lo_bf));
      if (eb < 16 || eb > 254) {  // tiny / zero / non-finite: lo is 0 by design
        if (q != 0) ++bad;
        continue;
      }
      const double ulp = std::ldexp(1.0, eb - 134);
      const int ebn = static_cast<int>((hn >> 7) & 0xFFu);
      const double ulp_n = std::ldexp(1.0, ebn - 134);
      if (e_i8 > ulp / 512 * (1 + 1e-12)) ++bad;
      worst_i8 = std::max(worst_i8, e_i8 / ulp);
      worst_bf = std::max(worst_bf, e_bf / ulp_n);
      worst_hi = std::max(worst_hi, std::abs(double(v) - h) / ulp_n);
      if (v != 0) {
        worst_rel_i8 = std::max(worst_rel_i8, e_i8 / std::abs(double(v)));
        worst_rel_bf = std::max(worst_rel_bf, e_bf / std::abs(double(v)));
      }
    }
  }
  if (worst_hi > 0.5 + 1.0 / 256) ++bad;
  char buf[500];
  std::snprintf(buf, sizeof(buf),
                "%zu values: violations %ld; hi moved to the upper neighbour %ld, q = -128 %ld; max |x − hi − "
                "lo| / ulp(hi): int8 %.3e, bf16 lo %.3e (bound 1/512 = %.3e); max relative error: int8 %.3e, "
                "bf16 lo %.3e; stored hi alone max |x − hi| / ulp %.4f",
                xs.size(), bad, bumped, qmin, worst_i8, worst_bf, 1.0 / 512, worst_rel_i8, worst_rel_bf, worst_hi);
  Report(bad == 0, "int8 lo codec error bound", buf);
}

// 2. StageAccI8: a warp's accumulator fragments (lane = 4g + c holds rows g, g + 8, columns
// nt·8 + 2c, +1) land as the bf16 hi rows in [16][64] swizzled boxes at 0 and 2048 and the int8
// lo parts row-major [16][128] at 4096 (the TMA store boxes' layouts).
void CheckStaging() {
  std::mt19937_64 rng(15);
  std::normal_distribution<float> nd(0.f, 3.f);
  float val[16][128];
  for (auto& row : val)
    for (float& v : row) v = nd(rng) * std::ldexp(1.f, static_cast<int>(rng() % 40) - 20);
  std::vector<unsigned char> stg(8192, 0xAB);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, c = lane & 3;
    float acc[16][4];
    for (int nt = 0; nt < 16; ++nt) {
      const int col = nt * 8 + 2 * c;
      acc[nt][0] = val[g][col];
      acc[nt][1] = val[g][col + 1];
      acc[nt][2] = val[g + 8][col];
      acc[nt][3] = val[g + 8][col + 1];
    }
    gyre::cuda::StageAccI8(stg.data(), acc, g, c);
  }
  long bad = 0;
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 128; ++col) {
      const float v = val[r][col];
      uint32_t hb = Bf16Bits(v);
      const uint32_t want_q = gyre::cuda::SplitI8(v, hb);  // (may move hb to its upper neighbour)
      uint16_t got_hi;
      std::memcpy(&got_hi, stg.data() + (col / 64) * 2048 + Sw(r, col % 64), 2);
      if (got_hi != hb) ++bad;
      if (stg[4096 + r * 128 + col] != want_q) ++bad;
    }
  }
  for (int i = 6144; i < 8192; ++i) bad += stg[i] != 0xAB;  // nothing past the int8 box
  char buf[200];
  std::snprintf(buf, sizeof(buf), "16 x 128 elements, %ld wrong bytes", bad);
  Report(bad == 0, "StageAccI8 layout (hi boxes swizzled, int8 box row-major)", buf);
}

// 3. RebuildLoTile over the two consumer shapes: fwd_out's C tile (two [64][64] column blocks of
// a [64 dk][128 dv] int8 tile, q_ld 128) and bwd_dqk's [128][64] tiles (q_ld 64), 96 threads.
void CheckRebuild(int rows, int q_ld, int col_block, const char* name) {
  std::mt19937_64 rng(16 + rows);
  std::vector<unsigned char> hi(rows * 128), lo(rows * 128, 0xCD), q(rows * q_ld);
  std::vector<uint32_t> hbits(rows * 64);
  std::vector<int> qv(rows * 64);
  for (int r = 0; r < rows; ++r) {
    for (int col = 0; col < 64; ++col) {
      const float v = std::ldexp(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 777.f,
                                 static_cast<int>(rng() % 60) - 30);
      const uint32_t hb = Bf16Bits(v);
      hbits[r * 64 + col] = hb;
      const uint16_t h16 = static_cast<uint16_t>(hb);
      std::memcpy(hi.data() + Sw(r, col), &h16, 2);
      const int qq = static_cast<int>(rng() % 255) - 127;
      qv[r * 64 + col] = qq;
      q[r * q_ld + col_block * 64 + col] = static_cast<unsigned char>(static_cast<int8_t>(qq));
    }
  }
  for (int t = 0; t < 96; ++t) {
    gyre::cuda::RebuildLoTile(lo.data(), hi.data(), q.data() + col_block * 64, q_ld, rows, t, 96);
  }
  long bad = 0;
  for (int r = 0; r < rows; ++r) {
    for (int col = 0; col < 64; ++col) {
      uint16_t got;
      std::memcpy(&got, lo.data() + Sw(r, col), 2);
      const uint32_t want = gyre::cuda::I8ToLoBits(qv[r * 64 + col], hbits[r * 64 + col]);
      if (got != want) ++bad;
      // The rebuilt lo is q · ulp(hi) / 256 exactly (finite hi with eb in [16, 254]).
      const int eb = static_cast<int>((hbits[r * 64 + col] >> 7) & 0xFFu);
      if (eb >= 16 && eb <= 254 &&
          Bf16ToFloat(want) != static_cast<float>(qv[r * 64 + col] * std::ldexp(1.0, eb - 142))) {
        ++bad;
      }
    }
  }
  char buf[200];
  std::snprintf(buf, sizeof(buf), "%d x 64 elements (q_ld %d, column block %d), %ld wrong", rows, q_ld,
                col_block, bad);
  Report(bad == 0, name, buf);
}

// 4. What the planes buy in a product: y = Σ_i a_i C_i over 384 terms (a bf16, C fp32 with
// mixed magnitudes), relative to the float64 sum, with C as hi only, hi + bf16 lo, hi + int8 lo.
void CheckDot() {
  std::mt19937_64 rng(17);
  std::normal_distribution<double> nd(0.0, 1.0);
  double worst[3] = {0, 0, 0};
  for (int trial = 0; trial < 20000; ++trial) {
    double exact = 0, sum[3] = {0, 0, 0}, mag = 0;
    for (int i = 0; i < 384; ++i) {
      const float a = Bf16ToFloat(Bf16Bits(static_cast<float>(nd(rng))));
      const float c = static_cast<float>(nd(rng) * std::exp(2.0 * nd(rng)));
      const uint32_t hb = Bf16Bits(c);
      const double h = Bf16ToFloat(hb);
      const double lbf = Bf16ToFloat(Bf16Bits(static_cast<float>(c - static_cast<float>(h))));
      uint32_t hi2, q2;
      gyre::cuda::SplitPackI8(c, 0.f, hi2, q2);
      const uint32_t hb8 = hi2 & 0xFFFFu;
      const double h8 = Bf16ToFloat(hb8);
      const double li8 = Bf16ToFloat(gyre::cuda::I8ToLoBits(static_cast<int8_t>(q2 & 0xFFu), hb8));
      exact += double(a) * c;
      mag += std::abs(double(a) * c);
      sum[0] += a * h;
      sum[1] += a * (h + lbf);
      sum[2] += a * (h8 + li8);
    }
    for (int k = 0; k < 3; ++k) worst[k] = std::max(worst[k], std::abs(sum[k] - exact) / mag);
  }
  char buf[300];
  std::snprintf(buf, sizeof(buf),
                "max |y − exact| / Σ|a C| over 20000 dots of 384: hi only %.3e, hi + bf16 lo %.3e, hi + "
                "int8 lo %.3e",
                worst[0], worst[1], worst[2]);
  // The codec's bound is 2x the bf16 lo plane's (check 1): allow 3x in the products, and require
  // the int8 plane to keep at least 64x of what the lo plane buys over hi only.
  Report(worst[2] <= 3 * worst[1] && worst[2] < worst[0] / 64, "product error (int8 lo vs bf16 lo)", buf);
}

}  // namespace

int main() {
  CheckCodec();
  CheckStaging();
  CheckRebuild(64, 128, 0, "RebuildLoTile fwd_out C tile, column block 0");
  CheckRebuild(64, 128, 1, "RebuildLoTile fwd_out C tile, column block 1");
  CheckRebuild(128, 64, 0, "RebuildLoTile bwd_dqk C / dC tile");
  CheckDot();
  std::printf("mlstm int8 lo checks: %d failed\n", g_fail);
  return g_fail == 0 ? 0 : 1;
}
