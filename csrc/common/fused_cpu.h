// When the ops take their blocked CPU kernels (the at::vec register-tiled kernels, e.g.
// lora/lora_cpu_vec.h), and how they split rows into blocks for them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/cpu_features.h"

namespace lrkernels {

// Whether an op on `rows` rows of float32 activations (and bfloat16 ones when `bfloat16`) takes
// its blocked kernels: "blocked" forces them at every size and instruction set; "auto" takes them
// with a vectorised instruction set (AVX2 or better: the DEFAULT copy is for checking, not speed)
// and at least `min_rows_per_thread` rows per thread. Forward passes use 128 (smaller per-block
// base GEMMs lose to one multi-threaded GEMM); backward passes pay off from about 32.
inline bool use_fused_cpu(const at::Tensor& x, int64_t rows, int64_t min_rows_per_thread = 128,
                          bool bfloat16 = false) {
  const bool dtype_ok = x.scalar_type() == at::kFloat || (bfloat16 && x.scalar_type() == at::kBFloat16);
  if (!dtype_ok) return false;
  switch (cpu_kernels()) {
    case CpuKernels::kAten: return false;
    case CpuKernels::kBlocked: return true;
    default:
      return cpu_capability() != CpuCapability::kDefault && rows >= min_rows_per_thread * at::get_num_threads();
  }
}

// Rows per block: an even share per thread, in multiples of 8, between 8 and 256.
inline int64_t fused_row_block(int64_t rows) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (std::max<int64_t>(rows, 1) + threads - 1) / threads;
  return std::clamp<int64_t>((per_thread + 7) / 8 * 8, 8, 256);
}

}  // namespace lrkernels
