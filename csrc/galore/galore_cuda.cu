// GaLore / Fira step ops on CUDA: the moment update and Fira's residual pass are the
// hand-written kernels of include/lrkernels/galore.cuh; the back-projection GEMM is cuBLAS
// through ATen's addmm_ with beta (fp32 accumulation for fp16/bf16), writing W once. No host
// synchronisation: every scalar is an argument, every size a shape.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/cuda_dispatch.h"
#include "galore/galore_checks.h"
#include "lrkernels/galore.cuh"

namespace lrkernels {

at::Tensor galore_adam_moments_cuda(const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& grad,
                                    double beta1, double beta2, double eps) {
  const char* op = "galore_adam_moments";
  check_moments_args(op, exp_avg, exp_avg_sq, grad, beta1, beta2, eps);
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (exp_avg.scalar_type() == at::kDouble) {
    // float64 moments (float64 weights): double arithmetic throughout, as on CPU
    const at::Tensor g = grad.to(at::kDouble).contiguous();
    at::Tensor update = at::empty(grad.sizes(), grad.options().dtype(at::kDouble));
    LRK_CUDA_CHECK_LAUNCH(op, "moments (float64)",
                          galore::launch_moments_f64(exp_avg.data_ptr<double>(), exp_avg_sq.data_ptr<double>(),
                                                     g.data_ptr<double>(), update.data_ptr<double>(), g.numel(),
                                                     beta1, beta2, eps, stream));
    return update;
  }
  // float32/bfloat16 moments take an fp16/bf16/fp32 gradient; a float64 one is rounded to
  // float32 first, as the CPU kernel does (R is low-rank: the copy is small)
  const at::Tensor g = (grad.scalar_type() == at::kDouble ? grad.to(at::kFloat) : grad).contiguous();
  at::Tensor update = at::empty(grad.sizes(), grad.options().dtype(at::kFloat));
  GaloreMomentsParams p;
  p.exp_avg = exp_avg.data_ptr();
  p.exp_avg_sq = exp_avg_sq.data_ptr();
  p.grad = g.data_ptr();
  p.update = update.data_ptr<float>();
  p.numel = g.numel();
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  LRK_DISPATCH_CUDA_FLOAT(g.scalar_type(), op, [&] {
    using grad_t = cuda_t;
    if (exp_avg.scalar_type() == at::kFloat) {
      LRK_CUDA_CHECK_LAUNCH(op, "moments", (galore::launch_moments<float, grad_t>(p, stream)));
    } else {
      LRK_CUDA_CHECK_LAUNCH(op, "moments", (galore::launch_moments<__nv_bfloat16, grad_t>(p, stream)));
    }
  });
  return update;
}

void galore_apply_update_cuda(const at::Tensor& weight, const at::Tensor& projector, const at::Tensor& update,
                              bool project_left, double alpha, double beta,
                              const std::optional<at::Tensor>& residual_grad,
                              const std::optional<at::Tensor>& residual_scale, double residual_alpha) {
  const char* op = "galore_apply_update";
  const GaloreUpdateShapes sh = check_update_args(op, weight, projector, update, project_left, alpha, beta,
                                                  residual_grad, residual_scale, residual_alpha);
  if (sh.rows == 0 || sh.cols == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  double gemm_beta = beta;
  if (sh.has_residual && weight.scalar_type() == at::kDouble) {
    const at::Tensor g = residual_grad->contiguous();
    const at::Tensor s = residual_scale->to(at::kDouble).contiguous();
    LRK_CUDA_CHECK_LAUNCH(op, "residual (float64)",
                          galore::launch_residual_f64(weight.data_ptr<double>(), g.data_ptr<double>(),
                                                      s.data_ptr<double>(), sh.rows, sh.cols, sh.residual_rows, beta,
                                                      residual_alpha, stream));
    gemm_beta = 1.0;
  } else if (sh.has_residual) {
    const at::Tensor g = residual_grad->contiguous();
    const at::Tensor s = residual_scale->to(at::kFloat).contiguous();
    GaloreResidualParams p;
    p.weight = weight.data_ptr();
    p.grad = g.data_ptr();
    p.scale = s.data_ptr<float>();
    p.rows = sh.rows;
    p.cols = sh.cols;
    p.row_scale = sh.residual_rows;
    p.beta = static_cast<float>(beta);
    p.gamma = static_cast<float>(residual_alpha);
    LRK_DISPATCH_CUDA_FLOAT(weight.scalar_type(), op, [&] {
      LRK_CUDA_CHECK_LAUNCH(op, "residual", galore::launch_residual<cuda_t>(p, stream));
    });
    gemm_beta = 1.0;
  }
  apply_back_projection(weight, projector, update, project_left, gemm_beta, alpha);
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("galore_adam_moments", &galore_adam_moments_cuda);
  m.impl("galore_apply_update", &galore_apply_update_cuda);
}

}  // namespace lrkernels
