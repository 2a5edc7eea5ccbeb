// gqa_attention's tile kernels over at::vec (compiled once per instruction set; see
// common/cpu_vec.h and gqa_cpu_vec.h): FlashAttention-2's forward recurrence (arXiv 2307.08691)
// with the queries of a whole GQA group against each K/V tile, and the backward that
// recomputes P = exp(S − lse) tile by tile (no (Sq, Sk) tensor), using Di = rowsum(dO ⊙ O)
// for the softmax Jacobian: dS = P ⊙ (dO Vᵀ − Di).
//
// Two register-tiled products do all the arithmetic, both in the accumulation dtype T:
//   dots: C[i, j] = α·⟨A_i, B_j⟩ (scores, dO Vᵀ): four rows of A share each load of B_j;
//   axpy: O_i += Σ_j P[i, j]·B_j (P V, dS K, Pᵀ dO, dSᵀ Q): a 4 rows × 2 vectors accumulator
//         tile stays in registers over the whole j loop.
// float32 / float64 K and V tiles are read in place (rows strided by the sequence stride);
// bfloat16 tiles are converted to float32 once per tile.
#include "common/cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "gqa/gqa_cpu_vec.h"

namespace lrkernels::LRK_ISA_NS {
namespace {

template <typename E>
using acc_t = std::conditional_t<std::is_same_v<E, double>, double, float>;

template <typename T>
inline Vectorized<T> ld(const T* p, int64_t n) {
  return n >= Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
}
template <typename T>
inline void st(T* p, const Vectorized<T>& v, int64_t n) {
  if (n >= Vectorized<T>::size())
    v.store(p);
  else
    v.store(p, n);
}
template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// Row of D elements of dtype E as T.
template <typename E, typename T>
inline void to_acc(const E* src, T* dst, int64_t D) {
  if constexpr (std::is_same_v<E, T>) {
    std::memcpy(dst, src, sizeof(T) * static_cast<size_t>(D));
  } else {
    using V = Vectorized<float>;
    constexpr int64_t L = V::size();
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      V v;
      at::vec::load_fp32_from_bf16(src + d, v);
      v.store(dst + d);
    }
    for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  }
}
template <typename E, typename T>
inline void from_acc(const T* src, E* dst, int64_t D) {
  if constexpr (std::is_same_v<E, T>) {
    std::memcpy(dst, src, sizeof(T) * static_cast<size_t>(D));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<E>(src[d]);  // round to nearest even
  }
}

// Rows another product reads next, asked for line by line while this product streams its own
// rows (decode): the memory traffic overlaps the arithmetic instead of following it, and the
// requests trickle out at the pace the rows are consumed, so they never fill the core's miss
// buffers at once (a burst of a whole tile's prefetches stalls the core until most of it has
// arrived). Row j's line at byte `off` is asked for when this product reaches its own row j at
// element offset off / elem. The lines go to L2 (locality 2: prefetcht1), not to L1, where a
// tile's worth of them evicts the rows being computed on: decode B1 Hq32 Hkv8 D128 fp32 on a
// 2-core Zen 4, 4096 keys in 0.83–0.90 ms against 1.26–1.88 ms with L1 fills (AVX2 0.96 against
// 1.34–1.40), 16384 keys in 5.2 against 7.2 ms.
struct RowPrefetch {
  const char* base = nullptr;  // null: nothing to ask for
  int64_t ld = 0;              // bytes between rows
  int64_t rows = 0;
  int64_t row_bytes = 0;
  int64_t elem = 0;  // bytes per element of the prefetched rows
  inline void line(int64_t j, int64_t d) const {  // the line of row j holding element d, once per line
    const int64_t off = d * elem;
    if (base && j < rows && off < row_bytes && off % 64 == 0) __builtin_prefetch(base + j * ld + off, 0, 2);
  }
  inline const char* row(int64_t j) const { return base && j < rows ? base + j * ld : nullptr; }
  inline void whole_row(int64_t j) const {  // every line of row j at once
    if (base && j < rows)
      for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(base + j * ld + off, 0, 2);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen vectors to one: lane k holds the sum of the lanes of v[4·(k % 4) + k / 4] (four rounds
// of pairwise shuffles and adds: 15 adds for 16 sums, against 4 per sum reduced one at a time).
inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

// dots() for float32 rows in blocks of 4 rows × 4 keys: 16 accumulators, reduced together.
// Returns the number of keys done (a multiple of 4); the rest is left to the caller.
inline int64_t dots_4x4(const float* A, int64_t nA, int64_t lda, const float* B, int64_t nB, int64_t ldb, int64_t D,
                        float alpha, float* C, int64_t ldc, const RowPrefetch& pf) {
  const int64_t nj = nB / 4 * 4;
  const __m512 av = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i + 4 <= nA; i += 4) {
    const float* a = A + i * lda;
    for (int64_t j = 0; j < nj; j += 4) {
      const float* b = B + j * ldb;
      __m512 acc[16];  // acc[4·key + row]
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
      const char* pr[4];  // rows to ask for (null: none); a line per 16 elements of E covers them
      for (int c = 0; c < 4; ++c) pr[c] = i == 0 ? pf.row(j + c) : nullptr;
      const bool any = pr[0] != nullptr;  // rows are asked for from the first on
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
        if (any)
          for (int c = 0; c < 4; ++c)
            if (pr[c]) __builtin_prefetch(pr[c] + d * pf.elem, 0, 2);  // to L2, as RowPrefetch
        __m512 x[4];
        for (int r = 0; r < 4; ++r) x[r] = _mm512_maskz_loadu_ps(m, a + r * lda + d);
        for (int c = 0; c < 4; ++c) {
          const __m512 y = _mm512_maskz_loadu_ps(m, b + c * ldb + d);
          for (int r = 0; r < 4; ++r) acc[4 * c + r] = _mm512_fmadd_ps(x[r], y, acc[4 * c + r]);
        }
      }
      const __m512 s = _mm512_mul_ps(reduce16(acc), av);  // lane 4·row + key
      _mm_storeu_ps(C + (i + 0) * ldc + j, _mm512_extractf32x4_ps(s, 0));
      _mm_storeu_ps(C + (i + 1) * ldc + j, _mm512_extractf32x4_ps(s, 1));
      _mm_storeu_ps(C + (i + 2) * ldc + j, _mm512_extractf32x4_ps(s, 2));
      _mm_storeu_ps(C + (i + 3) * ldc + j, _mm512_extractf32x4_ps(s, 3));
    }
  }
  return nj;
}
#endif

// C[i·ldc + j] = alpha·⟨A_i, B_j⟩ for i < nA, j < nB; rows of D elements.
template <typename T>
void dots(const T* A, int64_t nA, int64_t lda, const T* B, int64_t nB, int64_t ldb, int64_t D, T alpha, T* C,
          int64_t ldc, const RowPrefetch& pf = {}) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t Df = D / L * L, tail = D - Df;
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (nA % 4 == 0) {
      j = dots_4x4(A, nA, lda, B, nB, ldb, D, alpha, C, ldc, pf);
      if (j == nB) return;
    }
  }
#endif
  if (nA == 4) {  // decode's GQA group of four: two keys at a time share each load of the four rows
    const T* a0 = A;
    const T* a1 = a0 + lda;
    const T* a2 = a1 + lda;
    const T* a3 = a2 + lda;
    for (; j + 2 <= nB; j += 2) {
      const T* b = B + j * ldb;
      const T* c = b + ldb;
      // the two rows' lines asked for before the products (no per-vector test in the loop)
      pf.whole_row(j);
      pf.whole_row(j + 1);
      V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0)), t0(T(0)), t1(T(0)), t2(T(0)), t3(T(0));
      for (int64_t d = 0; d < D; d += L) {
        const int64_t n = std::min<int64_t>(L, D - d);
        const V bv = ld(b + d, n), cv = ld(c + d, n);
        const V x0 = ld(a0 + d, n), x1 = ld(a1 + d, n), x2 = ld(a2 + d, n), x3 = ld(a3 + d, n);
        s0 = at::vec::fmadd(x0, bv, s0);
        t0 = at::vec::fmadd(x0, cv, t0);
        s1 = at::vec::fmadd(x1, bv, s1);
        t1 = at::vec::fmadd(x1, cv, t1);
        s2 = at::vec::fmadd(x2, bv, s2);
        t2 = at::vec::fmadd(x2, cv, t2);
        s3 = at::vec::fmadd(x3, bv, s3);
        t3 = at::vec::fmadd(x3, cv, t3);
      }
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<T, float>) {
        // the eight sums in one tree of horizontal adds: lanes (s0, t0, s1, t1 | s2, t2, s3, t3)
        const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(s0, t0), _mm256_hadd_ps(s1, t1));
        const __m256 g2 = _mm256_hadd_ps(_mm256_hadd_ps(s2, t2), _mm256_hadd_ps(s3, t3));
        const __m256 sums = _mm256_mul_ps(_mm256_set1_ps(alpha), _mm256_add_ps(_mm256_permute2f128_ps(g1, g2, 0x20),
                                                                               _mm256_permute2f128_ps(g1, g2, 0x31)));
        alignas(32) float out[8];
        _mm256_store_ps(out, sums);
        for (int r = 0; r < 4; ++r) {
          C[r * ldc + j] = out[2 * r];
          C[r * ldc + j + 1] = out[2 * r + 1];
        }
        continue;
      }
