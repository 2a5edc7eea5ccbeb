// The row kernels of dropout_complement_linear over at::vec (see dora_cpu_vec.h), compiled once
// per instruction set. Forward: the output row stays in registers / L1 while the dropped
// entries' rows of Wᵀ stream past, four at a time (one load and store of y per four rows).
// Backward: one dot product (common/cpu_vec.h) per dropped entry.
#include "common/cpu_vec.h"

#include <type_traits>

#include "lora/dora_cpu_vec.h"

namespace lrkernels::LRK_ISA_NS {
namespace {

// Calls f(i) for every dropped column i < cols, in increasing order.
template <typename F>
inline void for_each_dropped(const uint32_t* bits, int64_t cols, F&& f) {
  const int64_t groups = (cols + 7) / 8;
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t drop = ~bits[g] & 0xFFu;
    while (drop) {
      const int e = __builtin_ctz(drop);
      drop &= drop - 1;
      const int64_t i = 8 * g + e;
      if (i < cols) f(i);
    }
  }
}

template <typename T>
void row_forward(const T* x, int64_t cols, const uint32_t* bits, const T* wt, int64_t n, T* y) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  for (int64_t o = 0; o < n; ++o) y[o] = T(0);
  int64_t idx[4];
  T a[4];
  int q = 0;
  auto flush = [&](int count) {
    int64_t o = 0;
    if (count == 4) {
      const V a0(a[0]), a1(a[1]), a2(a[2]), a3(a[3]);
      const T *w0 = wt + idx[0] * n, *w1 = wt + idx[1] * n, *w2 = wt + idx[2] * n, *w3 = wt + idx[3] * n;
      for (; o + VS <= n; o += VS) {
        V acc = V::loadu(y + o);
        acc = at::vec::fmadd(a0, V::loadu(w0 + o), acc);
        acc = at::vec::fmadd(a1, V::loadu(w1 + o), acc);
        acc = at::vec::fmadd(a2, V::loadu(w2 + o), acc);
        acc = at::vec::fmadd(a3, V::loadu(w3 + o), acc);
        acc.store(y + o);
      }
      for (; o < n; ++o) y[o] += a[0] * w0[o] + a[1] * w1[o] + a[2] * w2[o] + a[3] * w3[o];
      return;
    }
    for (int j = 0; j < count; ++j) {
      const V aj(a[j]);
      const T* w = wt + idx[j] * n;
      int64_t p = 0;
      for (; p + VS <= n; p += VS) at::vec::fmadd(aj, V::loadu(w + p), V::loadu(y + p)).store(y + p);
      for (; p < n; ++p) y[p] += a[j] * w[p];
    }
  };
  for_each_dropped(bits, cols, [&](int64_t i) {
    if (x[i] == T(0)) return;
    idx[q] = i;
    a[q] = x[i];
    if (++q == 4) {
      flush(4);
      q = 0;
    }
  });
  if (q) flush(q);
}

template <typename T>
void row_backward(const T* dz, int64_t n, const uint32_t* bits, const T* wt, int64_t cols, T* gx) {
  for (int64_t i = 0; i < cols; ++i) gx[i] = T(0);
  for_each_dropped(bits, cols, [&](int64_t i) { gx[i] = dot(dz, wt + i * n, n); });
}

template <typename T>
constexpr DroppedVecOps<T> ops() {
  return DroppedVecOps<T>{&row_forward<T>, &row_backward<T>};
}

}  // namespace

const DroppedVecKernels& dropped_vec_kernels() {
  static const DroppedVecKernels k{ops<float>(), ops<double>()};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
