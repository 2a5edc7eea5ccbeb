// The sparse part's SpMM, SDDMM and tile transposes over at::vec (compiled once per instruction
// set; see common/cpu_vec.h and sparse_lowrank_cpu_vec.h). Token tiles are feature-major, so
// each support entry is a broadcast multiply-add (SpMM) or a dot product (SDDMM) over
// contiguous tokens; four vectors are in flight per entry to hide the FMA latency.
#include "common/cpu_vec.h"

#include "sparse_lowrank/sparse_lowrank_cpu_vec.h"

namespace lrkernels::LRK_ISA_NS {
namespace {

template <typename T>
void spmm_rows(const int32_t* ptr, const int32_t* idx, const T* val, const T* init, const T* srcT, T* dstT, int64_t r0,
               int64_t r1, int64_t w) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p0 = ptr[r], p1 = ptr[r + 1];
    const T i0 = init ? init[r] : T(0);
    T* d = dstT + r * w;
    int64_t j = 0;
    for (; j + 4 * L <= w; j += 4 * L) {
      V a0(i0), a1(i0), a2(i0), a3(i0);
      for (int64_t p = p0; p < p1; ++p) {
        const V v(val[p]);
        const T* s = srcT + static_cast<int64_t>(idx[p]) * w + j;
        a0 = at::vec::fmadd(v, V::loadu(s), a0);
        a1 = at::vec::fmadd(v, V::loadu(s + L), a1);
        a2 = at::vec::fmadd(v, V::loadu(s + 2 * L), a2);
        a3 = at::vec::fmadd(v, V::loadu(s + 3 * L), a3);
      }
      a0.store(d + j);
      a1.store(d + j + L);
      a2.store(d + j + 2 * L);
      a3.store(d + j + 3 * L);
    }
    for (; j + L <= w; j += L) {
      V a(i0);
      for (int64_t p = p0; p < p1; ++p)
        a = at::vec::fmadd(V(val[p]), V::loadu(srcT + static_cast<int64_t>(idx[p]) * w + j), a);
      a.store(d + j);
    }
    for (; j < w; ++j) {
      T a = i0;
      for (int64_t p = p0; p < p1; ++p) a += val[p] * srcT[static_cast<int64_t>(idx[p]) * w + j];
      d[j] = a;
    }
  }
}

template <typename T>
void sddmm_rows(const int32_t* ptr, const int32_t* idx, const T* aT, const T* bT, T* out, int64_t r0, int64_t r1,
                int64_t w) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = aT + r * w;
    const int64_t p1 = ptr[r + 1];
    int64_t p = ptr[r];
    for (; p + 2 <= p1; p += 2)
      dot2(a, bT + static_cast<int64_t>(idx[p]) * w, bT + static_cast<int64_t>(idx[p + 1]) * w, w, out + p,
           out + p + 1);
    if (p < p1) out[p] += dot(a, bT + static_cast<int64_t>(idx[p]) * w, w);
  }
}

template <typename T>
void load_transposed(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dstT, int64_t w) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t cf = cols / L * L, rf = rows / L * L;
  V v[L];
  for (int64_t c0 = 0; c0 < cf; c0 += L) {
    for (int64_t j0 = 0; j0 < rf; j0 += L) {
      for (int64_t i = 0; i < L; ++i) v[i] = V::loadu(src + (j0 + i) * ld + c0);
      transpose_block<T>(v);
      for (int64_t k = 0; k < L; ++k) v[k].store(dstT + (c0 + k) * w + j0);
    }
    for (int64_t c = c0; c < c0 + L; ++c)
      for (int64_t j = rf; j < w; ++j) dstT[c * w + j] = j < rows ? src[j * ld + c] : T(0);
  }
  for (int64_t c = cf; c < cols; ++c)
    for (int64_t j = 0; j < w; ++j) dstT[c * w + j] = j < rows ? src[j * ld + c] : T(0);
}

template <typename T>
void put_transposed(const T* srcT, int64_t w, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t cf = cols / L * L, rf = rows / L * L;
  V v[L];
  for (int64_t j0 = 0; j0 < rf; j0 += L) {
    for (int64_t c0 = 0; c0 < cf; c0 += L) {
      for (int64_t i = 0; i < L; ++i) v[i] = V::loadu(srcT + (c0 + i) * w + j0);
      transpose_block<T>(v);
      for (int64_t k = 0; k < L; ++k) v[k].store(dst + (j0 + k) * ld + c0);
    }
    for (int64_t j = j0; j < j0 + L; ++j)
      for (int64_t c = cf; c < cols; ++c) dst[j * ld + c] = srcT[c * w + j];
  }
  for (int64_t j = rf; j < rows; ++j)
    for (int64_t c = 0; c < cols; ++c) dst[j * ld + c] = srcT[c * w + j];
}

template <typename T>
void row_sums(const T* srcT, int64_t features, int64_t w, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  for (int64_t f = 0; f < features; ++f) {
    const T* s = srcT + f * w;
    V a0(T(0)), a1(T(0));
    int64_t j = 0;
    for (; j + 2 * L <= w; j += 2 * L) {
      a0 = a0 + V::loadu(s + j);
      a1 = a1 + V::loadu(s + j + L);
    }
    for (; j + L <= w; j += L) a0 = a0 + V::loadu(s + j);
    T acc = at::vec::vec_reduce_all<T>([](const V& u, const V& v) { return u + v; }, a0 + a1);
    for (; j < w; ++j) acc += s[j];
    out[f] += acc;
  }
}

template <typename T>
SparseLowRankVecFns<T> fns() {
  return {&spmm_rows<T>, &sddmm_rows<T>, &load_transposed<T>, &put_transposed<T>, &row_sums<T>};
}

}  // namespace

const SparseLowRankVecKernels& sparse_lowrank_vec_kernels() {
  static const SparseLowRankVecKernels k{fns<float>(), fns<double>()};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
