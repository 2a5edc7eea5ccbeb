// C³A on CUDA: real FFTs in cuFFT (plans cached, see lrkernels/c3a_fft.cuh), the
// frequency-domain block contraction and the kernel-gradient reduction in the hand-written
// kernels of lrkernels/c3a.cuh, the base GEMMs in cuBLAS (through ATen). Spectra are fp32
// for every input dtype. No host synchronisation; work areas come from the caching allocator.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>

#include "c3a/c3a_checks.h"
#include "common/cuda_dispatch.h"
#include "lrkernels/c3a.cuh"
#include "lrkernels/c3a_fft.cuh"

namespace lrkernels {
namespace {

void check_cufft(cufftResult r, const char* op, const char* what) {
  TORCH_CHECK(r == CUFFT_SUCCESS, "lrkernels.", op, ": cuFFT ", what, " failed: ", c3a::cufft_error_string(r));
}

// The cached cuFFT plan for `rows` transforms of length b, with a clear error where a new one
// would have to be made while the stream is being captured into a CUDA graph.
std::shared_ptr<c3a::FftPlan> fft_plan(const char* op, int64_t b, int64_t rows, c3a::FftDir dir,
                                       cudaStream_t stream) {
  std::shared_ptr<c3a::FftPlan> plan;
  c3a::PlanMiss miss = c3a::PlanMiss::kNone;
  const cufftResult r = c3a::get_fft_plan(b, rows, dir, stream, &plan, &miss);
  TORCH_CHECK(miss != c3a::PlanMiss::kDuringCapture, "lrkernels.", op,
              ": CUDA-graph capture needs the cuFFT plans of this shape made beforehand (", rows,
              " transforms of length ", b, "): run the op once with these shapes on this stream before capturing");
  check_cufft(r, op, dir == c3a::FftDir::kRealToComplex ? "R2C plan creation" : "C2R plan creation");
  return plan;
}

void check_cuda_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "lrkernels.", op, ": x must be a CUDA tensor, got one on ", x.device());
}

// The one-sided spectra of `rows` real rows of length b (fp32, contiguous): (rows, b/2+1)
// complex64. b = 1 is the identity (plus a zero imaginary part) and skips cuFFT.
at::Tensor rows_rfft(const char* op, const at::Tensor& real_f32, int64_t rows, int64_t b, cudaStream_t stream) {
  at::Tensor spec = at::empty({rows, b / 2 + 1}, real_f32.options().dtype(at::kComplexFloat));
  if (rows == 0) return spec;
  if (b == 1) return at::complex(real_f32.reshape({rows, 1}), at::zeros({rows, 1}, real_f32.options()));
  const std::shared_ptr<c3a::FftPlan> plan = fft_plan(op, b, rows, c3a::FftDir::kRealToComplex, stream);
  at::Tensor work;
  if (plan->work_bytes) work = at::empty({static_cast<int64_t>(plan->work_bytes)}, real_f32.options().dtype(at::kByte));
  // cuFFT wants its input aligned to the complex type (as torch.fft ensures); a view at an odd
  // float offset is copied.
  const at::Tensor in =
      reinterpret_cast<std::uintptr_t>(real_f32.data_ptr()) % (2 * sizeof(float)) ? real_f32.clone() : real_f32;
  check_cufft(c3a::exec_r2c(*plan, in.data_ptr<float>(), static_cast<float*>(spec.data_ptr()),
                            work.defined() ? work.data_ptr() : nullptr),
              op, "R2C");
  return spec;
}