#endif
      C[j] = alpha * hsum(s0);
      C[j + 1] = alpha * hsum(t0);
      C[ldc + j] = alpha * hsum(s1);
      C[ldc + j + 1] = alpha * hsum(t1);
      C[2 * ldc + j] = alpha * hsum(s2);
      C[2 * ldc + j + 1] = alpha * hsum(t2);
      C[3 * ldc + j] = alpha * hsum(s3);
      C[3 * ldc + j + 1] = alpha * hsum(t3);
    }
  }
  for (; j < nB; ++j) {
    const T* b = B + j * ldb;
    for (int64_t d = 0; d < D; d += L) pf.line(j, d);
    int64_t i = 0;
    for (; i + 4 <= nA; i += 4) {
      const T* a0 = A + i * lda;
      const T* a1 = a0 + lda;
      const T* a2 = a1 + lda;
      const T* a3 = a2 + lda;
      V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
      for (int64_t d = 0; d < Df; d += L) {
        const V bv = V::loadu(b + d);
        s0 = at::vec::fmadd(V::loadu(a0 + d), bv, s0);
        s1 = at::vec::fmadd(V::loadu(a1 + d), bv, s1);
        s2 = at::vec::fmadd(V::loadu(a2 + d), bv, s2);
        s3 = at::vec::fmadd(V::loadu(a3 + d), bv, s3);
      }
      if (tail) {
        const V bv = V::loadu(b + Df, tail);
        s0 = at::vec::fmadd(V::loadu(a0 + Df, tail), bv, s0);
        s1 = at::vec::fmadd(V::loadu(a1 + Df, tail), bv, s1);
        s2 = at::vec::fmadd(V::loadu(a2 + Df, tail), bv, s2);
        s3 = at::vec::fmadd(V::loadu(a3 + Df, tail), bv, s3);
      }
      C[i * ldc + j] = alpha * hsum(s0);
      C[(i + 1) * ldc + j] = alpha * hsum(s1);
      C[(i + 2) * ldc + j] = alpha * hsum(s2);
      C[(i + 3) * ldc + j] = alpha * hsum(s3);
    }
    for (; i < nA; ++i) {
      const T* a = A + i * lda;
      V s(T(0));
      for (int64_t d = 0; d < Df; d += L) s = at::vec::fmadd(V::loadu(a + d), V::loadu(b + d), s);
      if (tail) s = at::vec::fmadd(V::loadu(a + Df, tail), V::loadu(b + Df, tail), s);
      C[i * ldc + j] = alpha * hsum(s);
    }
  }
}

