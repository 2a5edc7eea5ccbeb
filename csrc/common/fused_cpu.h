// When the ops take their AVX-512 CPU paths, and how they split rows into blocks for them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/avx512.h"
#include "common/cpu_features.h"

namespace lrkernels {

// Whether an op on `rows` rows of float32 activations takes its AVX-512 path: the CPU has AVX-512, the portable
// path is not forced, and either the fused path is forced or there are at least
// `min_rows_per_thread` rows per thread. Forward passes use 128 (smaller per-block base GEMMs
// lose to one multi-threaded GEMM); backward passes pay off from about 32 (measured on the
// 2-core development machine at 1024 -> 1024, r 16).
// `bfloat16` says whether the op's AVX-512 path also takes bfloat16 activations.
inline bool use_fused_cpu(const at::Tensor& x, int64_t rows, int64_t min_rows_per_thread = 128,
                          bool bfloat16 = false) {
#if LRK_HAVE_AVX512_SOURCES
  const bool dtype_ok = x.scalar_type() == at::kFloat || (bfloat16 && x.scalar_type() == at::kBFloat16);
  if (!dtype_ok || !use_avx512()) return false;
  return cpu_kernels() == CpuKernels::kBlocked || rows >= min_rows_per_thread * at::get_num_threads();
#else
  (void)x;
  (void)rows;
  (void)min_rows_per_thread;
  (void)bfloat16;
  return false;
#endif
}

// Rows per block: an even share per thread, in multiples of 8, between 8 and 256.
inline int64_t fused_row_block(int64_t rows) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (std::max<int64_t>(rows, 1) + threads - 1) / threads;
  return std::clamp<int64_t>((per_thread + 7) / 8 * 8, 8, 256);
}

}  // namespace lrkernels
