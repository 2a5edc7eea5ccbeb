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

// Inverted dropout, in place, on n rows gathered from a larger input: data row i is row
// row_ids[i] of that input and takes that row's mask, so a gathered row is dropped exactly as
// it is where it came from (multi-LoRA gathers each adapter's tokens). Serial: callers run it
// inside their own parallel tasks.
template <typename T>
void drop_gathered_rows(T* data, int64_t n, int64_t cols, const int64_t* row_ids, const DropoutParams& d) {
  if (d.threshold == 0 || n == 0 || cols == 0) return;
  const uint64_t seed = static_cast<uint64_t>(*d.seed);
  const int64_t groups = (cols + 7) / 8;
  const T ks = static_cast<T>(d.keep_scale);
  std::vector<uint32_t> bits(static_cast<size_t>(groups));
  for (int64_t i = 0; i < n; ++i) {
    dropout_row_keep_bits(seed, row_ids[i], groups, d.threshold, bits.data());
    T* row = data + i * cols;
    for (int64_t k = 0; k < cols; ++k) row[k] = ((bits[k >> 3] >> (k & 7)) & 1u) ? row[k] * ks : T(0);
  }
}

}  // namespace lrkernels
