// Argument validation for the Bone / MiSS ops (miss_linear, miss_bat_linear and their backward
// ops), shared by the CPU and CUDA kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace lrkernels {

// T tokens (all leading dims of x), in → out features, block size r. balance/mini: cols =
// miss_block.size(1) (out_features for balance, mini_r for mini). bat: n_out = out / r output
// blocks, n_in = in / r input blocks.
struct MissShapes {
  int64_t tokens, in_features, out_features, r, cols, n_out, n_in;
};

// The chunk sum and the adapter arithmetic run in float32 (float64 for float64 x).
inline at::ScalarType miss_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}


inline void check_miss_block_tensor(const char* op, const at::Tensor& block, const at::Tensor& x) {
  TORCH_CHECK_TYPE(block.defined(), "lrkernels.", op, ": miss_block is undefined");
  TORCH_CHECK_TYPE(block.is_floating_point(), "lrkernels.", op, ": miss_block must be a floating tensor, got ",
                   block.scalar_type());
  // an adapter tensor: x's dtype, or float32 on a float16/bfloat16 x (common/checks.h)
  check_adapter_param(block, x, op, "miss_block");
}

// balance: miss_block M (r, out_features), ΔW[o, c] = M[c mod r, o]; mini: M (r, mini_r) with
// mini_r dividing out_features, ΔW[o, c] = M[c mod r, o mod mini_r].
inline MissShapes check_miss_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& block) {
  check_miss_block_tensor(op, block, x);
  check_dim(block, 2, op, "miss_block", "(r, out_features) (balance) or (r, mini_r) (mini)");
  const int64_t in = x.size(-1), out = weight.size(0), r = block.size(0), cols = block.size(1);
  TORCH_CHECK_VALUE(r >= 1, "lrkernels.", op, ": miss_block must have shape (r, out_features) or (r, mini_r) with ",
                    "block size r >= 1, got ", shape_str(block.sizes()));
  TORCH_CHECK_VALUE(r <= in, "lrkernels.", op, ": the block size r = miss_block.size(0) = ", r,
                    " must be at most in_features = x.size(-1) = ", in);
  TORCH_CHECK_VALUE(cols == out || (cols >= 1 && out % cols == 0), "lrkernels.", op,
                    ": miss_block must have shape (r, out_features) = (", r, ", ", out,
                    ") (balance) or (r, mini_r) with mini_r dividing out_features = weight.size(0) = ", out,
                    " (mini), got ", shape_str(block.sizes()));
  return MissShapes{leading_tokens(x), in, out, r, cols, 0, 0};
}

// bat: miss_block M (out_features / r, r, r), r dividing both feature counts;
// ΔW_pq = W_pq M_p + M_p for the r×r block (p, q) of W.
inline MissShapes check_miss_bat_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& block) {
  check_miss_block_tensor(op, block, x);
  check_dim(block, 3, op, "miss_block", "(out_features / r, r, r)");
  const int64_t in = x.size(-1), out = weight.size(0), r = block.size(2);
  TORCH_CHECK_VALUE(r >= 1, "lrkernels.", op, ": miss_block must have shape (out_features / r, r, r) with block ",
                    "size r >= 1, got ", shape_str(block.sizes()));
  TORCH_CHECK_VALUE(r <= in, "lrkernels.", op, ": the block size r = miss_block.size(2) = ", r,
                    " must be at most in_features = x.size(-1) = ", in);
  TORCH_CHECK_VALUE(in % r == 0, "lrkernels.", op, ": the block size r = miss_block.size(2) = ", r,
                    " must divide in_features = x.size(-1) = ", in, " (bat splits W into r x r blocks)");
  TORCH_CHECK_VALUE(out % r == 0, "lrkernels.", op, ": the block size r = miss_block.size(2) = ", r,
                    " must divide out_features = weight.size(0) = ", out, " (bat splits W into r x r blocks)");
  check_shape(block, {out / r, r, r}, op, "miss_block", "(out_features / r, r, r)");
  return MissShapes{leading_tokens(x), in, out, r, r, out / r, in / r};
}

inline void check_miss_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                const MissShapes& sh) {
  TORCH_CHECK_TYPE(grad_out.defined(), "lrkernels.", op, ": grad_out is undefined");
  check_like(grad_out, x, op, "grad_out", "x");
  check_shape(grad_out, with_last_dim(x, sh.out_features), op, "grad_out", "(..., out_features)");
}

// The forward's chunk_sum output, passed back to the backward op.
inline void check_miss_chunk_sum(const char* op, const at::Tensor& chunk_sum, const at::Tensor& x,
                                 const MissShapes& sh) {
  TORCH_CHECK_TYPE(chunk_sum.defined(), "lrkernels.", op, ": chunk_sum is undefined");
  TORCH_CHECK_VALUE(chunk_sum.device() == x.device(), "lrkernels.", op, ": chunk_sum is on ", chunk_sum.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(chunk_sum.scalar_type() == miss_acc_dtype(x), "lrkernels.", op, ": chunk_sum must be ",
                   miss_acc_dtype(x), " (the forward's second output), got ", chunk_sum.scalar_type());
  check_shape(chunk_sum, with_last_dim(x, sh.r), op, "chunk_sum", "(..., r)");
}

}  // namespace lrkernels
