// CPU side of the fused dropout. The keep bits of a whole row are drawn in batches of 16
// Philox calls that the compiler vectorises (AVX-512/AVX2 clones chosen at load time), and
// are bit-identical to the CUDA kernels' draw (include/lrkernels/common/philox.h).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "lrkernels/common/philox.h"

namespace lrkernels {

// bits[g] = keep bits of columns [8g, 8g + 8) of `row`, for g in [0, groups).
void dropout_row_keep_bits(uint64_t seed, int64_t row, int64_t groups, uint32_t threshold, uint32_t* bits);

// Calls f(row, bits) for every row, rows split across threads; bits as above.
template <typename F>
void for_each_dropout_row(int64_t rows, int64_t cols, const DropoutParams& d, F&& f) {
  const uint64_t seed = static_cast<uint64_t>(*d.seed);
  const int64_t groups = (cols + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> bits(static_cast<size_t>(groups));
    for (int64_t r = r0; r < r1; ++r) {
      dropout_row_keep_bits(seed, r, groups, d.threshold, bits.data());
      f(r, bits.data());
    }
  });
}

}  // namespace lrkernels
