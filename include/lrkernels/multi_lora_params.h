// Plain parameter structs between the torch binding (csrc/multi_lora) and the multi-LoRA
// kernels (multi_lora.cuh). No torch types: pointers, sizes and scalars only. Matrices are
// row-major and contiguous unless a leading dimension is given.
//
// Notation: T tokens, L adapters padded to rank r_max, adapter l has rank r_l ≤ r_max, S
// output slices. Token t uses adapter a_t; the grouping lists the tokens of each adapter
// contiguously (token_order, adapter_offsets), so a block of the grid takes a tile of tokens
// that all share one adapter and stages that adapter's A or B once for all of them.
//   hidden[s, t, :r]  = drop(x)_t A[s, a_t, :r]ᵀ                                   (fp32)
//   y[t, slice s]    += s_a · ((g_a ⊙ hidden[s, t, :r]) B[a_t, slice s, :r]ᵀ) ⊙ o_a[slice s]
// with s_a = scales[a_t], and the optional per-adapter gains g = rank_scale (L, r_max) and
// o = out_scale (L, out_total) (null: ones). drop(x)_t is row t of the Philox mask for the seed
// (common/dropout.cuh), t the token's global row, as in lora_linear. Dropout, gates and output
// scales are compile-time options of the kernels (template bools chosen from the null-ness of
// the pointers and the dropout threshold), so the plain path pays nothing for them.
#pragma once

#include <cstdint>

#include "lrkernels/common/philox.h"

namespace lrkernels {

constexpr int kMultiLoraSlicesMax = 8;

// The batch's grouping by adapter, from multi_lora_segments. Every index read from it is
// bounds-checked by the kernels (offsets clamped to [0, T], token ids outside [0, T) skipped),
// so malformed metadata cannot make a kernel read or write out of bounds.
// Null token_order and adapter_offsets is the identity grouping: adapter 0 owns every token,
// in order (lora_linear, the one-adapter case: one_adapter_segments in multi_lora_tiles.h).
// It needs no device memory, so lora_linear builds nothing and reads nothing for it.
struct MultiLoraSegmentsView {
  const int32_t* token_order = nullptr;      // (T,), or null: the identity grouping
  const int32_t* adapter_offsets = nullptr;  // (L + 1,), or null: the identity grouping
  const int32_t* ranks = nullptr;            // (L,) or null: every adapter has rank r_max
  int64_t tokens = 0, num_adapters = 0, r_max = 0;
};

// hidden[s, t, j] += Σ_{k in this block's K range} drop(x)[t, k] A[s, a_t, j, k]: hidden is fp32,
// zero-initialised by the caller, and accumulated with atomics when K is split over blocks
// (grid.y), which keeps the decode case (few tokens per adapter) bandwidth-bound.
struct MultiLoraShrinkParams {
  const void* x = nullptr;   // (T, in)
  const void* a = nullptr;   // (S, L, r_max, in)
  float* hidden = nullptr;   // (S, T, r_max)
  int64_t in_features = 0, slices = 1, k_split = 0;  // k_split: K columns per grid.y block, set by the launcher
  // false: K is not split, so each hidden element gets exactly one (atomic) add onto the
  // caller's zeros and the result is bitwise reproducible (torch's deterministic mode)
  bool allow_k_split = true;
  bool use_tensor_cores = false;  // fp16/bf16 on sm_80+: the WMMA kernel of multi_lora_tc.cuh
  DropoutParams dropout;          // threshold 0: none
  MultiLoraSegmentsView seg;
};

// y[t, n] += o[a_t, n] · scales[a_t] · Σ_j g[a_t, j] hidden[s(n), t, j] B[a_t, n, j], in place,
// for the columns n of each slice s: slice s covers columns [slice_start[s], slice_start[s + 1]).
struct MultiLoraExpandParams {
  const float* hidden = nullptr;  // (S, T, r_max)
  const void* b = nullptr;        // (L, out_total, r_max)
  const float* scales = nullptr;  // (L,), or null: every adapter has scale `scale`
  float scale = 1.0f;
  const void* rank_scale = nullptr;  // (L, r_max) in the adapters' type, or null
  const void* out_scale = nullptr;   // (L, out_total) in the adapters' type, or null
  void* y = nullptr;              // (T, out_total), row stride ldy
  int64_t ldy = 0, out_total = 0, slices = 1;
  int64_t slice_start[kMultiLoraSlicesMax + 1] = {};
  bool use_tensor_cores = false;  // fp16/bf16 on sm_80+: the WMMA kernel of multi_lora_tc.cuh
  MultiLoraSegmentsView seg;
};

// Backward, one pass over dy for both products that need it (per token, a = a_t):
//   grad_z[t, :r]  += dy_t (o_a ⊙ B[a, :, :r])                  (T, r_max)  = ∂L/∂(s·g⊙h)
//   grad_b[a, :, :r] += dy_tᵀ (s_a · g_a ⊙ hidden[t, :r])        (L, out, r_max) = P_a
// so ∂L/∂B_a = o_a ⊙ P_a and ∂L/∂o_a = Σ_j B_a ⊙ P_a (without out_scale, grad_b is ∂L/∂B).
// fp32 outputs, zero-initialised by the caller, accumulated with atomics; either may be null.
struct MultiLoraGradOutParams {
  const void* grad_out = nullptr;  // (T, out)
  const float* hidden = nullptr;   // (T, r_max)
  const void* b = nullptr;         // (L, out, r_max)
  const float* scales = nullptr;   // (L,), or null: every adapter has scale `scale`
  float scale = 1.0f;
  const void* rank_scale = nullptr;  // (L, r_max) in the adapters' type, or null
  const void* out_scale = nullptr;   // (L, out) in the adapters' type, or null
  float* grad_z = nullptr;         // (T, r_max) or null
  float* grad_b = nullptr;         // (L, out, r_max) or null
  int64_t out_features = 0;
  MultiLoraSegmentsView seg;
};

// Backward, one pass over x (the dropout mask regenerated from the seed), with
// du = ∂L/∂hidden = s·g ⊙ grad_z (T, r_max) fp32 prepared by the caller:
//   grad_x[t]        += drop'(du_t A[a, :r])          (T, in)  in place on dy W (null: skipped)
//   grad_a[a, :r]    += du_tᵀ drop(x)_t               (L, r_max, in) fp32, atomics (null: skipped)
struct MultiLoraGradInParams {
  const void* x = nullptr;       // (T, in)
  const void* a = nullptr;       // (L, r_max, in)
  const float* grad_u = nullptr; // (T, r_max)
  void* grad_x = nullptr;        // (T, in) or null
  float* grad_a = nullptr;       // (L, r_max, in) or null
  int64_t in_features = 0;
  DropoutParams dropout;         // threshold 0: none
  MultiLoraSegmentsView seg;
};

}  // namespace lrkernels
