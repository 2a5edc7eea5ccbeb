// Device side of the dropout on x shared by the LoRA kernels (shrink, tensor-core shrink,
// grad_in): the seed read from device memory and the 8-column groups of a row loaded with the
// mask applied. The mask of element (t, k) is bit k % 8 of the Philox draw (seed, t, k / 8)
// (common/philox.h) for t the token's row in x reshaped to (T, in), so the kernels, the CPU
// path and the float64 reference draw the same mask whatever the grouping of the tokens.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lrkernels/common/math.cuh"
#include "lrkernels/common/philox.h"

namespace lrkernels {

// The seed lives in device memory (the op never reads it on the host: no sync), 0 without
// dropout.
__device__ __forceinline__ uint64_t load_dropout_seed(const DropoutParams& d) {
  return (d.threshold != 0 && d.seed != nullptr) ? static_cast<uint64_t>(*d.seed) : 0ull;
}

// Loads the 8 elements [col0, col0 + 8) of row `token` of x (row stride ld) in fp32, zeros
// past col_end or for token < 0, applies the mask when Is_dropout, and returns the keep bits
// (all ones without dropout). col0 must be a multiple of 8: the group is one Philox draw.
template <bool Is_dropout, typename T>
__device__ __forceinline__ uint32_t load_group8_dropped(const T* __restrict__ x, int64_t ld, int64_t token,
                                                        int64_t col0, int64_t col_end, const DropoutParams& d,
                                                        uint64_t seed, float v[8]) {
  uint32_t keep = 0xFFu;
  if (Is_dropout && token >= 0) keep = dropout_keep_bits(seed, token, col0 >> 3, d.threshold);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int64_t col = col0 + e;
    float val = (token >= 0 && col < col_end) ? to_float(x[token * ld + col]) : 0.f;
    if (Is_dropout) val = ((keep >> e) & 1u) ? val * d.keep_scale : 0.f;
    v[e] = val;
  }
  return keep;
}

}  // namespace lrkernels
