// CPU side of the fused dropout: walks a (rows, cols) input in 8-column groups and hands
// each group's keep bits (one Philox call, identical to the CUDA kernels' draw) to `f`.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "lrkernels/common/philox.h"

namespace lrkernels {

template <typename F>
void for_each_dropout_group(int64_t rows, int64_t cols, const DropoutParams& d, F&& f) {
  const uint64_t seed = static_cast<uint64_t>(*d.seed);
  const int64_t groups = (cols + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) f(r, g, dropout_keep_bits(seed, r, g, d.threshold));
    }
  });
}

}  // namespace lrkernels
