// dropout_mask on CPU: the mask the fused ops apply, materialised (tests, debugging).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"

namespace lrkernels {

namespace {
constexpr int kLanes = 16;

// 16 consecutive groups of one row. Written lane-wise so the compiler vectorises each round
// (the 32x32->64 multiplies become vpmuludq).
__attribute__((target_clones("avx512f", "avx2", "default"))) void philox_keep_bits_x16(
    uint32_t k0, uint32_t k1, uint32_t row_lo, uint32_t row_hi, uint32_t g0, uint32_t threshold, uint32_t* out) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    c0[i] = g0 + static_cast<uint32_t>(i);
    c1[i] = row_lo;
    c2[i] = row_hi;
    c3[i] = kDropoutStreamTag;
  }
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c0[i] = n0;
      c1[i] = static_cast<uint32_t>(p1);
      c2[i] = n2;
      c3[i] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int i = 0; i < kLanes; ++i) {
    const uint32_t w[4] = {c0[i], c1[i], c2[i], c3[i]};
    uint32_t bits = 0;
    for (int e = 0; e < 8; ++e) bits |= static_cast<uint32_t>(((w[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu) >= threshold) << e;
    out[i] = bits;
  }
}
}  // namespace

void dropout_row_keep_bits(uint64_t seed, int64_t row, int64_t groups, uint32_t threshold, uint32_t* bits) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo = static_cast<uint32_t>(row), hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  int64_t g = 0;
  for (; g + kLanes <= groups; g += kLanes)
    philox_keep_bits_x16(k0, k1, lo, hi, static_cast<uint32_t>(g), threshold, bits + g);
  for (; g < groups; ++g) bits[g] = dropout_keep_bits(seed, row, g, threshold);
}

at::Tensor dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p,
                            at::ScalarType dtype) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "lrkernels.dropout_mask: rows and cols must be >= 0, got (", rows,
                    ", ", cols, ")");
  auto out = at::empty({rows, cols}, seed.options().dtype(dtype));
  const DropoutParams d = make_dropout_params(p, seed, seed, "dropout_mask");
  if (d.threshold == 0) return out.fill_(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dropout_mask_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t keep = static_cast<scalar_t>(d.keep_scale);
    for_each_dropout_row(rows, cols, d, [&](int64_t r, const uint32_t* bits) {
      for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = ((bits[c >> 3] >> (c & 7)) & 1u) ? keep : scalar_t(0);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) { m.impl("dropout_mask", &dropout_mask_cpu); }

}  // namespace lrkernels
