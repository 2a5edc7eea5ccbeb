// Argument validation for galore_adam_moments / galore_apply_update, shared by the CPU and
// CUDA kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace lrkernels {

// Moment dtypes: float32 (default), bfloat16 (memory-saving option), float64 (float64 weights).
inline void check_moment_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kDouble;
  TORCH_CHECK_TYPE(ok, "lrkernels.", op, ": ", name, " must be float32, bfloat16 or float64, got ", t.scalar_type());
}

// GaLore's floating dtypes: those of every op (check_float_input) plus float64 on CUDA too.
// float64 weights keep float64 moments and a float64 update on both devices: the CUDA
// binding runs double kernels for them (galore.cuh), as the CPU kernel runs double loops.
inline void check_galore_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "lrkernels.", op, ": ", name, " is undefined");
  if (t.scalar_type() == at::kDouble) return;
  TORCH_CHECK_TYPE(dtype_supported(t), "lrkernels.", op, ": ", name, " must be ",
                   t.is_cuda() ? "float32, float64, float16 or bfloat16" : "float32, float64 or bfloat16", " on ",
                   t.device().type(), ", got ", t.scalar_type());
}

inline void check_finite_scalar(double v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "lrkernels.", op, ": ", name, " must be finite, got ", v);
}

// Dtype of the normalised update N returned by galore_adam_moments.
inline at::ScalarType galore_update_dtype(const at::Tensor& exp_avg) {
  return exp_avg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_moments_args(const char* op, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& grad, double beta1, double beta2, double eps) {
  TORCH_CHECK_TYPE(exp_avg.defined() && exp_avg_sq.defined() && grad.defined(), "lrkernels.", op,
                   ": exp_avg, exp_avg_sq and grad must all be defined");
  check_moment_dtype(exp_avg, op, "exp_avg");
  TORCH_CHECK_TYPE(exp_avg_sq.scalar_type() == exp_avg.scalar_type(), "lrkernels.", op,
                   ": exp_avg_sq has dtype ", exp_avg_sq.scalar_type(), " but exp_avg has dtype ",
                   exp_avg.scalar_type(), "; both moments must share one dtype");
  check_galore_float(grad, op, "grad");
  TORCH_CHECK_VALUE(exp_avg.device() == grad.device() && exp_avg_sq.device() == grad.device(), "lrkernels.",
                    op, ": exp_avg (", exp_avg.device(), "), exp_avg_sq (", exp_avg_sq.device(), ") and grad (",
                    grad.device(), ") must be on one device");
  check_shape(exp_avg, grad.sizes(), op, "exp_avg", "grad.shape");
  check_shape(exp_avg_sq, grad.sizes(), op, "exp_avg_sq", "grad.shape");
  TORCH_CHECK_VALUE(exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(), "lrkernels.", op,
                    ": exp_avg and exp_avg_sq are updated in place and must be contiguous");
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "lrkernels.", op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "lrkernels.", op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "lrkernels.", op, ": eps must be finite and >= 0, got ", eps);
}

struct GaloreUpdateShapes {
  int64_t rows, cols, rank;
  bool has_residual, residual_rows;  // residual_rows: residual_scale has one entry per row
};

inline GaloreUpdateShapes check_update_args(const char* op, const at::Tensor& weight, const at::Tensor& projector,
                                            const at::Tensor& update, bool project_left, double alpha, double beta,
                                            const std::optional<at::Tensor>& residual_grad,
                                            const std::optional<at::Tensor>& residual_scale,
                                            double residual_alpha) {
  check_galore_float(weight, op, "weight");
  check_dim(weight, 2, op, "weight", "(m, n)");
  const int64_t m = weight.size(0), n = weight.size(1);
  check_dim(projector, 2, op, "projector", project_left ? "(m, r)" : "(r, n)");
  check_like(projector, weight, op, "projector", "weight");
  const int64_t r = project_left ? projector.size(1) : projector.size(0);
  TORCH_CHECK_VALUE(r >= 1, "lrkernels.", op, ": projector must have rank r >= 1, got shape ",
                    shape_str(projector.sizes()));
  if (project_left) {
    check_shape(projector, {m, r}, op, "projector", "(m, r) for a left projection");
  } else {
    check_shape(projector, {r, n}, op, "projector", "(r, n) for a right projection");
  }
  check_galore_float(update, op, "update");
  TORCH_CHECK_VALUE(update.device() == weight.device(), "lrkernels.", op, ": update is on ", update.device(),
                    " but weight is on ", weight.device());
  if (project_left) {
    check_shape(update, {r, n}, op, "update", "(r, n) for a left projection");
  } else {
    check_shape(update, {m, r}, op, "update", "(m, r) for a right projection");
  }
  check_finite_scalar(alpha, op, "alpha");
  check_finite_scalar(beta, op, "beta");
  check_finite_scalar(residual_alpha, op, "residual_alpha");
  const bool has_g = residual_grad.has_value() && residual_grad->defined();
  const bool has_s = residual_scale.has_value() && residual_scale->defined();
  TORCH_CHECK_VALUE(has_g == has_s, "lrkernels.", op,
                    ": residual_grad and residual_scale must be given together (Fira's scaled residual)");
  bool rows_scale = false;
  if (has_g) {
    check_like(*residual_grad, weight, op, "residual_grad", "weight");
    check_shape(*residual_grad, weight.sizes(), op, "residual_grad", "weight.shape");
    const at::Tensor& s = *residual_scale;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "lrkernels.", op,
                     ": residual_scale must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == weight.device(), "lrkernels.", op, ": residual_scale is on ", s.device(),
                      " but weight is on ", weight.device());
    TORCH_CHECK_VALUE(s.dim() == 2 && ((s.size(0) == m && s.size(1) == 1) || (s.size(0) == 1 && s.size(1) == n)),
                      "lrkernels.", op, ": residual_scale must have shape (m, 1) = (", m, ", 1) to scale rows or (1, n) = (1, ",
                      n, ") to scale columns, got ", shape_str(s.sizes()));
    rows_scale = s.size(0) == m && s.size(1) == 1;
    TORCH_CHECK_VALUE(weight.is_contiguous(), "lrkernels.", op,
                      ": weight must be contiguous when a residual is applied (it is updated in place)");
  }
  return GaloreUpdateShapes{m, n, r, has_g, rows_scale};
}

// W ← gemm_beta·W + alpha·back(N): the back-projection folded into one GEMM with beta, so W
// is written once (cuBLAS on CUDA, BLAS on CPU through ATen).
inline void apply_back_projection(const at::Tensor& weight, const at::Tensor& projector, const at::Tensor& update,
                                  bool project_left, double gemm_beta, double alpha) {
  const at::Tensor n_w = update.to(weight.scalar_type());
  if (project_left) {
    weight.addmm_(projector, n_w, gemm_beta, alpha);
  } else {
    weight.addmm_(n_w, projector, gemm_beta, alpha);
  }
}

}  // namespace lrkernels
