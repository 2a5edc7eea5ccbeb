// Philox4x32-10 against Random123's known-answer vectors, and the dropout draw's statistics.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "check.h"
#include "lrkernels/common/philox.h"

using namespace lrkernels;

int main() {
  const Philox4x32 z = philox4x32_10(0, 0, 0, 0, 0, 0);
  CHECK(z.v[0] == 0x6627E8D5u && z.v[1] == 0xE169C58Du && z.v[2] == 0xBC57AC4Cu && z.v[3] == 0x9B00DBD8u);
  const uint32_t f = 0xFFFFFFFFu;
  const Philox4x32 o = philox4x32_10(f, f, f, f, f, f);
  CHECK(o.v[0] == 0x408F276Du && o.v[1] == 0x41C83B0Eu && o.v[2] == 0xA20BC7C6u && o.v[3] == 0x6D5451FDu);

  CHECK(dropout_threshold(0.0) == 0u);
  CHECK(dropout_threshold(0.5) == 32768u);
  CHECK(dropout_threshold(0.9999999) == 65535u);
  CHECK(std::fabs(dropout_keep_scale(dropout_threshold(0.5)) - 2.0f) < 1e-7f);

  // keep rate of p = 0.1 over 2^20 draws: within 5 standard deviations of 0.9
  const uint32_t t = dropout_threshold(0.1);
  long kept = 0, n = 0;
  for (int64_t row = 0; row < 1024; ++row) {
    for (int64_t g = 0; g < 128; ++g) {
      const uint32_t bits = dropout_keep_bits(12345u, row, g, t);
      for (int e = 0; e < 8; ++e) kept += (bits >> e) & 1u;
      n += 8;
    }
  }
  const double rate = static_cast<double>(kept) / n;
  const double p_eff = t / 65536.0;
  CHECK(std::fabs(rate - (1.0 - p_eff)) < 5.0 * std::sqrt(p_eff * (1 - p_eff) / n));
  // different seeds, different masks
  CHECK(dropout_keep_bits(1, 0, 0, 32768) != dropout_keep_bits(2, 0, 0, 32768) ||
        dropout_keep_bits(1, 0, 1, 32768) != dropout_keep_bits(2, 0, 1, 32768));
  if (g_failures == 0) std::printf("test_philox: all checks passed (keep rate %.5f)\n", rate);
  return g_failures;
}
