// Argument validation for lora_linear / lora_linear_backward, shared by the CPU and CUDA
// kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace lrkernels {

struct LoraShapes {
  int64_t tokens, in_features, out_features, rank;
};

// Adapter tensors (lora_a, lora_b, rank_scale, out_scale) follow the shared mixed-precision rule
// (check_adapter_param: x's dtype, or float32 on a float16/bfloat16 x), on CPU and CUDA.
inline LoraShapes check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale,
                                  const std::optional<at::Tensor>& rank_scale,
                                  const std::optional<at::Tensor>& out_scale) {
  const LinearBaseShapes base = check_linear_base(op, x, weight, bias);
  const int64_t in = base.in_features, out = base.out_features;
  check_dim(lora_a, 2, op, "lora_a", "(r, in_features)");
  check_adapter_param(lora_a, x, op, "lora_a");
  const int64_t r = lora_a.size(0);
  TORCH_CHECK_VALUE(r >= 1, "lrkernels.", op, ": lora_a must have at least one row (rank r >= 1), got shape ",
                    shape_str(lora_a.sizes()));
  check_shape(lora_a, {r, in}, op, "lora_a", "(r, in_features)");
  check_dim(lora_b, 2, op, "lora_b", "(out_features, r)");
  check_adapter_param(lora_b, x, op, "lora_b");
  check_shape(lora_b, {out, r}, op, "lora_b", "(out_features, r)");
  if (rank_scale.has_value() && rank_scale->defined()) {
    check_adapter_param(*rank_scale, x, op, "rank_scale");
    check_shape(*rank_scale, {r}, op, "rank_scale", "(r,)");
  }
  if (out_scale.has_value() && out_scale->defined()) {
    check_adapter_param(*out_scale, x, op, "out_scale");
    check_shape(*out_scale, {out}, op, "out_scale", "(out_features,)");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "lrkernels.", op, ": scale must be finite, got ", scale);
  return LoraShapes{base.tokens, in, out, r};
}

// Dtype of the saved hidden activations and of the low-rank arithmetic.
inline at::ScalarType lora_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline LoraShapes check_lora_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& lora_a,
                                           const at::Tensor& lora_b, const at::Tensor& hidden, double scale,
                                           const std::optional<at::Tensor>& rank_scale,
                                           const std::optional<at::Tensor>& out_scale,
                                           const std::array<bool, 7>& mask) {
  const LoraShapes sh =
      check_lora_args(op, x, weight, std::nullopt, lora_a, lora_b, scale, rank_scale, out_scale);
  check_like(grad_out, x, op, "grad_out", "x");
  check_shape(grad_out, with_last_dim(x, sh.out_features), op, "grad_out", "(..., out_features)");
  TORCH_CHECK_VALUE(hidden.device() == x.device(), "lrkernels.", op, ": hidden is on ", hidden.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(hidden.scalar_type() == lora_acc_dtype(x), "lrkernels.", op, ": hidden must be ",
                   lora_acc_dtype(x), " (the forward's second output), got ", hidden.scalar_type());
  check_shape(hidden, with_last_dim(x, sh.rank), op, "hidden", "(..., r)");
  TORCH_CHECK_VALUE(!mask[5] || (rank_scale.has_value() && rank_scale->defined()), "lrkernels.", op,
                    ": output_mask asks for the gradient of rank_scale, which is None");
  TORCH_CHECK_VALUE(!mask[6] || (out_scale.has_value() && out_scale->defined()), "lrkernels.", op,
                    ": output_mask asks for the gradient of out_scale, which is None");
  return sh;
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

}  // namespace lrkernels
