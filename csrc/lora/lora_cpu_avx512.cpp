// AVX-512 kernels for the rank-r side of lora_linear on CPU (see lora_cpu_avx512.h).
//
// Each kernel keeps a small tile of accumulators in zmm registers: 8 rows × 16 rank lanes
// (shrink), 8 rows × 32 output columns (expand), 8 outputs × 16 rank lanes plus the row's
// 16 rank lanes (grad_out), 8 rows × 16 columns plus one 16-column strip of dA (grad_in).
// Group sizes are template parameters so the tiles stay in registers; row and column tails
// use smaller groups and masked loads/stores.
#include "lora/lora_cpu_avx512.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/avx512.h"
#include "common/dropout_cpu.h"

#if LRK_HAVE_AVX512_SOURCES

namespace lrkernels::lora_avx512 {

int64_t scratch_floats(int64_t cols) { return 8 * cols; }
int64_t scratch_bits(int64_t cols) { return 8 * ((cols + 7) / 8); }

namespace {

constexpr int kRows = 8;  // rows per register tile

// Keep bits of the `group_count` groups of global row `row` (8 columns per group).
void row_bits(const RowDropout& d, int64_t row, int64_t group_count, uint32_t* bits) {
  dropout_row_keep_bits(d.seed, row, group_count, d.threshold, bits);
}

LRK_AVX512_BEGIN

// Lanes [0, n) set, n clamped to [0, 16].
inline __mmask16 tail_mask(int64_t n) {
  if (n >= 16) return static_cast<__mmask16>(0xFFFF);
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Keep bits of the 16 columns [k, k + 16) (k a multiple of 16) from a row's group bits.
inline __mmask16 keep16(const uint32_t* bits, int64_t k, int64_t group_count) {
  const int64_t g = k >> 3;
  uint32_t m = bits[g] & 0xFFu;
  if (g + 1 < group_count) m |= (bits[g + 1] & 0xFFu) << 8;
  return static_cast<__mmask16>(m);
}

// ---- float32 / bfloat16 elements ------------------------------------------------------------
// Activations (x, y, dy, dx) are float32 or bfloat16 (raw bits in uint16_t); all arithmetic is
// float32. bfloat16 stores round to nearest even, NaN to the quiet NaN, exactly as c10::BFloat16.

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __mmask16 m, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

inline float scalar(const float* p) { return *p; }
inline float scalar(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- shrink -------------------------------------------------------------------------------

template <int G>
void shrink_tile(const float* const* src, int64_t cols, const float* at, int64_t r, int64_t rp, float* h,
                 int64_t ldh, float ks) {
  const __m512 scale = _mm512_set1_ps(ks);
  for (int64_t c = 0; c < rp; c += 16) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    const float* ac = at + c;
    for (int64_t k = 0; k < cols; ++k) {
      const __m512 av = _mm512_loadu_ps(ac + k * rp);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(src[g][k]), av, acc[g]);
    }
    const __mmask16 m = tail_mask(r - c);
    for (int g = 0; g < G; ++g) _mm512_mask_storeu_ps(h + g * ldh + c, m, _mm512_mul_ps(acc[g], scale));
  }
}

void shrink_rows(int g, const float* const* src, int64_t cols, const float* at, int64_t r, int64_t rp, float* h,
                 int64_t ldh, float ks) {
  switch (g) {
    case 1: return shrink_tile<1>(src, cols, at, r, rp, h, ldh, ks);
    case 2: return shrink_tile<2>(src, cols, at, r, rp, h, ldh, ks);
    case 3: return shrink_tile<3>(src, cols, at, r, rp, h, ldh, ks);
    case 4: return shrink_tile<4>(src, cols, at, r, rp, h, ldh, ks);
    case 5: return shrink_tile<5>(src, cols, at, r, rp, h, ldh, ks);
    case 6: return shrink_tile<6>(src, cols, at, r, rp, h, ldh, ks);
    case 7: return shrink_tile<7>(src, cols, at, r, rp, h, ldh, ks);
    default: return shrink_tile<8>(src, cols, at, r, rp, h, ldh, ks);
  }
}

// m ⊙ x of one row (all of x when bits is null) into dst as float32 (the keep scale is applied
// to the products instead).
template <typename E>
void masked_row(const E* x, int64_t cols, const uint32_t* bits, int64_t group_count, float* dst) {
  for (int64_t k = 0; k < cols; k += 16) {
    const __mmask16 m = tail_mask(cols - k);
    const __mmask16 keep = bits ? static_cast<__mmask16>(keep16(bits, k, group_count) & m) : m;
    _mm512_mask_storeu_ps(dst + k, m, load16(x + k, keep));
  }
}

// ---- expand -------------------------------------------------------------------------------

template <int G, typename E>
void expand_tile(E* y, int64_t ldy, int64_t n, const float* h, int64_t ldh, int64_t r, const float* bt) {
  for (int64_t o = 0; o < n; o += 32) {
    const __mmask16 m0 = tail_mask(n - o), m1 = tail_mask(n - o - 16);
    __m512 a0[G], a1[G];
    for (int g = 0; g < G; ++g) {
      a0[g] = load16(y + g * ldy + o, m0);
      a1[g] = load16(y + g * ldy + o + 16, m1);
    }
    for (int64_t j = 0; j < r; ++j) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, bt + j * n + o);
      const __m512 b1 = _mm512_maskz_loadu_ps(m1, bt + j * n + o + 16);
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(h[g * ldh + j]);
        a0[g] = _mm512_fmadd_ps(s, b0, a0[g]);
        a1[g] = _mm512_fmadd_ps(s, b1, a1[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      store16(y + g * ldy + o, m0, a0[g]);
      store16(y + g * ldy + o + 16, m1, a1[g]);
    }
  }
}

template <typename E>
void expand_rows(int g, E* y, int64_t ldy, int64_t n, const float* h, int64_t ldh, int64_t r, const float* bt) {
  switch (g) {
    case 1: return expand_tile<1>(y, ldy, n, h, ldh, r, bt);
    case 2: return expand_tile<2>(y, ldy, n, h, ldh, r, bt);
    case 3: return expand_tile<3>(y, ldy, n, h, ldh, r, bt);
    case 4: return expand_tile<4>(y, ldy, n, h, ldh, r, bt);
    case 5: return expand_tile<5>(y, ldy, n, h, ldh, r, bt);
    case 6: return expand_tile<6>(y, ldy, n, h, ldh, r, bt);
    case 7: return expand_tile<7>(y, ldy, n, h, ldh, r, bt);
    default: return expand_tile<8>(y, ldy, n, h, ldh, r, bt);
  }
}

// ---- grad_out -----------------------------------------------------------------------------

// Outputs [o0, o0 + O) against every row: O lanes-of-rank accumulators of p stay in registers
// for the whole sweep over rows; each row's dh strip is loaded, updated O times, stored.
template <bool kDh, bool kP, int O, typename E>
void grad_out_tile(const E* dy, int64_t ldy, int64_t rows, int64_t o0, int64_t rp, const float* beff,
                   const float* hg, float* dh, float* p) {
  for (int64_t c = 0; c < rp; c += 16) {
    __m512 pa[O], bv[O];
    for (int i = 0; i < O; ++i) {
      if constexpr (kP) pa[i] = _mm512_loadu_ps(p + (o0 + i) * rp + c);
      if constexpr (kDh) bv[i] = _mm512_loadu_ps(beff + (o0 + i) * rp + c);
    }
    for (int64_t t = 0; t < rows; ++t) {
      const E* dyr = dy + t * ldy + o0;
      __m512 hv, d0, d1;
      if constexpr (kP) hv = _mm512_loadu_ps(hg + t * rp + c);
      if constexpr (kDh) {
        d0 = _mm512_loadu_ps(dh + t * rp + c);
        d1 = _mm512_setzero_ps();
      }
      for (int i = 0; i < O; ++i) {
        const __m512 s = _mm512_set1_ps(scalar(dyr + i));
        if constexpr (kP) pa[i] = _mm512_fmadd_ps(s, hv, pa[i]);
        if constexpr (kDh) {
          if (i & 1)
            d1 = _mm512_fmadd_ps(s, bv[i], d1);
          else
            d0 = _mm512_fmadd_ps(s, bv[i], d0);
        }
      }
      if constexpr (kDh) _mm512_storeu_ps(dh + t * rp + c, _mm512_add_ps(d0, d1));
    }
    if constexpr (kP)
      for (int i = 0; i < O; ++i) _mm512_storeu_ps(p + (o0 + i) * rp + c, pa[i]);
  }
}

template <bool kDh, bool kP, typename E>
void grad_out_cols(int o, const E* dy, int64_t ldy, int64_t rows, int64_t o0, int64_t rp, const float* beff,
                   const float* hg, float* dh, float* p) {
  switch (o) {
    case 1: return grad_out_tile<kDh, kP, 1>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 2: return grad_out_tile<kDh, kP, 2>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 3: return grad_out_tile<kDh, kP, 3>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 4: return grad_out_tile<kDh, kP, 4>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 5: return grad_out_tile<kDh, kP, 5>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 6: return grad_out_tile<kDh, kP, 6>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    case 7: return grad_out_tile<kDh, kP, 7>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
    default: return grad_out_tile<kDh, kP, 8>(dy, ldy, rows, o0, rp, beff, hg, dh, p);
  }
}

template <bool kDh, bool kP, typename E>
void grad_out_impl(const E* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
                   const float* hg, float* dh, float* p) {
  // Rows in slabs of 64 so the slab of dy swept once per group of 8 outputs stays in L2.
  constexpr int64_t kSlab = 64;
  for (int64_t t0 = 0; t0 < rows; t0 += kSlab) {
    const int64_t nt = std::min(kSlab, rows - t0);
    for (int64_t o0 = 0; o0 < n; o0 += 8)
      grad_out_cols<kDh, kP>(static_cast<int>(std::min<int64_t>(8, n - o0)), dy + t0 * ldy, ldy, nt, o0, rp, beff,
                             kP ? hg + t0 * rp : nullptr, kDh ? dh + t0 * rp : nullptr, p);
  }
}

// ---- grad_in ------------------------------------------------------------------------------

template <bool kDa, bool kDx, int G, typename E>
void grad_in_tile(const E* x, int64_t ldx, int64_t cols, const float* du, int64_t ldu, int64_t r, const float* a,
                  float* da, E* dx, int64_t lddx, const uint32_t* bits, int64_t group_count, float ks) {
  const __m512 scale = _mm512_set1_ps(ks);
  for (int64_t k = 0; k < cols; k += 16) {
    const __mmask16 mk = tail_mask(cols - k);
    __mmask16 keep[G];
    __m512 xd[G], dl[G];
    for (int g = 0; g < G; ++g) {
      keep[g] = bits ? static_cast<__mmask16>(keep16(bits + g * group_count, k, group_count) & mk) : mk;
      if constexpr (kDa) xd[g] = _mm512_mul_ps(load16(x + g * ldx + k, keep[g]), scale);
      if constexpr (kDx) dl[g] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < r; ++j) {
      __m512 av, d0, d1;
      if constexpr (kDx) av = _mm512_maskz_loadu_ps(mk, a + j * cols + k);
      if constexpr (kDa) {
        d0 = _mm512_maskz_loadu_ps(mk, da + j * cols + k);
        d1 = _mm512_setzero_ps();
      }
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(du[g * ldu + j]);
        if constexpr (kDx) dl[g] = _mm512_fmadd_ps(s, av, dl[g]);
        if constexpr (kDa) {
          if (g & 1)
            d1 = _mm512_fmadd_ps(s, xd[g], d1);
          else
            d0 = _mm512_fmadd_ps(s, xd[g], d0);
        }
      }
      if constexpr (kDa) _mm512_mask_storeu_ps(da + j * cols + k, mk, _mm512_add_ps(d0, d1));
    }
    if constexpr (kDx) {
      for (int g = 0; g < G; ++g) {
        E* o = dx + g * lddx + k;
        store16(o, mk, _mm512_add_ps(load16(o, mk), _mm512_maskz_mul_ps(keep[g], dl[g], scale)));
      }
    }
  }
}

template <bool kDa, bool kDx, typename E>
void grad_in_rows(int g, const E* x, int64_t ldx, int64_t cols, const float* du, int64_t ldu, int64_t r,
                  const float* a, float* da, E* dx, int64_t lddx, const uint32_t* bits, int64_t group_count,
                  float ks) {
  switch (g) {
    case 1: return grad_in_tile<kDa, kDx, 1>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 2: return grad_in_tile<kDa, kDx, 2>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 3: return grad_in_tile<kDa, kDx, 3>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 4: return grad_in_tile<kDa, kDx, 4>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 5: return grad_in_tile<kDa, kDx, 5>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 6: return grad_in_tile<kDa, kDx, 6>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    case 7: return grad_in_tile<kDa, kDx, 7>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
    default: return grad_in_tile<kDa, kDx, 8>(x, ldx, cols, du, ldu, r, a, da, dx, lddx, bits, group_count, ks);
  }
}

template <typename E>
void shrink_impl(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
                 float* h, int64_t ldh, const RowDropout& d, float* scratch, uint32_t* bits) {
  const int64_t rp = round_up16(r), group_count = (cols + 7) / 8;
  // float32 rows without dropout are read in place; otherwise each row is first written to the
  // scratch as float32 (masked when dropping), and the products read it from L1.
  constexpr bool kInPlace = std::is_same_v<E, float>;
  for (int64_t t = 0; t < rows; t += kRows) {
    const int g = static_cast<int>(std::min<int64_t>(kRows, rows - t));
    const float* src[kRows];
    for (int i = 0; i < g; ++i) {
      const E* row = x + (t + i) * ldx;
      if constexpr (kInPlace) {
        if (!d.threshold) {
          src[i] = row;
          continue;
        }
      }
      if (d.threshold) row_bits(d, row0 + t + i, group_count, bits);
      masked_row(row, cols, d.threshold ? bits : nullptr, group_count, scratch + i * cols);
      src[i] = scratch + i * cols;
    }
    shrink_rows(g, src, cols, at, r, rp, h + t * ldh, ldh, d.threshold ? d.keep_scale : 1.0f);
  }
}

template <typename E>
void expand_acc_impl(E* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                     const float* bt) {
  for (int64_t t = 0; t < rows; t += kRows)
    expand_rows(static_cast<int>(std::min<int64_t>(kRows, rows - t)), y + t * ldy, ldy, n, h + t * ldh, ldh, r, bt);
}

template <typename E>
void grad_out_dispatch(const E* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
                       const float* hg, float* dh, float* p) {
  if (dh) std::memset(dh, 0, sizeof(float) * static_cast<size_t>(rows * rp));
  if (dh && p)
    grad_out_impl<true, true>(dy, ldy, rows, n, rp, beff, hg, dh, p);
  else if (dh)
    grad_out_impl<true, false>(dy, ldy, rows, n, rp, beff, hg, dh, p);
  else if (p)
    grad_out_impl<false, true>(dy, ldy, rows, n, rp, beff, hg, dh, p);
}

template <typename E>
void grad_in_impl(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du, int64_t ldu,
                  int64_t r, const float* a, float* da, E* dx, int64_t lddx, const RowDropout& d, uint32_t* bits) {
  const int64_t group_count = (cols + 7) / 8;
  const float ks = d.threshold ? d.keep_scale : 1.0f;
  for (int64_t t = 0; t < rows; t += kRows) {
    const int g = static_cast<int>(std::min<int64_t>(kRows, rows - t));
    if (d.threshold)
      for (int i = 0; i < g; ++i) row_bits(d, row0 + t + i, group_count, bits + i * group_count);
    const uint32_t* tb = d.threshold ? bits : nullptr;
    const E* xt = x + t * ldx;
    const float* dut = du + t * ldu;
    E* dxt = dx ? dx + t * lddx : nullptr;
    if (da && dx)
      grad_in_rows<true, true>(g, xt, ldx, cols, dut, ldu, r, a, da, dxt, lddx, tb, group_count, ks);
    else if (da)
      grad_in_rows<true, false>(g, xt, ldx, cols, dut, ldu, r, a, da, dxt, lddx, tb, group_count, ks);
    else if (dx)
      grad_in_rows<false, true>(g, xt, ldx, cols, dut, ldu, r, a, da, dxt, lddx, tb, group_count, ks);
  }
}

}  // namespace

