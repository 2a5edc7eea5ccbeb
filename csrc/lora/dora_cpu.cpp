// dropout_complement_linear on CPU: (x ⊙ dropped) Wᵀ, the part of x Wᵀ that the dropout mask
// of (seed, p) removes, from the dropped entries only. DoRA with dropout needs x_d Wᵀ next to
// x Wᵀ (PEFT: y = x Wᵀ + (c − 1) ⊙ x_d Wᵀ + ...): with x_d Wᵀ = keep_scale · (x Wᵀ − this), a
// fraction p of a GEMM replaces the second GEMM in forward and in backward. Rows of tokens are
// spread over the threads, each drawing its rows' keep bits (the same Philox bits as every
// fused dropout); the row kernels are dora_cpu_vec.cpp's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"
#include "lora/dora_cpu_vec.h"

namespace lrkernels {
namespace {

void check_complement_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_linear_base(op, x, weight, std::nullopt);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "lrkernels.", op, ": x must be on the CPU (there is no CUDA kernel), got ",
                    x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "lrkernels.", op,
                   ": x must be float32 or float64, got ", x.scalar_type());
}

}  // namespace

at::Tensor dropout_complement_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& seed,
                                         double dropout_p) {
  const char* op = "dropout_complement_linear";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_complement_args(op, x, weight);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const int64_t in = x.size(-1), out = weight.size(0), rows = leading_tokens(x);
  at::Tensor y = at::empty(with_last_dim(x, out), x.options());
  if (d.threshold == 0 || rows == 0 || out == 0 || in == 0) return y.zero_();  // nothing dropped
  const at::Tensor x2 = x.reshape({rows, in}).contiguous();
  const at::Tensor wt = weight.t().contiguous();  // (in, out): a dropped entry's row of Wᵀ is contiguous
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_complement_linear", [&] {
    const auto& k = dropped_vec_ops<scalar_t>();
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_dropout_row(rows, in, d, [&](int64_t r, const uint32_t* bits) {
      k.row_forward(xp + r * in, in, bits, wp, out, yp + r * out);
    });
  });
  return y;
}

at::Tensor dropout_complement_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                  const at::Tensor& seed, double dropout_p) {
  const char* op = "dropout_complement_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // grad_out plays x's part in the checks: (..., out_features) against weight's first dim
  check_float_input(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, "lrkernels.", op, ": grad_out must have shape (..., out_features)");
  TORCH_CHECK_TYPE(weight.defined(), "lrkernels.", op, ": weight is undefined");
  check_dim(weight, 2, op, "weight", "(out_features, in_features)");
  check_like(weight, grad_out, op, "weight", "grad_out");
  TORCH_CHECK_VALUE(grad_out.device().is_cpu(), "lrkernels.", op, ": grad_out must be on the CPU, got ",
                    grad_out.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kDouble, "lrkernels.", op,
                   ": grad_out must be float32 or float64, got ", grad_out.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1), rows = leading_tokens(grad_out);
  check_shape(grad_out, with_last_dim(grad_out, out), op, "grad_out", "(..., out_features)");
  const DropoutParams d = make_dropout_params(dropout_p, seed, grad_out, op);
  at::Tensor gx = at::empty(with_last_dim(grad_out, in), grad_out.options());
  if (d.threshold == 0 || rows == 0 || out == 0 || in == 0) return gx.zero_();
  const at::Tensor dz = grad_out.reshape({rows, out}).contiguous();
  const at::Tensor wt = weight.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "dropout_complement_linear_backward", [&] {
    const auto& k = dropped_vec_ops<scalar_t>();
    const scalar_t* dp = dz.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    scalar_t* gp = gx.data_ptr<scalar_t>();
    for_each_dropout_row(rows, in, d, [&](int64_t r, const uint32_t* bits) {
      k.row_backward(dp + r * out, out, bits, wp, in, gp + r * in);
    });
  });
  return gx;
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("dropout_complement_linear", &dropout_complement_linear_cpu);
  m.impl("dropout_complement_linear_backward", &dropout_complement_linear_backward_cpu);
}

}  // namespace lrkernels