// O[i·ldo + :D] += Σ_{j < nJ} P[i·ldp + j]·B[j·ldb + :D] for NR rows i.
template <int NR, typename T>
inline void axpy_rows(const T* P, int64_t ldp, int64_t nJ, const T* B, int64_t ldb, int64_t D, T* O, int64_t ldo,
                      const RowPrefetch& pf = {}) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t d = 0; d < D; d += 2 * L) {
    const int64_t c0 = std::min<int64_t>(L, D - d), c1 = std::clamp<int64_t>(D - d - L, 0, L);
    V acc0[NR], acc1[NR];
    for (int r = 0; r < NR; ++r) {
      acc0[r] = ld(O + r * ldo + d, c0);
      acc1[r] = c1 ? ld(O + r * ldo + d + L, c1) : V(T(0));
    }
    for (int64_t j = 0; j < nJ; ++j) {
      const T* b = B + j * ldb + d;
      pf.line(j, d);
      pf.line(j, d + L);
      const V b0 = ld(b, c0);
      const V b1 = c1 ? ld(b + L, c1) : V(T(0));
      for (int r = 0; r < NR; ++r) {
        const V pv(P[r * ldp + j]);
        acc0[r] = at::vec::fmadd(pv, b0, acc0[r]);
        acc1[r] = at::vec::fmadd(pv, b1, acc1[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      st(O + r * ldo + d, acc0[r], c0);
      if (c1) st(O + r * ldo + d + L, acc1[r], c1);
    }
  }
}

template <typename T>
void axpy(const T* P, int64_t nI, int64_t nJ, int64_t ldp, const T* B, int64_t ldb, int64_t D, T* O, int64_t ldo,
          const RowPrefetch& pf = {}) {
  int64_t i = 0;
  for (; i + 4 <= nI; i += 4)
    axpy_rows<4>(P + i * ldp, ldp, nJ, B, ldb, D, O + i * ldo, ldo, i == 0 ? pf : RowPrefetch{});
  for (; i < nI; ++i) axpy_rows<1>(P + i * ldp, ldp, nJ, B, ldb, D, O + i * ldo, ldo, i == 0 ? pf : RowPrefetch{});
}

// One full vector of E as T.
template <typename E, typename T>
inline Vectorized<T> load_acc(const E* p) {
  if constexpr (std::is_same_v<E, T>) {
    return Vectorized<T>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  }
}

// Tile of kt rows (leading dim ld, dtype E) transposed into dst (D × kGqaKeyTile) as T: L×L
// blocks in registers, the ragged edges element by element.
template <typename E, typename T>
inline void transpose_tile(const E* src, int64_t ld, int64_t kt, int64_t D, T* dst) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size(), KT = kGqaKeyTile;
  const int64_t jf = kt / L * L, df = D / L * L;
  V v[L];
  for (int64_t j0 = 0; j0 < jf; j0 += L)
    for (int64_t d0 = 0; d0 < df; d0 += L) {
      for (int64_t i = 0; i < L; ++i) v[i] = load_acc<E, T>(src + (j0 + i) * ld + d0);
      transpose_block<T>(v);
      for (int64_t k = 0; k < L; ++k) v[k].store(dst + (d0 + k) * KT + j0);
    }
  for (int64_t j = 0; j < kt; ++j) {
    const E* s = src + j * ld;
    for (int64_t d = j < jf ? df : 0; d < D; ++d) dst[d * KT + j] = static_cast<T>(s[d]);
  }
}

// Query blocks of at least this many rows take the products against a transposed K/V tile:
// the transposition is paid once per tile (or once per task in the dK/dV pass) and the product
// is then broadcast FMAs with no horizontal sums; decode's few rows take dots instead.
constexpr int64_t kGqaTransposeRows = 16;

template <typename T>
inline void scale_row(T* x, int64_t n, T a);

// C[i·KT + j] = alpha·⟨A_i, B_j⟩ for i < R, j < kt: through the transposed tile Bt (D × KT) when
// given, else through the tile's rows B (leading dim ldb).
template <typename T>
void tile_products(const T* A, int64_t R, const T* B, int64_t ldb, const T* Bt, int64_t kt, int64_t D, T alpha,
                   T* C, const RowPrefetch& pf = {}) {
  constexpr int64_t KT = kGqaKeyTile;
  if (!Bt) {
    dots(A, R, D, B, kt, ldb, D, alpha, C, KT, pf);
    return;
  }
  for (int64_t i = 0; i < R; ++i) std::fill(C + i * KT, C + i * KT + kt, T(0));
  axpy(A, R, D, D, Bt, KT, kt, C, KT);
  if (alpha != T(1))
    for (int64_t i = 0; i < R; ++i) scale_row(C + i * KT, kt, alpha);
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V av(a);
  for (int64_t d = 0; d < n; d += L) st(x + d, ld(x + d, n - d) * av, n - d);
}

// max that lets a NaN through (std::max keeps its first argument when the other is NaN, which
// would drop a NaN score and return garbage instead of NaN)
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || std::isnan(b)) ? b : a;
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= L) {  // at::vec::maximum propagates NaN, as nan_max does
    V mv = V::loadu(x);
    for (j = L; j + L <= n; j += L) mv = at::vec::maximum(mv, V::loadu(x + j));
    T lanes[L];
    mv.store(lanes);
    for (int64_t i = 0; i < L; ++i) m = nan_max(m, lanes[i]);
  }
  for (; j < n; ++j) m = nan_max(m, x[j]);
  return m;
}