void shrink(const float* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
            float* h, int64_t ldh, const RowDropout& d, float* scratch, uint32_t* bits) {
  shrink_impl(x, ldx, row0, rows, cols, at, r, h, ldh, d, scratch, bits);
}
void shrink(const uint16_t* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
            float* h, int64_t ldh, const RowDropout& d, float* scratch, uint32_t* bits) {
  shrink_impl(x, ldx, row0, rows, cols, at, r, h, ldh, d, scratch, bits);
}

void expand_acc(float* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                const float* bt) {
  expand_acc_impl(y, ldy, rows, n, h, ldh, r, bt);
}
void expand_acc(uint16_t* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                const float* bt) {
  expand_acc_impl(y, ldy, rows, n, h, ldh, r, bt);
}

void grad_out(const float* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
              const float* hg, float* dh, float* p) {
  grad_out_dispatch(dy, ldy, rows, n, rp, beff, hg, dh, p);
}
void grad_out(const uint16_t* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
              const float* hg, float* dh, float* p) {
  grad_out_dispatch(dy, ldy, rows, n, rp, beff, hg, dh, p);
}

void grad_in(const float* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du, int64_t ldu,
             int64_t r, const float* a, float* da, float* dx, int64_t lddx, const RowDropout& d, uint32_t* bits) {
  grad_in_impl(x, ldx, row0, rows, cols, du, ldu, r, a, da, dx, lddx, d, bits);
}
void grad_in(const uint16_t* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du,
             int64_t ldu, int64_t r, const float* a, float* da, uint16_t* dx, int64_t lddx, const RowDropout& d,
             uint32_t* bits) {
  grad_in_impl(x, ldx, row0, rows, cols, du, ldu, r, a, da, dx, lddx, d, bits);
}

LRK_AVX512_END

}  // namespace lrkernels::lora_avx512

#endif  // LRK_HAVE_AVX512_SOURCES
