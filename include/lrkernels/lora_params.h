// Plain parameter structs between the torch binding (csrc/lora) and the LoRA kernels
// (lora.cuh). No torch types: pointers, sizes and scalars only. All matrices are row-major
// and contiguous; element types are the kernel's template parameter.
//
// Notation (the lora_linear op): x (T, in), A = lora_a (r, in), B = lora_b (out, r),
// g = rank_scale (r,) or null, o = out_scale (out,) or null, s = scale,
//   u = drop(x) Aᵀ            (T, r)   fp32, "hidden", saved for backward
//   h = s · g ⊙ u             (T, r)
//   y = x Wᵀ + b + (h Bᵀ) ⊙ o (T, out)
#pragma once

#include <cstdint>

#include "lrkernels/common/philox.h"

namespace lrkernels {

// u = drop(x) Aᵀ, written to hidden (fp32).
struct LoraShrinkParams {
  const void* x = nullptr;       // (T, in)
  const void* a = nullptr;       // (r, in)
  float* hidden = nullptr;       // (T, r)
  int64_t tokens = 0, in_features = 0, rank = 0;
  DropoutParams dropout;
  // Tensor-core shrink only (lora_tc.cuh): K columns per block, a multiple of 64; 0 = all.
  // When this splits K, hidden must be zero-filled: the partial sums meet there by atomics.
  int64_t k_split = 0;
};

// y += ((s · g ⊙ u) Bᵀ) ⊙ o, in place on the base output.
struct LoraExpandParams {
  const float* hidden = nullptr;    // (T, r)
  const void* b = nullptr;          // (out, r)
  const void* rank_scale = nullptr; // (r,) or null
  const void* out_scale = nullptr;  // (out,) or null
  void* y = nullptr;                // (T, out)
  int64_t tokens = 0, out_features = 0, rank = 0;
  float scale = 1.0f;
};

// One pass over dy for both low-rank products that need it:
//   grad_hidden += dy (o ⊙ B)      (T, r)    = ∂L/∂h
//   grad_b_raw  += dyᵀ h           (out, r)  so ∂L/∂B = o ⊙ grad_b_raw, ∂L/∂o = Σ_j B ⊙ grad_b_raw
// Both outputs are fp32, zero-initialised by the caller, accumulated with atomics.
struct LoraGradOutParams {
  const void* grad_out = nullptr;   // (T, out)
  const float* hidden = nullptr;    // (T, r)
  const void* b = nullptr;          // (out, r)
  const void* rank_scale = nullptr; // (r,) or null
  const void* out_scale = nullptr;  // (out,) or null
  float* grad_hidden = nullptr;     // (T, r)
  float* grad_b_raw = nullptr;      // (out, r)
  int64_t tokens = 0, out_features = 0, rank = 0;
  float scale = 1.0f;
};

// One pass over x (dropout mask regenerated from the seed) for both products that need it:
//   grad_x += drop'(du A)          (T, in)   in place on dy W (null: skipped)
//   grad_a += duᵀ drop(x)          (r, in)   fp32, zero-initialised, atomics (null: skipped)
// with du = s · g ⊙ ∂L/∂h (T, r) fp32, prepared by the caller.
struct LoraGradInParams {
  const void* x = nullptr;          // (T, in)
  const void* a = nullptr;          // (r, in)
  const float* grad_u = nullptr;    // (T, r)
  void* grad_x = nullptr;           // (T, in) or null
  float* grad_a = nullptr;          // (r, in) or null
  int64_t tokens = 0, in_features = 0, rank = 0;
  DropoutParams dropout;
};

}  // namespace lrkernels