// x[j] ← exp(x[j] − m) for j < n; returns the sum. exp(−inf − m) = 0 for finite m.
template <typename T>
inline T exp_row(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V mv(m);
  V acc(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V e = (V::loadu(x + j) - mv).exp();
    e.store(x + j);
    acc = acc + e;
  }
  T s = hsum(acc);
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}

template <typename T>
struct Scratch {
  std::vector<T> buf;
  T* take(size_t n, size_t& off) {
    T* p = buf.data() + off;
    off += (n + 15) / 16 * 16;
    return p;
  }
};

template <typename T>
Scratch<T>& scratch(size_t n) {
  thread_local Scratch<T> s;
  n += 16 * 16;  // each take() rounds up to 16 elements
  if (s.buf.size() < n) s.buf.resize(n);
  return s;
}

// A K or V tile of kt rows as T: in place for float32 / float64, converted for bfloat16.
template <typename E, typename T>
inline const T* tile_rows(const E* src, int64_t ld_src, int64_t kt, int64_t D, T* buf, int64_t& ld) {
  if constexpr (std::is_same_v<E, T>) {
    ld = ld_src;
    return src;
  } else {
    for (int64_t j = 0; j < kt; ++j) to_acc(src + j * ld_src, buf + j * D, D);
    ld = D;
    return buf;
  }
}

// Scores of R query rows (head g·G + r / nq, position q0 + r % nq) against keys [j0, j0 + kt)
// (rows K, or transposed Kt when not null), scaled, masked: keys a row may not see (past its causal end or kv_lens) get −inf, then the
// additive mask. S row-major with leading dim kGqaKeyTile.
template <typename T>
inline void masked_scores(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t nq, int64_t len, const T* Q,
                          const T* K, int64_t ldk, const T* Kt, int64_t j0, int64_t kt, T* S,
                          const RowPrefetch& pf = {}) {
  const int64_t R = p.G * nq, D = p.D, KT = kGqaKeyTile;
  tile_products(Q, R, K, ldk, Kt, kt, D, static_cast<T>(p.scale), S, pf);
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* mask = static_cast<const T*>(p.mask);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t hl = r / nq, i = q0 + r % nq;
    T* s = S + r * KT;
    const int64_t nv = std::clamp<int64_t>(gqa_key_end(p, len, i) - j0, 0, kt);
    for (int64_t j = nv; j < kt; ++j) s[j] = ninf;
    if (mask) {
      const T* m = mask + b * p.m_s[0] + (g * p.G + hl) * p.m_s[1] + i * p.m_s[2] + j0 * p.m_s[3];
      for (int64_t j = 0; j < nv; ++j) s[j] += m[j * p.m_s[3]];
    }
  }
}

// Asks for the next K / V tile while this one is computed on (n ≤ 0: nothing): the rows are
// strided, so the hardware prefetcher only follows within a row.
template <typename E>
inline void prefetch_rows(const E* src, int64_t ld, int64_t n, int64_t D) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(E));
  for (int64_t j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(src + j * ld);
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(row + c, 0, 3);
  }
}