// The real rows of length b (fp32) back from `rows` one-sided spectra, unnormalised (× b);
// the spectrum is scratch (cuFFT may overwrite it). Writes into `out` ((rows, b) elements).
void rows_irfft_into(const char* op, at::Tensor& spec, at::Tensor& out, int64_t rows, int64_t b, cudaStream_t stream) {
  if (rows == 0) return;
  if (b == 1) {
    out.view({rows, 1}).copy_(at::real(spec.view({rows, 1})));
    return;
  }
  const std::shared_ptr<c3a::FftPlan> plan = fft_plan(op, b, rows, c3a::FftDir::kComplexToReal, stream);
  at::Tensor work;
  if (plan->work_bytes) work = at::empty({static_cast<int64_t>(plan->work_bytes)}, out.options().dtype(at::kByte));
  check_cufft(c3a::exec_c2r(*plan, static_cast<float*>(spec.data_ptr()), out.data_ptr<float>(),
                            work.defined() ? work.data_ptr() : nullptr),
              op, "C2R");
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// s · (block-circulant product via spectra) (+ bias) as a fresh (T, n_out·b) fp32 tensor. The
// 1/b of the inverse transform is folded into the contraction's scale.
at::Tensor spectral_apply(const char* op, const at::Tensor& in_fft, const at::Tensor& kernel_fft,
                          const at::Tensor* bias_fft, int64_t T, int64_t n_in, int64_t n_out, int64_t b, double scale,
                          bool transposed, cudaStream_t stream) {
  const int64_t F = b / 2 + 1;
  at::Tensor out_fft = at::empty({T, n_out, F}, in_fft.options());
  C3AContractParams p;
  p.in = static_cast<const float*>(in_fft.data_ptr());
  p.kernel_fft = static_cast<const float*>(kernel_fft.data_ptr());
  p.bias_fft = bias_fft ? static_cast<const float*>(bias_fft->data_ptr()) : nullptr;
  p.out = static_cast<float*>(out_fft.data_ptr());
  p.tokens = T;
  p.n_in = n_in;
  p.n_out = n_out;
  p.freqs = F;
  p.scale = static_cast<float>(scale / static_cast<double>(b));
  p.bias_scale = static_cast<float>(1.0 / static_cast<double>(b));
  if (transposed) LRK_CUDA_CHECK_LAUNCH(op, "contract (input gradient)", c3a::launch_contract<true>(p, stream));
  else LRK_CUDA_CHECK_LAUNCH(op, "contract (forward)", c3a::launch_contract<false>(p, stream));
  at::Tensor out = at::empty({T, n_out * b}, in_fft.options().dtype(at::kFloat));
  rows_irfft_into(op, out_fft, out, T * n_out, b, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> c3a_forward_cuda(const char* op, const at::Tensor& x, const at::Tensor* weight,
                                                    const at::Tensor* bias, const at::Tensor& kernel, double scale,
                                                    const C3AShapes& sh) {
  check_cuda_input(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dt = x.scalar_type();
  const int64_t b = sh.block;
  at::Tensor kernel_fft = rows_rfft(op, as_f32(kernel), sh.n_out * sh.n_in, b, stream).view({sh.n_out, sh.n_in, sh.freqs});
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor x_fft = rows_rfft(op, as_f32(x2), sh.tokens * sh.n_in, b, stream);
  // The bias joins the adapter in the frequency domain (the FFT is linear), so the inverse
  // transform writes adapter + bias and the base GEMM accumulates onto it in place.
  at::Tensor bias_fft;
  if (bias) bias_fft = rows_rfft(op, as_f32(*bias), sh.n_out, b, stream);
  at::Tensor z = spectral_apply(op, x_fft, kernel_fft, bias ? &bias_fft : nullptr, sh.tokens, sh.n_in, sh.n_out, b,
                                scale, /*transposed=*/false, stream);
  at::Tensor y;
  if (weight == nullptr) {
    y = dt == at::kFloat ? z : z.to(dt);
  } else if (dt == at::kFloat) {
    y = z.addmm_(x2, weight->t());  // the base GEMM accumulates onto adapter + bias in place
  } else {
    y = at::mm(x2, weight->t());
    y.add_(z);  // fp32 sum, one rounding to the output dtype
  }
  return {y.view(c3a_out_shape(x, sh.out_features)), kernel_fft};
}

void c3a_backward_cuda(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor* weight,
                       const at::Tensor& kernel_fft, at::ScalarType kernel_dtype, double scale, const C3AShapes& sh,
                       bool want_x, bool want_k, std::optional<at::Tensor>& gx, std::optional<at::Tensor>& gk) {
  if (!(want_x || want_k)) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dt = x.scalar_type();
  const int64_t b = sh.block;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor dy_fft = rows_rfft(op, as_f32(dy2), sh.tokens * sh.n_out, b, stream);
  const at::Tensor kf = kernel_fft.contiguous();
  if (want_x) {
    at::Tensor dz = spectral_apply(op, dy_fft, kf, nullptr, sh.tokens, sh.n_out, sh.n_in, b, scale,
                                   /*transposed=*/true, stream);
    at::Tensor dx;
    if (weight == nullptr) {
      dx = dt == at::kFloat ? dz : dz.to(dt);
    } else if (dt == at::kFloat) {
      dx = dz.addmm_(dy2, *weight);
    } else {
      dx = at::mm(dy2, *weight);
      dx.add_(dz);
    }
    gx = dx.view(x.sizes());
  }
  if (want_k) {
    // the kernel gradient sums token slices with float atomics: its bits vary run to run
    at::globalContext().alertNotDeterministic("lrkernels.c3a_backward (kernel gradient on CUDA)");
    const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
    const at::Tensor x_fft = rows_rfft(op, as_f32(x2), sh.tokens * sh.n_in, b, stream);
    at::Tensor dk_fft = at::zeros({sh.n_out, sh.n_in, sh.freqs}, x_fft.options());
    C3AKernelGradParams p;
    p.grad_fft = static_cast<const float*>(dy_fft.data_ptr());
    p.x_fft = static_cast<const float*>(x_fft.data_ptr());
    p.grad_kernel_fft = static_cast<float*>(dk_fft.data_ptr());
    p.tokens = sh.tokens;
    p.n_out = sh.n_out;
    p.n_in = sh.n_in;
    p.freqs = sh.freqs;
    p.scale = static_cast<float>(scale / static_cast<double>(b));
    LRK_CUDA_CHECK_LAUNCH(op, "kernel_grad", c3a::launch_kernel_grad(p, stream));
    at::Tensor gk32 = at::empty({sh.n_out, sh.n_in, b}, x.options().dtype(at::kFloat));
    rows_irfft_into(op, dk_fft, gk32, sh.n_out * sh.n_in, b, stream);
    gk = kernel_dtype == at::kFloat ? gk32 : gk32.to(kernel_dtype);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> c3a_cuda(const at::Tensor& x, const at::Tensor& kernel, double scale) {
  const char* op = "c3a";
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  return c3a_forward_cuda(op, x, nullptr, nullptr, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> c3a_backward_op_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& kernel_fft,
    double scale, std::array<bool, 2> mask) {
  const char* op = "c3a_backward";
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  check_cuda_input(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  std::optional<at::Tensor> gx, gk;
  c3a_backward_cuda(op, grad_out, x, nullptr, kernel_fft, kernel.scalar_type(), scale, sh, mask[0], mask[1], gx, gk);
  return {gx, gk};
}

std::tuple<at::Tensor, at::Tensor> c3a_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& kernel,
                                                   double scale) {
  const char* op = "c3a_linear";
  check_linear_base(op, x, weight, bias);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  return c3a_forward_cuda(op, x, &weight, bp, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
c3a_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& kernel, const at::Tensor& kernel_fft, double scale,
                         std::array<bool, 4> mask) {
  const char* op = "c3a_linear_backward";
  check_linear_base(op, x, weight, std::nullopt);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  check_cuda_input(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [want_x, want_w, want_bias, want_k] = mask;
  std::optional<at::Tensor> gx, gw, gbias, gk;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features});
  if (want_w) gw = at::mm(dy2.t(), x.reshape({sh.tokens, sh.in_features}));
  if (want_bias) gbias = dy2.sum(0);
  c3a_backward_cuda(op, grad_out, x, &weight, kernel_fft, kernel.scalar_type(), scale, sh, want_x, want_k, gx, gk);
  return {gx, gw, gbias, gk};
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("c3a", &c3a_cuda);
  m.impl("c3a_backward", &c3a_backward_op_cuda);
  m.impl("c3a_linear", &c3a_linear_cuda);
  m.impl("c3a_linear_backward", &c3a_linear_backward_cuda);
}

}  // namespace lrkernels
