// Plain parameter structs between the torch binding (csrc/galore) and the GaLore step kernels
// (galore.cuh). No torch types: pointers, sizes and scalars only. Tensors are contiguous.
//
// Notation: W (m, n) a weight, G its gradient, P the projector ((m, r) when the left side is
// projected, (r, n) when the right side is), R = project(G) the low-rank gradient, m/v Adam's
// moments of R, N = m / (√v + ε) the normalised low-rank update.
#pragma once

#include <cstdint>

namespace lrkernels {

// m ← β₁m + (1 − β₁)R,  v ← β₂v + (1 − β₂)R²,  N = m / (√v + ε), elementwise over R.
// Moments and N are fp32 (the moments may be bf16: fp32 arithmetic, rounded on store).
struct GaloreMomentsParams {
  void* exp_avg = nullptr;            // (numel,) moment dtype
  void* exp_avg_sq = nullptr;         // (numel,) moment dtype
  const void* grad = nullptr;         // (numel,) grad dtype
  float* update = nullptr;            // (numel,) fp32
  int64_t numel = 0;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-6f;
};

// W ← β·W + γ·(G ⊙ s), where s scales rows (s has m entries, row_scale) or columns (n
// entries): Fira's channel-wise scaled full-rank gradient. The low-rank part of the update is
// added afterwards by a GEMM (cuBLAS) with beta = 1.
struct GaloreResidualParams {
  void* weight = nullptr;             // (rows, cols) weight dtype
  const void* grad = nullptr;         // (rows, cols) weight dtype
  const float* scale = nullptr;       // (rows,) or (cols,) fp32
  int64_t rows = 0, cols = 0;
  bool row_scale = false;
  float beta = 1.0f, gamma = 0.0f;
};

}  // namespace lrkernels