template <typename E>
void forward(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, int64_t k0, int64_t k1, E* o,
             void* lse_v, void* o_part_v, void* lse_part_v) {
  using T = acc_t<E>;
  const int64_t G = p.G, D = p.D, nq = q1 - q0, R = G * nq, KT = kGqaKeyTile;
  const int64_t len = gqa_kv_len(p, b);
  Scratch<T>& sc = scratch<T>(static_cast<size_t>(2 * R * D + R * KT + 2 * KT * D + 2 * R + 96));
  size_t off = 0;
  T* Q = sc.take(R * D, off);
  T* O = sc.take(R * D, off);
  T* S = sc.take(R * KT, off);
  T* kbuf = sc.take(KT * D, off);
  T* vbuf = sc.take(KT * D, off);
  T* m = sc.take(R, off);
  T* l = sc.take(R, off);
  const E* q = static_cast<const E*>(p.q) + b * p.q_s[0];
  for (int64_t r = 0; r < R; ++r) to_acc(q + (g * G + r / nq) * p.q_s[1] + (q0 + r % nq) * p.q_s[2], Q + r * D, D);
  std::fill(O, O + R * D, T(0));
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(m, m + R, ninf);
  std::fill(l, l + R, T(0));

  const int64_t kend = std::min(k1, gqa_key_end(p, len, q1 - 1));
  const E* kb = static_cast<const E*>(p.k) + b * p.k_s[0] + g * p.k_s[1];
  const E* vb = static_cast<const E*>(p.v) + b * p.v_s[0] + g * p.v_s[1];
  for (int64_t j0 = k0; j0 < kend; j0 += KT) {
    const int64_t kt = std::min(KT, kend - j0), next = std::min(KT, kend - j0 - KT);
    // Few query rows (decode): the score product asks for this tile's V rows and the output
    // product for the next tile's K rows, as they go. Many rows: the next tile up front.
    const bool spread = R < kGqaTransposeRows;
    const auto rows_of = [&](const E* base, int64_t ld, int64_t n) {
      return RowPrefetch{reinterpret_cast<const char*>(base), ld * static_cast<int64_t>(sizeof(E)), n,
                         D * static_cast<int64_t>(sizeof(E)), static_cast<int64_t>(sizeof(E))};
    };
    if (!spread) {
      prefetch_rows(kb + (j0 + KT) * p.k_s[2], p.k_s[2], next, D);
      prefetch_rows(vb + (j0 + KT) * p.v_s[2], p.v_s[2], next, D);
    }
    int64_t ldk = 0, ldv;
    const T* K = nullptr;
    const T* Kt = nullptr;
    if (R >= kGqaTransposeRows) {
      transpose_tile(kb + j0 * p.k_s[2], p.k_s[2], kt, D, kbuf);
      Kt = kbuf;
    } else {
      K = tile_rows(kb + j0 * p.k_s[2], p.k_s[2], kt, D, kbuf, ldk);
    }
    masked_scores(p, b, g, q0, nq, len, Q, K, ldk, Kt, j0, kt, S,
                  spread ? rows_of(vb + j0 * p.v_s[2], p.v_s[2], kt) : RowPrefetch{});
    for (int64_t r = 0; r < R; ++r) {
      T* s = S + r * KT;
      const T m_new = nan_max(m[r], row_max(s, kt));
      if (m_new == ninf) {  // nothing seen yet: no weight
        std::fill(s, s + kt, T(0));
        continue;
      }
      const T alpha = std::exp(m[r] - m_new);  // 0 when m was −inf
      const T sum = exp_row(s, kt, m_new);
      if (alpha != T(1)) scale_row(O + r * D, D, alpha);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
    const T* Vt = tile_rows(vb + j0 * p.v_s[2], p.v_s[2], kt, D, vbuf, ldv);
    axpy(S, R, kt, KT, Vt, ldv, D, O, D,
         spread && next > 0 ? rows_of(kb + (j0 + KT) * p.k_s[2], p.k_s[2], next) : RowPrefetch{});
  }

  T* o_part = static_cast<T*>(o_part_v);
  T* lse_part = static_cast<T*>(lse_part_v);
  T* lse = static_cast<T*>(lse_v);
  for (int64_t r = 0; r < R; ++r) {
    T* orow = O + r * D;
    T lse_r;
    if (l[r] == T(0)) {  // a row that sees no key (or only −inf mask entries): o = 0, lse = −inf
      std::fill(orow, orow + D, T(0));
      lse_r = ninf;
    } else {  // (a NaN sum propagates)
      scale_row(orow, D, T(1) / l[r]);
      lse_r = m[r] + std::log(l[r]);
    }
    if (o_part) {
      std::memcpy(o_part + r * D, orow, sizeof(T) * static_cast<size_t>(D));
      lse_part[r] = lse_r;
    } else {
      const int64_t row = (b * p.Hq + g * G + r / nq) * p.Sq + q0 + r % nq;
      from_acc(orow, o + row * D, D);
      lse[row] = lse_r;
    }
  }
}

template <typename E>
void combine(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, int64_t n, const void* o_parts_v,
             int64_t part_stride, const void* lse_parts_v, int64_t lse_stride, E* o, void* lse_v) {
  using T = acc_t<E>;
  const int64_t G = p.G, D = p.D, nq = q1 - q0, R = G * nq;
  const T* o_parts = static_cast<const T*>(o_parts_v);
  const T* lse_parts = static_cast<const T*>(lse_parts_v);
  T* lse = static_cast<T*>(lse_v);
  Scratch<T>& sc = scratch<T>(static_cast<size_t>(D + 16));
  T* acc = sc.buf.data();
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    T mx = ninf;
    for (int64_t s = 0; s < n; ++s) mx = nan_max(mx, lse_parts[s * lse_stride + r]);
    std::fill(acc, acc + D, T(0));
    T lse_r = ninf;
    if (mx != ninf) {
      T tot = 0;
      for (int64_t s = 0; s < n; ++s) {
        const T w = std::exp(lse_parts[s * lse_stride + r] - mx);
        if (w == T(0)) continue;
        tot += w;
        axpy_rows<1>(&w, 1, 1, o_parts + s * part_stride + r * D, D, D, acc, D);
      }
      scale_row(acc, D, T(1) / tot);
      lse_r = mx + std::log(tot);
    }
    const int64_t row = (b * p.Hq + g * G + r / nq) * p.Sq + q0 + r % nq;
    from_acc(acc, o + row * D, D);
    lse[row] = lse_r;
  }
}

