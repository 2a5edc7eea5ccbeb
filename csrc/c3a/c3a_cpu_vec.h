// The vectorised inner loops of C³A on CPU (c3a_cpu_vec.cpp, one copy per instruction set):
// complex multiply-accumulates over planar spectra (re and im in separate rows).
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels {

struct C3aVecKernels {
  // a += x · k over n frequencies.
  void (*cmac_f32)(float* ar, float* ai, const float* xr, const float* xi, const float* kr, const float* ki,
                   int64_t n);
  void (*cmac_f64)(double* ar, double* ai, const double* xr, const double* xi, const double* kr, const double* ki,
                   int64_t n);
  // a += conj(g) · x over n frequencies.
  void (*cmac_conj_f32)(float* ar, float* ai, const float* gr, const float* gi, const float* xr, const float* xi,
                        int64_t n);
  void (*cmac_conj_f64)(double* ar, double* ai, const double* gr, const double* gi, const double* xr,
                        const double* xi, int64_t n);
};

LRK_DECLARE_VEC_KERNELS(C3aVecKernels, c3a_vec_kernels)

inline void cmac(float* ar, float* ai, const float* xr, const float* xi, const float* kr, const float* ki, int64_t n) {
  c3a_vec_kernels().cmac_f32(ar, ai, xr, xi, kr, ki, n);
}
inline void cmac(double* ar, double* ai, const double* xr, const double* xi, const double* kr, const double* ki,
                 int64_t n) {
  c3a_vec_kernels().cmac_f64(ar, ai, xr, xi, kr, ki, n);
}
inline void cmac_conj(float* ar, float* ai, const float* gr, const float* gi, const float* xr, const float* xi,
                      int64_t n) {
  c3a_vec_kernels().cmac_conj_f32(ar, ai, gr, gi, xr, xi, n);
}
inline void cmac_conj(double* ar, double* ai, const double* gr, const double* gi, const double* xr, const double* xi,
                      int64_t n) {
  c3a_vec_kernels().cmac_conj_f64(ar, ai, gr, gi, xr, xi, n);
}

}  // namespace lrkernels
