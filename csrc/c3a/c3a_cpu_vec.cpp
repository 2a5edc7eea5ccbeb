// C³A's complex multiply-accumulate loops over at::vec (compiled once per instruction set; see
// common/cpu_vec.h). The operands are planar (re and im rows apart), so each loop is straight
// fused multiply-adds over Vectorized<T>, with a scalar tail.
#include "common/cpu_vec.h"

#include "c3a/c3a_cpu_vec.h"

namespace lrkernels::LRK_ISA_NS {
namespace {

// a += x · k:  re += xr kr − xi ki,  im += xr ki + xi kr.
template <typename T>
void cmac(T* ar, T* ai, const T* xr, const T* xi, const T* kr, const T* ki, int64_t n) {
  using V = Vectorized<T>;
  int64_t f = 0;
  for (; f + V::size() <= n; f += V::size()) {
    const V a = V::loadu(xr + f), b = V::loadu(xi + f), c = V::loadu(kr + f), d = V::loadu(ki + f);
    at::vec::fmadd(a, c, at::vec::fnmadd(b, d, V::loadu(ar + f))).store(ar + f);
    at::vec::fmadd(a, d, at::vec::fmadd(b, c, V::loadu(ai + f))).store(ai + f);
  }
  for (; f < n; ++f) {
    ar[f] += xr[f] * kr[f] - xi[f] * ki[f];
    ai[f] += xr[f] * ki[f] + xi[f] * kr[f];
  }
}

// a += conj(g) · x:  re += gr xr + gi xi,  im += gr xi − gi xr.
template <typename T>
void cmac_conj(T* ar, T* ai, const T* gr, const T* gi, const T* xr, const T* xi, int64_t n) {
  using V = Vectorized<T>;
  int64_t f = 0;
  for (; f + V::size() <= n; f += V::size()) {
    const V a = V::loadu(gr + f), b = V::loadu(gi + f), c = V::loadu(xr + f), d = V::loadu(xi + f);
    at::vec::fmadd(a, c, at::vec::fmadd(b, d, V::loadu(ar + f))).store(ar + f);
    at::vec::fmadd(a, d, at::vec::fnmadd(b, c, V::loadu(ai + f))).store(ai + f);
  }
  for (; f < n; ++f) {
    ar[f] += gr[f] * xr[f] + gi[f] * xi[f];
    ai[f] += gr[f] * xi[f] - gi[f] * xr[f];
  }
}

}  // namespace

const C3aVecKernels& c3a_vec_kernels() {
  static const C3aVecKernels k{&cmac<float>, &cmac<double>, &cmac_conj<float>, &cmac_conj<double>};
  return k;
}

}  // namespace lrkernels::LRK_ISA_NS