// The query-side rows of a backward block: Q and dO as T, Di = ⟨dO_r, O_r⟩ and lse per row.
template <typename E, typename T>
void load_grad_rows(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t nq, T* Q, T* dO, T* Di, T* lse,
                    T* tmp) {
  const int64_t G = p.G, D = p.D, R = G * nq;
  const E* q = static_cast<const E*>(p.q) + b * p.q_s[0];
  const E* go = static_cast<const E*>(p.grad_o) + b * p.go_s[0];
  const E* o = static_cast<const E*>(p.o) + b * p.o_s[0];
  const T* lse_all = static_cast<const T*>(p.lse);
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = g * G + r / nq, i = q0 + r % nq;
    to_acc(q + h * p.q_s[1] + i * p.q_s[2], Q + r * D, D);
    to_acc(go + h * p.go_s[1] + i * p.go_s[2], dO + r * D, D);
    to_acc(o + h * p.o_s[1] + i * p.o_s[2], tmp, D);
    V acc(T(0));
    for (int64_t d = 0; d < D; d += L) acc = at::vec::fmadd(ld(dO + r * D + d, D - d), ld(tmp + d, D - d), acc);
    Di[r] = hsum(acc);
    lse[r] = lse_all[(b * p.Hq + h) * p.Sq + i];
  }
}

// P = exp(S − lse) and dS = scale·P ⊙ (dO Vᵀ − Di) of a block of rows against one K/V tile,
// given as rows (K, Vt) or transposed (Kt, Vtt; either form may be null when the other is
// given) (rows with lse = −inf see no key: P = 0). S and dS row-major, leading dim kGqaKeyTile.
template <typename T>
void probs_and_grad(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t nq, int64_t len, const T* Q,
                    const T* dO, const T* Di, const T* lse, const T* K, int64_t ldk, const T* Kt, const T* Vt,
                    int64_t ldv, const T* Vtt, int64_t j0, int64_t kt, T* S, T* dS) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t R = p.G * nq, D = p.D, KT = kGqaKeyTile;
  masked_scores(p, b, g, q0, nq, len, Q, K, ldk, Kt, j0, kt, S);
  tile_products(dO, R, Vt, ldv, Vtt, kt, D, T(1), dS);
  const T ninf = -std::numeric_limits<T>::infinity();
  const T scale = static_cast<T>(p.scale);
  for (int64_t r = 0; r < R; ++r) {
    T* s = S + r * KT;
    T* ds = dS + r * KT;
    if (lse[r] == ninf) {
      std::fill(s, s + kt, T(0));
      std::fill(ds, ds + kt, T(0));
      continue;
    }
    const V lv(lse[r]), dv(Di[r]), sv(scale);
    int64_t j = 0;
    for (; j + L <= kt; j += L) {
      const V pj = (V::loadu(s + j) - lv).exp();
      pj.store(s + j);
      (sv * pj * (V::loadu(ds + j) - dv)).store(ds + j);
    }
    for (; j < kt; ++j) {
      const T pj = std::exp(s[j] - lse[r]);
      s[j] = pj;
      ds[j] = scale * pj * (ds[j] - Di[r]);
    }
  }
}

