// The blocked lora kernels over at::vec (see lora_cpu_vec.h), compiled once per instruction set.
//
// Every kernel is one register-tiled product, acc[g][c] += Σ_k a(g, k) · b[k, c], with G rows
// (or outputs, or ranks) of broadcast scalars against C vectors of a padded row-major operand;
// only the tile's prologue and epilogue differ (zero / load y / load dA; store h / add into y /
// mask into dx). Tiles take kTileRows rows (6 with AVX2's 16 registers, 8 with AVX-512's 32) and
// two vectors, then smaller tiles for the tails, so the accumulators stay in registers. Rows that
// need converting (bfloat16) or masking (dropout) are first written as float32 to a per-slab
// scratch that the products then read from cache.
#include "common/cpu_vec.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/dropout_cpu.h"
#include "lora/lora_cpu_vec.h"

namespace lrkernels::LRK_ISA_NS {
namespace {

using V = Vectorized<float>;
constexpr int64_t VS = V::size();
static_assert(kLoraVecPad % VS == 0, "the padding must be a whole number of vectors");
constexpr int kTileRows = VS >= 16 ? 8 : 6;
constexpr int kTileVecs = 2;

// ---- element loads / stores (float32 or bfloat16 activations; count < VS only at row ends) ----

inline V load(const float* p, int64_t count) { return count >= VS ? V::loadu(p) : V::loadu(p, count); }
inline V load(const c10::BFloat16* p, int64_t count) {
  if (count >= VS) {
    V v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  }
  __at_align__ float tmp[VS] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(p[i]);
  return V::loadu(tmp);
}
inline void store(float* p, const V& v, int64_t count) {
  if (count >= VS)
    v.store(p);
  else
    v.store(p, count);
}
inline void store(c10::BFloat16* p, const V& v, int64_t count) {
  // vectorised rounding to nearest even (as c10::BFloat16), then the first VS (or count) lanes
  __at_align__ c10::BFloat16 tmp[Vectorized<c10::BFloat16>::size()];
  at::vec::convert_float_bfloat16(v, v).store(tmp);
  std::memcpy(p, tmp, sizeof(c10::BFloat16) * static_cast<size_t>(std::min<int64_t>(count, VS)));
}

// Row `src` (cols elements) as float32 into dst, times the keep mask `m` (keep_scale or 0 per
// column; null: no dropout), zero-filled up to `padded` columns.
template <typename E>
void row_to_float(const E* src, int64_t cols, const float* m, float* dst, int64_t padded) {
  int64_t k = 0;
  for (; k + VS <= cols; k += VS) {
    V v = load(src + k, VS);
    if (m) v = v * V::loadu(m + k);
    v.store(dst + k);
  }
  for (; k < cols; ++k) dst[k] = m ? static_cast<float>(src[k]) * m[k] : static_cast<float>(src[k]);
  for (; k < padded; ++k) dst[k] = 0.0f;
}

// The keep mask of global row `row` as floats: keep_scale where kept, 0 where dropped; zero past
// cols up to padded.
void mask_row(const LoraVecDropout& d, int64_t row, int64_t cols, int64_t padded, uint32_t* bits, float* m) {
  const int64_t groups = (cols + 7) / 8;
  dropout_row_keep_bits(d.seed, row, groups, d.threshold, bits);
  const float ks = d.keep_scale;
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t b = bits[g];
    float* o = m + 8 * g;
    for (int j = 0; j < 8; ++j) o[j] = ((b >> j) & 1u) ? ks : 0.0f;  // padded >= 8 * groups
  }
  for (int64_t k = cols; k < padded; ++k) m[k] = 0.0f;
}

// ---- the register tile ----------------------------------------------------------------------

// acc[g][c] = init(g, c); acc[g][c] += Σ_k a[g·ag + k·ak] · b[k·ldb + c·VS + lane]; fin(g, c, acc).
template <int G, int C, typename Init, typename Fin>
inline void tile(const float* a, int64_t ag, int64_t ak, int64_t K, const float* b, int64_t ldb, const Init& init,
                 const Fin& fin) {
  V acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = init(g, c);
  for (int64_t k = 0; k < K; ++k) {
    V bv[C];
    for (int c = 0; c < C; ++c) bv[c] = V::loadu(b + k * ldb + c * VS);
    const float* ak_ = a + k * ak;
    for (int g = 0; g < G; ++g) {
      const V s(ak_[g * ag]);
      for (int c = 0; c < C; ++c) acc[g][c] = at::vec::fmadd(s, bv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) fin(g, c, acc[g][c]);
}

// The product over M rows (a's first index, stride ag) and N columns of b (a multiple of VS:
// b is padded), K deep. init(i, j) / fin(i, j, v) see the row i and the first column j of each
// vector.
template <int G, typename Init, typename Fin>
inline void row_group(int64_t i0, int64_t N, const float* a, int64_t ag, int64_t ak, int64_t K, const float* b,
                      int64_t ldb, const Init& init, const Fin& fin) {
  const float* ai = a + i0 * ag;
  int64_t j = 0;
  for (; j + kTileVecs * VS <= N; j += kTileVecs * VS)
    tile<G, kTileVecs>(
        ai, ag, ak, K, b + j, ldb, [&](int g, int c) { return init(i0 + g, j + c * VS); },
        [&](int g, int c, const V& v) { fin(i0 + g, j + c * VS, v); });
  for (; j < N; j += VS)
    tile<G, 1>(
        ai, ag, ak, K, b + j, ldb, [&](int g, int) { return init(i0 + g, j); },
        [&](int g, int, const V& v) { fin(i0 + g, j, v); });
}

template <typename Init, typename Fin>
void product(int64_t M, int64_t N, int64_t K, const float* a, int64_t ag, int64_t ak, const float* b, int64_t ldb,
             const Init& init, const Fin& fin) {
  int64_t i = 0;
  for (; i + kTileRows <= M; i += kTileRows) row_group<kTileRows>(i, N, a, ag, ak, K, b, ldb, init, fin);
  if (i + 4 <= M) {
    row_group<4>(i, N, a, ag, ak, K, b, ldb, init, fin);
    i += 4;
  }
  if (i + 2 <= M) {
    row_group<2>(i, N, a, ag, ak, K, b, ldb, init, fin);
    i += 2;
  }
  if (i < M) row_group<1>(i, N, a, ag, ak, K, b, ldb, init, fin);
}

const auto kZero = [](int64_t, int64_t) { return V(0.0f); };

// ---- the kernels ----------------------------------------------------------------------------

template <typename E>
void shrink(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r, float* h,
            int64_t ldh, const LoraVecDropout& d, float* scratch, uint32_t* bits) {
  const int64_t rp = lora_vec_pad(r), colsp = lora_vec_pad(cols);
  // float32 rows without dropout are read in place; otherwise converted (and masked) first
  const bool in_place = std::is_same_v<E, float> && d.threshold == 0;
  float* xd = scratch;
  float* m = scratch + kLoraVecSlab * colsp;
  for (int64_t t0 = 0; t0 < rows; t0 += kLoraVecSlab) {
    const int64_t nt = std::min(kLoraVecSlab, rows - t0);
    const float* src;
    int64_t lds;
    if (in_place) {
      src = reinterpret_cast<const float*>(x + t0 * ldx);
      lds = ldx;
    } else {
      for (int64_t i = 0; i < nt; ++i) {
        if (d.threshold) mask_row(d, row0 + t0 + i, cols, colsp, bits, m);
        row_to_float(x + (t0 + i) * ldx, cols, d.threshold ? m : nullptr, xd + i * colsp, colsp);
      }
      src = xd;
      lds = colsp;
    }
    float* ht = h + t0 * ldh;
    product(nt, rp, cols, src, lds, 1, at, rp, kZero, [&](int64_t i, int64_t j, const V& v) {
      if (j < r) store(ht + i * ldh + j, v, r - j);
    });
  }
}

template <typename E>
void expand_acc(E* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r, const float* bt,
                int64_t ldb) {
  product(
      rows, lora_vec_pad(n), r, h, ldh, 1, bt, ldb,
      [&](int64_t i, int64_t j) { return j < n ? load(y + i * ldy + j, n - j) : V(0.0f); },
      [&](int64_t i, int64_t j, const V& v) {
        if (j < n) store(y + i * ldy + j, v, n - j);
      });
}

template <typename E>
void grad_out(const E* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff, const float* hg,
              float* dh, float* p, float* scratch) {
  const int64_t np = lora_vec_pad(n);
  for (int64_t t0 = 0; t0 < rows; t0 += kLoraVecSlab) {
    const int64_t nt = std::min(kLoraVecSlab, rows - t0);
    const float* src;
    int64_t lds;
    if constexpr (std::is_same_v<E, float>) {
      src = dy + t0 * ldy;
      lds = ldy;
    } else {
      for (int64_t i = 0; i < nt; ++i) row_to_float(dy + (t0 + i) * ldy, n, nullptr, scratch + i * np, np);
      src = scratch;
      lds = np;
    }
    if (dh) {
      float* dht = dh + t0 * rp;
      product(nt, rp, n, src, lds, 1, beff, rp, kZero,
              [&](int64_t i, int64_t j, const V& v) { v.store(dht + i * rp + j); });
    }
    if (p) {
      // outputs against this slab's rows: a(o, t) = dy[t, o]
      product(
          n, rp, nt, src, 1, lds, hg + t0 * rp, rp, [&](int64_t o, int64_t j) { return V::loadu(p + o * rp + j); },
          [&](int64_t o, int64_t j, const V& v) { v.store(p + o * rp + j); });
    }
  }
}

template <typename E>
void grad_in(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du, int64_t ldu,
             int64_t r, const float* a, int64_t lda, float* da, E* dx, int64_t lddx, const LoraVecDropout& d,
             float* scratch, uint32_t* bits) {
  const int64_t colsp = lora_vec_pad(cols);
  float* xd = scratch;                          // (slab, colsp): drop(x) as float32
  float* m = scratch + kLoraVecSlab * colsp;   // (slab, colsp): the keep masks (keep_scale or 0)
  for (int64_t t0 = 0; t0 < rows; t0 += kLoraVecSlab) {
    const int64_t nt = std::min(kLoraVecSlab, rows - t0);
    if (d.threshold)
      for (int64_t i = 0; i < nt; ++i) mask_row(d, row0 + t0 + i, cols, colsp, bits, m + i * colsp);
    const float* dut = du + t0 * ldu;
    if (da) {
      for (int64_t i = 0; i < nt; ++i)
        row_to_float(x + (t0 + i) * ldx, cols, d.threshold ? m + i * colsp : nullptr, xd + i * colsp, colsp);
      // ranks against this slab's rows: a(j, t) = du[t, j]
      product(
          r, colsp, nt, dut, 1, ldu, xd, colsp, [&](int64_t j, int64_t k) { return V::loadu(da + j * lda + k); },
          [&](int64_t j, int64_t k, const V& v) { v.store(da + j * lda + k); });
    }
    if (dx) {
      E* dxt = dx + t0 * lddx;
      const float* mt = d.threshold ? m : nullptr;
      product(nt, colsp, r, dut, ldu, 1, a, lda, kZero, [&](int64_t i, int64_t k, const V& v) {
        if (k >= cols) return;
        E* o = dxt + i * lddx + k;
        const V u = mt ? v * V::loadu(mt + i * colsp + k) : v;
        store(o, load(o, cols - k) + u, cols - k);
      });
    }
  }
}

template <typename E>
constexpr LoraVecOps<E> ops() {
  return LoraVecOps<E>{&shrink<E>, &expand_acc<E>, &grad_out<E>, &grad_in<E>};
}

}  // namespace

const LoraVecKernels& lora_vec_kernels() {
  static const LoraVecKernels k{ops<float>(), ops<c10::BFloat16>()};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
