// dropout_mask on CPU: the mask the fused ops apply, materialised (tests, debugging).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"

#include "common/avx512.h"

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

#if LRK_HAVE_AVX512_SOURCES
LRK_AVX512_BEGIN

// hi, lo of the 32x32->64 products a[i] * m for 16 lanes: vpmuludq multiplies the even lanes,
// a second one the odd lanes shifted down; the halves are then blended back into place.
inline void mulhilo_x16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The same 16 groups as philox_keep_bits_x16, written with AVX-512 intrinsics: the compiler's
// version of the loop above spends most of its time moving lanes between the multiplies.
void philox_keep_bits_x16_avx512(uint32_t k0, uint32_t k1, uint32_t row_lo, uint32_t row_hi, uint32_t g0,
                                 uint32_t threshold, uint32_t* out) {
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(row_lo));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(row_hi));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(kDropoutStreamTag));
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_x16(c0, m0, hi0, lo0);
    mulhilo_x16(c2, m1, hi1, lo1);
    // 0x96: three-way xor
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  const __m512i words[4] = {c0, c1, c2, c3};
  __m512i bits = _mm512_setzero_si512();
  for (int w = 0; w < 4; ++w) {
    const __mmask16 keep_lo = _mm512_cmpge_epu32_mask(_mm512_and_si512(words[w], low16), thr);
    const __mmask16 keep_hi = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(words[w], 16), thr);
    bits = _mm512_mask_or_epi32(bits, keep_lo, bits, _mm512_set1_epi32(1 << (2 * w)));
    bits = _mm512_mask_or_epi32(bits, keep_hi, bits, _mm512_set1_epi32(1 << (2 * w + 1)));
  }
  _mm512_storeu_si512(out, bits);
}

LRK_AVX512_END
#endif
}  // namespace

void dropout_row_keep_bits(uint64_t seed, int64_t row, int64_t groups, uint32_t threshold, uint32_t* bits) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo = static_cast<uint32_t>(row), hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  int64_t g = 0;
#if LRK_HAVE_AVX512_SOURCES
  if (use_avx512()) {
    for (; g + kLanes <= groups; g += kLanes)
      philox_keep_bits_x16_avx512(k0, k1, lo, hi, static_cast<uint32_t>(g), threshold, bits + g);
  }
#endif
  for (; g + kLanes <= groups; g += kLanes)
    philox_keep_bits_x16(k0, k1, lo, hi, static_cast<uint32_t>(g), threshold, bits + g);
  for (; g < groups; ++g) bits[g] = dropout_keep_bits(seed, row, g, threshold);
}

at::Tensor dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p,
                            at::ScalarType dtype) {
  check_dropout_mask_args(rows, cols, dtype, seed);
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