template <typename E>
void grad_kv(const GqaParams& p, int64_t b, int64_t g, int64_t j0, int64_t j1, E* dk, E* dv) {
  using T = acc_t<E>;
  const int64_t G = p.G, D = p.D, KT = kGqaKeyTile;
  const int64_t len = gqa_kv_len(p, b);
  const int64_t kt = std::min(j1, len) - j0;
  if (kt <= 0) return;
  const int64_t bq = gqa_block_queries(G), Rmax = G * std::min(bq, p.Sq);
  const int64_t nt = std::max(Rmax, KT) * KT;  // Pᵀ, dSᵀ: kt ≤ KT rows of leading dim KT (or R)
  Scratch<T>& sc = scratch<T>(static_cast<size_t>(2 * Rmax * D + 2 * Rmax * KT + 2 * nt + 4 * KT * D + 3 * Rmax + D +
                                                  160));
  size_t off = 0;
  T* Q = sc.take(Rmax * D, off);
  T* dO = sc.take(Rmax * D, off);
  T* S = sc.take(Rmax * KT, off);
  T* dS = sc.take(Rmax * KT, off);
  T* St = sc.take(nt, off);
  T* dSt = sc.take(nt, off);
  T* kbuf = sc.take(KT * D, off);
  T* vbuf = sc.take(KT * D, off);
  T* dK = sc.take(KT * D, off);
  T* dV = sc.take(KT * D, off);
  T* Di = sc.take(Rmax, off);
  T* lse = sc.take(Rmax, off);
  T* tmp = sc.take(D, off);
  int64_t ldk = 0, ldv = 0;
  const E* ksrc = static_cast<const E*>(p.k) + b * p.k_s[0] + g * p.k_s[1] + j0 * p.k_s[2];
  const E* vsrc = static_cast<const E*>(p.v) + b * p.v_s[0] + g * p.v_s[1] + j0 * p.v_s[2];
  // the tile is the same for every query block of the task: transposed once when blocks are large
  const T *K = nullptr, *Kt = nullptr, *Vt = nullptr, *Vtt = nullptr;
  if (Rmax >= kGqaTransposeRows) {
    transpose_tile(ksrc, p.k_s[2], kt, D, kbuf);
    transpose_tile(vsrc, p.v_s[2], kt, D, vbuf);
    Kt = kbuf;
    Vtt = vbuf;
  } else {
    K = tile_rows(ksrc, p.k_s[2], kt, D, kbuf, ldk);
    Vt = tile_rows(vsrc, p.v_s[2], kt, D, vbuf, ldv);
  }
  std::fill(dK, dK + kt * D, T(0));
  std::fill(dV, dV + kt * D, T(0));
  // query i sees key j iff j < key_end(i): with causal, the first query to see j0 is j0 + Sq − len
  const int64_t i0 = p.causal ? std::max<int64_t>(0, j0 + p.Sq - len) : 0;
  for (int64_t q0 = i0; q0 < p.Sq; q0 += bq) {
    const int64_t nq = std::min(bq, p.Sq - q0), R = G * nq;
    load_grad_rows<E>(p, b, g, q0, nq, Q, dO, Di, lse, tmp);
    probs_and_grad(p, b, g, q0, nq, len, Q, dO, Di, lse, K, ldk, Kt, Vt, ldv, Vtt, j0, kt, S, dS);
    int64_t ldt = KT;
    if (R <= KT) {  // vector transposes: Pᵀ[j·KT + r]
      transpose_tile(S, KT, R, kt, St);
      transpose_tile(dS, KT, R, kt, dSt);
    } else {  // (a group of more than KT query heads over one KV head)
      ldt = R;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < kt; ++j) {
          St[j * R + r] = S[r * KT + j];
          dSt[j * R + r] = dS[r * KT + j];
        }
    }
    if (dv) axpy(St, kt, R, ldt, dO, D, D, dV, D);  // dV += Pᵀ dO
    if (dk) axpy(dSt, kt, R, ldt, Q, D, D, dK, D);  // dK += dSᵀ Q
  }
  const int64_t row0 = (b * p.Hkv + g) * p.Sk + j0;
  for (int64_t j = 0; j < kt; ++j) {
    if (dk) from_acc(dK + j * D, dk + (row0 + j) * D, D);
    if (dv) from_acc(dV + j * D, dv + (row0 + j) * D, D);
  }
}

template <typename E>
void grad_q(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, E* dq) {
  using T = acc_t<E>;
  const int64_t G = p.G, D = p.D, KT = kGqaKeyTile, nq = q1 - q0, R = G * nq;
  const int64_t len = gqa_kv_len(p, b);
  Scratch<T>& sc = scratch<T>(static_cast<size_t>(3 * R * D + 2 * R * KT + 3 * KT * D + 2 * R + D + 128));
  size_t off = 0;
  T* Q = sc.take(R * D, off);
  T* dO = sc.take(R * D, off);
  T* dQ = sc.take(R * D, off);
  T* S = sc.take(R * KT, off);
  T* dS = sc.take(R * KT, off);
  T* kbuf = sc.take(KT * D, off);
  T* vbuf = sc.take(KT * D, off);
  T* ktbuf = sc.take(KT * D, off);
  T* Di = sc.take(R, off);
  T* lse = sc.take(R, off);
  T* tmp = sc.take(D, off);
  load_grad_rows<E>(p, b, g, q0, nq, Q, dO, Di, lse, tmp);
  std::fill(dQ, dQ + R * D, T(0));
  const int64_t kend = gqa_key_end(p, len, q1 - 1);
  const E* kb = static_cast<const E*>(p.k) + b * p.k_s[0] + g * p.k_s[1];
  const E* vb = static_cast<const E*>(p.v) + b * p.v_s[0] + g * p.v_s[1];
  for (int64_t j0 = 0; j0 < kend; j0 += KT) {
    const int64_t kt = std::min(KT, kend - j0);
    int64_t ldk, ldv = 0;
    const T* K = tile_rows(kb + j0 * p.k_s[2], p.k_s[2], kt, D, kbuf, ldk);  // rows: dQ += dS K needs them
    const T *Kt = nullptr, *Vt = nullptr, *Vtt = nullptr;
    if (R >= kGqaTransposeRows) {
      transpose_tile(kb + j0 * p.k_s[2], p.k_s[2], kt, D, ktbuf);
      transpose_tile(vb + j0 * p.v_s[2], p.v_s[2], kt, D, vbuf);
      Kt = ktbuf;
      Vtt = vbuf;
    } else {
      Vt = tile_rows(vb + j0 * p.v_s[2], p.v_s[2], kt, D, vbuf, ldv);
    }
    probs_and_grad(p, b, g, q0, nq, len, Q, dO, Di, lse, K, ldk, Kt, Vt, ldv, Vtt, j0, kt, S, dS);
    axpy(dS, R, kt, KT, K, ldk, D, dQ, D);  // dQ += dS K
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = (b * p.Hq + g * G + r / nq) * p.Sq + q0 + r % nq;
    from_acc(dQ + r * D, dq + row * D, D);
  }
}

