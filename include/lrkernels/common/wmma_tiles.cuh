// Tensor-core building blocks of the expand kernel of multi_lora_tc.cuh (which lora_linear
// runs too, as its one-adapter case). Instantiated only from kernel bodies compiled for sm_80+.
#pragma once

#include <mma.h>

#include <cstdint>

#include "lrkernels/common/math.cuh"

namespace lrkernels {

// v as hi + lo in T (the split mma_hi_lo_chunk multiplies): hi = T(v), lo = T(v − hi).
template <typename T>
__device__ __forceinline__ void split_hi_lo(float v, T& hi, T& lo) {
  hi = from_float<T>(v);
  lo = from_float<T>(v - to_float(hi));
}

// One rank chunk of an expand: acc[f] += (hi + lo)[warp's 16 rows, :] · bs[16 f .. 16 f + 16, :]ᵀ
// over the chunk's RC rank steps, skipping the steps at or past k_valid (they hold zeros).
// h enters as hi + lo, two fp16/bf16 terms (lo holds what hi rounded away), so the product
// keeps about 16 mantissa bits of the fp32 h; bs rows are read column-major. All tiles have
// leading dimension LD (a multiple of 8 elements: the WMMA rule).
template <typename T, int RC, int NF, int LD>
__device__ __forceinline__ void mma_hi_lo_chunk(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[NF], T (*hs_hi)[LD],
    T (*hs_lo)[LD], T (*bs)[LD], int warp, int64_t k_valid) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < RC; kk += 16) {
    if (kk >= k_valid) break;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_hi, a_lo;
    wmma::load_matrix_sync(a_hi, &hs_hi[warp * 16][kk], LD);
    wmma::load_matrix_sync(a_lo, &hs_lo[warp * 16][kk], LD);
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
      wmma::load_matrix_sync(bf, &bs[f * 16][kk], LD);
      wmma::mma_sync(acc[f], a_hi, bf, acc[f]);
      wmma::mma_sync(acc[f], a_lo, bf, acc[f]);
    }
  }
}

}  // namespace lrkernels
