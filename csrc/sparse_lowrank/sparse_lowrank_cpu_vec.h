// The vectorised inner loops of the sparse part of sparse_lowrank_linear on CPU
// (sparse_lowrank_cpu_vec.cpp, one copy per instruction set). They work on a tile of tokens
// held transposed, feature-major: row f of a tile is feature f for the tile's w tokens
// (w a multiple of 16, padding tokens zero), so every support entry is one contiguous
// multiply-add over w tokens instead of a gather per token.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels {

template <typename T>
struct SparseLowRankVecFns {
  // SpMM over compressed rows r ∈ [r0, r1): dstT[r, :] = init[r] + Σ_{p ∈ [ptr[r], ptr[r+1])} val[p] · srcT[idx[p], :]
  // (init null: 0). With CSR (ptr = row_ptr, idx = csr_col) this is (x Sᵀ + b)ᵀ; with CSC it is (dy S)ᵀ.
  void (*spmm_rows)(const int32_t* ptr, const int32_t* idx, const T* val, const T* init, const T* srcT, T* dstT,
                    int64_t r0, int64_t r1, int64_t w);
  // SDDMM over CSR rows r ∈ [r0, r1): out[p] += ⟨aT[r, :], bT[idx[p], :]⟩ (dyᵀx sampled on the support).
  void (*sddmm_rows)(const int32_t* ptr, const int32_t* idx, const T* aT, const T* bT, T* out, int64_t r0, int64_t r1,
                     int64_t w);
  // dstT[c, j] = src[j·ld + c] for j < rows, 0 for rows ≤ j < w; c < cols.
  void (*load_transposed)(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dstT, int64_t w);
  // dst[j·ld + c] = srcT[c, j] for j < rows, c < cols: stored, so the tile is its output's first
  // writer (no zero fill before it; what comes after adds onto it).
  void (*put_transposed)(const T* srcT, int64_t w, int64_t rows, int64_t cols, T* dst, int64_t ld);
  // out[f] += Σ_j srcT[f, j] for f < features (a transposed tile's token sums: the bias gradient
  // from dy's tile while it is in cache).
  void (*row_sums)(const T* srcT, int64_t features, int64_t w, T* out);
};

struct SparseLowRankVecKernels {
  SparseLowRankVecFns<float> f32;
  SparseLowRankVecFns<double> f64;
};

LRK_DECLARE_VEC_KERNELS(SparseLowRankVecKernels, sparse_lowrank_vec_kernels)

template <typename T>
inline const SparseLowRankVecFns<T>& sparse_lowrank_vec_fns() {
  if constexpr (sizeof(T) == 4) return sparse_lowrank_vec_kernels().f32;
  else return sparse_lowrank_vec_kernels().f64;
}

}  // namespace lrkernels
