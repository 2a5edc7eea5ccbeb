// GaLore / Fira step ops on CPU. The moment update is one parallel elementwise pass; the
// back-projection, scaling, update and weight decay are one BLAS GEMM with beta (addmm_ into
// W), so W is written once and no full-size temporary exists besides the gradient. Fira's
// scaled residual is one more elementwise pass over W and G before the GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "galore/galore_checks.h"

namespace lrkernels {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename moment_t, typename acc_t>
void moments_loop(const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& grad,
                  at::Tensor& update, acc_t b1, acc_t b2, acc_t eps) {
  moment_t* m = exp_avg.data_ptr<moment_t>();
  moment_t* v = exp_avg_sq.data_ptr<moment_t>();
  const acc_t* g = grad.data_ptr<acc_t>();
  acc_t* out = update.data_ptr<acc_t>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gi = g[i];
      // Round through the storage type first, so N is what the next step will read back.
      const moment_t mi = static_cast<moment_t>(b1 * static_cast<acc_t>(m[i]) + (acc_t(1) - b1) * gi);
      const moment_t vi = static_cast<moment_t>(b2 * static_cast<acc_t>(v[i]) + (acc_t(1) - b2) * gi * gi);
      m[i] = mi;
      v[i] = vi;
      out[i] = static_cast<acc_t>(mi) / (std::sqrt(static_cast<acc_t>(vi)) + eps);
    }
  });
}

// W ← β·W + γ·(G ⊙ s), s broadcast along rows or columns.
template <typename scalar_t, typename acc_t>
void residual_loop(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& scale, bool rows_scale,
                   acc_t beta, acc_t gamma) {
  scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const acc_t* s = scale.data_ptr<acc_t>();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* wr = w + r * cols;
      const scalar_t* gr = g + r * cols;
      if (rows_scale) {
        const acc_t c = gamma * s[r];
        for (int64_t j = 0; j < cols; ++j)
          wr[j] = static_cast<scalar_t>(beta * static_cast<acc_t>(wr[j]) + c * static_cast<acc_t>(gr[j]));
      } else {
        for (int64_t j = 0; j < cols; ++j)
          wr[j] = static_cast<scalar_t>(beta * static_cast<acc_t>(wr[j]) + gamma * s[j] * static_cast<acc_t>(gr[j]));
      }
    }
  });
}

}  // namespace

at::Tensor galore_adam_moments_cpu(const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& grad, double beta1,
                                   double beta2, double eps) {
  const char* op = "galore_adam_moments";
  check_moments_args(op, exp_avg, exp_avg_sq, grad, beta1, beta2, eps);
  const at::ScalarType acc = galore_update_dtype(exp_avg);
  // R is low-rank (r × n): converting it to the accumulation dtype is cheap.
  const at::Tensor g = grad.to(acc).contiguous();
  at::Tensor update = at::empty(grad.sizes(), grad.options().dtype(acc));
  if (grad.numel() == 0) return update;
  switch (exp_avg.scalar_type()) {
    case at::kDouble:
      moments_loop<double, double>(exp_avg, exp_avg_sq, g, update, beta1, beta2, eps);
      break;
    case at::kFloat:
      moments_loop<float, float>(exp_avg, exp_avg_sq, g, update, static_cast<float>(beta1),
                                 static_cast<float>(beta2), static_cast<float>(eps));
      break;
    default:  // bfloat16 (check_moments_args admits nothing else)
      moments_loop<at::BFloat16, float>(exp_avg, exp_avg_sq, g, update, static_cast<float>(beta1),
                                        static_cast<float>(beta2), static_cast<float>(eps));
  }
  return update;
}

void galore_apply_update_cpu(const at::Tensor& weight, const at::Tensor& projector, const at::Tensor& update,
                             bool project_left, double alpha, double beta,
                             const std::optional<at::Tensor>& residual_grad,
                             const std::optional<at::Tensor>& residual_scale, double residual_alpha) {
  const char* op = "galore_apply_update";
  const GaloreUpdateShapes sh = check_update_args(op, weight, projector, update, project_left, alpha, beta,
                                                  residual_grad, residual_scale, residual_alpha);
  if (sh.rows == 0 || sh.cols == 0) return;
  double gemm_beta = beta;
  if (sh.has_residual) {
    const at::Tensor g = residual_grad->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "galore_residual_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const at::Tensor s = residual_scale->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      residual_loop<scalar_t, acc_t>(weight, g, s, sh.residual_rows, static_cast<acc_t>(beta),
                                     static_cast<acc_t>(residual_alpha));
    });
    gemm_beta = 1.0;
  }
  apply_back_projection(weight, projector, update, project_left, gemm_beta, alpha);
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("galore_adam_moments", &galore_adam_moments_cpu);
  m.impl("galore_apply_update", &galore_apply_update_cpu);
}

}  // namespace lrkernels
