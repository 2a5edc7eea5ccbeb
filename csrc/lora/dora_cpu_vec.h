// Row kernels of dropout_complement_linear (dora_cpu.cpp): the part of x Wᵀ that a dropout
// mask removes, (x ⊙ dropped) Wᵀ, computed from the dropped entries only (a fraction p of x)
// against Wᵀ held (in, out) row-major, so each dropped entry is one contiguous row of Wᵀ.
// Written once over at::vec (dora_cpu_vec.cpp, compiled once per instruction set: see
// common/cpu_vec.h) and picked at run time for the capability in force.
//
// `bits` are a row's dropout keep bits as dropout_row_keep_bits draws them (word g holds
// columns [8g, 8g + 8), bit e set = column 8g + e kept); a column is dropped when its bit is 0.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels {

template <typename T>
struct DroppedVecOps {
  // y[0:n] = Σ over the dropped columns i < cols of x[i] · wt[i, 0:n]  (y overwritten; wt
  // (cols, n) row-major).
  void (*row_forward)(const T* x, int64_t cols, const uint32_t* bits, const T* wt, int64_t n, T* y);
  // gx[i] = Σ_o dz[o] · wt[i, o] for the dropped columns i < cols, 0 for the kept ones.
  void (*row_backward)(const T* dz, int64_t n, const uint32_t* bits, const T* wt, int64_t cols, T* gx);
};

struct DroppedVecKernels {
  DroppedVecOps<float> f32;
  DroppedVecOps<double> f64;
};

LRK_DECLARE_VEC_KERNELS(DroppedVecKernels, dropped_vec_kernels)

template <typename T>
inline const DroppedVecOps<T>& dropped_vec_ops() {
  if constexpr (std::is_same_v<T, float>)
    return dropped_vec_kernels().f32;
  else
    return dropped_vec_kernels().f64;
}

}  // namespace lrkernels