// dQ, dK and dV of the whole group (KV head g of batch b) in one pass: every score is recomputed
// once (the two-pass grad_kv + grad_q recompute S and dO Vᵀ twice: 7 tile products against 5).
// dK and dV accumulate over the query blocks in this task's own buffers (len × D each).
template <typename E>
void grad_group(const GqaParams& p, int64_t b, int64_t g, E* dq, E* dk, E* dv) {
  using T = acc_t<E>;
  const int64_t G = p.G, D = p.D, KT = kGqaKeyTile;
  const int64_t len = gqa_kv_len(p, b);
  if (len <= 0) return;  // every row sees no key: the zero-initialised outputs stay
  const int64_t bq = gqa_block_queries(G), Rmax = G * std::min(bq, p.Sq);
  const int64_t nt = std::max(Rmax, KT) * KT;
  Scratch<T>& sc = scratch<T>(static_cast<size_t>(3 * Rmax * D + 2 * Rmax * KT + 2 * nt + 3 * KT * D + 2 * len * D +
                                                  3 * Rmax + D + 192));
  size_t off = 0;
  T* Q = sc.take(Rmax * D, off);
  T* dO = sc.take(Rmax * D, off);
  T* dQ = sc.take(Rmax * D, off);
  T* S = sc.take(Rmax * KT, off);
  T* dS = sc.take(Rmax * KT, off);
  T* St = sc.take(nt, off);
  T* dSt = sc.take(nt, off);
  T* kbuf = sc.take(KT * D, off);
  T* vbuf = sc.take(KT * D, off);
  T* ktbuf = sc.take(KT * D, off);
  T* dK = sc.take(len * D, off);
  T* dV = sc.take(len * D, off);
  T* Di = sc.take(Rmax, off);
  T* lse = sc.take(Rmax, off);
  T* tmp = sc.take(D, off);
  std::fill(dK, dK + len * D, T(0));
  std::fill(dV, dV + len * D, T(0));
  const E* kb = static_cast<const E*>(p.k) + b * p.k_s[0] + g * p.k_s[1];
  const E* vb = static_cast<const E*>(p.v) + b * p.v_s[0] + g * p.v_s[1];
  for (int64_t q0 = 0; q0 < p.Sq; q0 += bq) {
    const int64_t nq = std::min(bq, p.Sq - q0), R = G * nq, q1 = q0 + nq;
    load_grad_rows<E>(p, b, g, q0, nq, Q, dO, Di, lse, tmp);
    std::fill(dQ, dQ + R * D, T(0));
    const int64_t kend = gqa_key_end(p, len, q1 - 1);
    for (int64_t j0 = 0; j0 < kend; j0 += KT) {
      const int64_t kt = std::min(KT, kend - j0);
      int64_t ldk, ldv = 0;
      const T* K = tile_rows(kb + j0 * p.k_s[2], p.k_s[2], kt, D, kbuf, ldk);  // rows: dQ += dS K needs them
      const T *Kt = nullptr, *Vt = nullptr, *Vtt = nullptr;
      if (R >= kGqaTransposeRows) {
        transpose_tile(kb + j0 * p.k_s[2], p.k_s[2], kt, D, ktbuf);
        transpose_tile(vb + j0 * p.v_s[2], p.v_s[2], kt, D, vbuf);
        Kt = ktbuf;
        Vtt = vbuf;
      } else {
        Vt = tile_rows(vb + j0 * p.v_s[2], p.v_s[2], kt, D, vbuf, ldv);
      }
      probs_and_grad(p, b, g, q0, nq, len, Q, dO, Di, lse, K, ldk, Kt, Vt, ldv, Vtt, j0, kt, S, dS);
      axpy(dS, R, kt, KT, K, ldk, D, dQ, D);  // dQ += dS K
      int64_t ldt = KT;
      if (R <= KT) {
        transpose_tile(S, KT, R, kt, St);
        transpose_tile(dS, KT, R, kt, dSt);
      } else {
        ldt = R;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < kt; ++j) {
            St[j * R + r] = S[r * KT + j];
            dSt[j * R + r] = dS[r * KT + j];
          }
      }
      axpy(St, kt, R, ldt, dO, D, D, dV + j0 * D, D);  // dV += Pᵀ dO
      axpy(dSt, kt, R, ldt, Q, D, D, dK + j0 * D, D);  // dK += dSᵀ Q
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = (b * p.Hq + g * G + r / nq) * p.Sq + q0 + r % nq;
      from_acc(dQ + r * D, dq + row * D, D);
    }
  }
  const int64_t row0 = (b * p.Hkv + g) * p.Sk;
  for (int64_t j = 0; j < len; ++j) {
    from_acc(dK + j * D, dk + (row0 + j) * D, D);
    from_acc(dV + j * D, dv + (row0 + j) * D, D);
  }
}

template <typename E>
GqaVecFns<E> fns() {
  return {&forward<E>, &combine<E>, &grad_kv<E>, &grad_q<E>, &grad_group<E>};
}

}  // namespace

const GqaVecKernels& gqa_vec_kernels() {
  static const GqaVecKernels k{fns<float>(), fns<double>(), fns<c10::BFloat16>()};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
