// Bone / MiSS inner loops over at::vec (compiled once per instruction set; see common/cpu_vec.h).
// Every loop runs along a row in steps of Vectorized<T>::size() with a scalar tail; a chunk of
// r values never needs to line up with the vector width.
#include "common/cpu_vec.h"

#include "miss/miss_cpu_vec.h"

#include <algorithm>

namespace lrkernels::LRK_ISA_NS {
namespace {

// s[0, n) += x[0, n) (· mask[0, n)).
template <typename T>
inline void accumulate(const T* x, const T* mask, int64_t n, T* s) {
  using V = Vectorized<T>;
  int64_t k = 0;
  if (mask) {
    for (; k + V::size() <= n; k += V::size())
      at::vec::fmadd(V::loadu(x + k), V::loadu(mask + k), V::loadu(s + k)).store(s + k);
    for (; k < n; ++k) s[k] += x[k] * mask[k];
  } else {
    for (; k + V::size() <= n; k += V::size()) (V::loadu(s + k) + V::loadu(x + k)).store(s + k);
    for (; k < n; ++k) s[k] += x[k];
  }
}

template <typename T>
void chunk_sum(const T* x, const T* mask, int64_t in, int64_t r, T* s) {
  if (r == 1) {  // one chunk per element: a plain (masked) sum of the row
    T acc = 0;
    for (int64_t c = 0; c < in; ++c) acc += mask ? x[c] * mask[c] : x[c];
    s[0] += acc;
    return;
  }
  for (int64_t c0 = 0; c0 < in; c0 += r) accumulate(x + c0, mask ? mask + c0 : nullptr, std::min(r, in - c0), s);
}

template <typename T>
void tile(const T* g, const T* mask, int64_t in, int64_t r, T* out) {
  using V = Vectorized<T>;
  for (int64_t c0 = 0; c0 < in; c0 += r) {
    const int64_t n = std::min(r, in - c0);
    T* o = out + c0;
    int64_t k = 0;
    if (mask) {
      const T* mk = mask + c0;
      for (; k + V::size() <= n; k += V::size()) (V::loadu(g + k) * V::loadu(mk + k)).store(o + k);
      for (; k < n; ++k) o[k] = g[k] * mk[k];
    } else {
      for (; k + V::size() <= n; k += V::size()) V::loadu(g + k).store(o + k);
      for (; k < n; ++k) o[k] = g[k];
    }
  }
}

template <typename T>
void row_plus_tile(const T* w, const T* m, int64_t c0, int64_t n, int64_t r, T* out) {
  using V = Vectorized<T>;
  int64_t i = 0;
  while (i < n) {
    const int64_t k0 = (c0 + i) % r, len = std::min(r - k0, n - i);
    const T* wc = w + i;
    const T* mk = m + k0;
    T* o = out + i;
    int64_t k = 0;
    for (; k + V::size() <= len; k += V::size()) (V::loadu(wc + k) + V::loadu(mk + k)).store(o + k);
    for (; k < len; ++k) o[k] = wc[k] + mk[k];
    i += len;
  }
}

// One r-wide output segment j0 .. j0 + U·V of a bat row block: U vector accumulators, the r
// terms of the small vector-matrix product w_q M_p streamed through them (M_p stays in L1).
template <typename T, int U>
inline void bat_segment(const T* wq, const T* mp, const T* mi, int64_t r, int64_t j0, T* o) {
  using V = Vectorized<T>;
  constexpr int64_t N = V::size();
  V a[U];
  for (int u = 0; u < U; ++u) a[u] = V::loadu(wq + j0 + u * N) + V::loadu(mi + j0 + u * N);
  for (int64_t k = 0; k < r; ++k) {
    const V b(wq[k]);
    const T* mrow = mp + k * r + j0;
    for (int u = 0; u < U; ++u) a[u] = at::vec::fmadd(b, V::loadu(mrow + u * N), a[u]);
  }
  for (int u = 0; u < U; ++u) a[u].store(o + j0 + u * N);
}

template <typename T>
void bat_row(const T* w, const T* mp, const T* mi, int64_t nq, int64_t r, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t N = V::size();
  for (int64_t q = 0; q < nq; ++q) {
    const T* wq = w + q * r;
    T* o = out + q * r;
    int64_t j = 0;
    for (; j + 4 * N <= r; j += 4 * N) bat_segment<T, 4>(wq, mp, mi, r, j, o);
    for (; j + N <= r; j += N) bat_segment<T, 1>(wq, mp, mi, r, j, o);
    for (; j < r; ++j) {
      T a = wq[j] + mi[j];
      for (int64_t k = 0; k < r; ++k) a += wq[k] * mp[k * r + j];
      o[j] = a;
    }
  }
}

}  // namespace

const MissVecKernels& miss_vec_kernels() {
  static const MissVecKernels k{&chunk_sum<float>,     &chunk_sum<double>,     &tile<float>,
                                &tile<double>,         &row_plus_tile<float>, &row_plus_tile<double>,
                                &bat_row<float>,       &bat_row<double>};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
