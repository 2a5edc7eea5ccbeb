// Philox4x32-10 counter-based generator (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11) and the dropout mask built on it.
//
// Host and device share this one implementation, so the CPU kernels, the CUDA kernels and
// the float64 reference (python/lrkernels/reference/philox.py) draw bit-identical masks.
// Being counter-based is what lets backward regenerate the forward's mask from the seed
// instead of storing it.
#pragma once

#include <cstdint>

#include "lrkernels/common/macros.h"

namespace lrkernels {

struct Philox4x32 {
  uint32_t v[4];
};

LRK_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds; counter (c0..c3), key (k0, k1).
LRK_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
LRK_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Inverted dropout with a 16-bit uniform per element: element (row, col) is kept when its
// 16-bit draw is >= threshold, threshold = round(p * 65536). Kept elements are scaled by
// 65536 / (65536 - threshold), i.e. by 1/(1 - p_eff) with p_eff the probability actually
// used, so the expectation is exact. One Philox call covers 8 consecutive columns of a row.
struct DropoutParams {
  const int64_t* seed = nullptr;  // device (or host, for CPU) pointer to the 64-bit seed
  uint32_t threshold = 0;         // 0 = no dropout
  float keep_scale = 1.0f;
};

// Distinguishes dropout draws from any other use of the same seed.
constexpr uint32_t kDropoutStreamTag = 0x4C524B44u;  // "LRKD"

LRK_HOST_DEVICE uint32_t dropout_threshold(double p) {
  double t = p * 65536.0 + 0.5;
  if (t < 0.0) t = 0.0;
  if (t > 65535.0) t = 65535.0;
  return static_cast<uint32_t>(t);
}

LRK_HOST_DEVICE float dropout_keep_scale(uint32_t threshold) {
  return static_cast<float>(65536.0 / (65536.0 - static_cast<double>(threshold)));
}

// Keep bits (bit e = column group*8 + e kept) for the 8 columns [group*8, group*8 + 8) of a row.
LRK_HOST_DEVICE uint32_t dropout_keep_bits(uint64_t seed, int64_t row, int64_t group,
                                           uint32_t threshold) {
  const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(row),
                                     static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32),
                                     kDropoutStreamTag, static_cast<uint32_t>(seed),
                                     static_cast<uint32_t>(seed >> 32));
  uint32_t bits = 0;
LRK_UNROLL
  for (int e = 0; e < 8; ++e) {
    const uint32_t u16 = (r.v[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu;
    bits |= static_cast<uint32_t>(u16 >= threshold) << e;
  }
  return bits;
}

}  // namespace lrkernels
