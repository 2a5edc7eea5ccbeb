// Argument validation for the C³A ops (c3a, c3a_linear and their backward ops), shared by the
// CPU and CUDA kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace lrkernels {

// T tokens (all leading dims of x), in → out features, block size b, and the block counts:
// n_out = out / b, n_in = in / b, freqs = b / 2 + 1 (the one-sided spectrum length).
struct C3AShapes {
  int64_t tokens, in_features, out_features, block, n_in, n_out, freqs;
};

// Spectra (kernel_fft and the internal ones) are complex in the accumulation precision:
// complex128 for float64 inputs, complex64 otherwise (fp16/bf16 are transformed in fp32).
inline at::ScalarType c3a_real_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType c3a_spectrum_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kComplexDouble : at::kComplexFloat;
}

inline std::vector<int64_t> c3a_out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// x (..., in) and kernel (out/b, in/b, b); when `out_features` >= 0 (c3a_linear: taken from
// the weight) the kernel must also match it.
inline C3AShapes check_c3a_args(const char* op, const at::Tensor& x, const at::Tensor& kernel, double scale,
                                int64_t out_features = -1) {
  check_x(op, x);
  TORCH_CHECK_TYPE(!kernel.is_complex() && kernel.is_floating_point(), "lrkernels.", op,
                   ": kernel must be a real floating tensor (the circulant blocks' first rows), got ",
                   kernel.scalar_type());
  check_dim(kernel, 3, op, "kernel", "(out_features / b, in_features / b, b)");
  // The kernel is an adapter tensor: x's dtype, or float32 on a float16/bfloat16 x (the
  // mixed-precision rule of common/checks.h; the FFTs run in float32 anyway).
  check_adapter_param(kernel, x, op, "kernel");
  const int64_t in = x.size(-1), b = kernel.size(2);
  TORCH_CHECK_VALUE(b >= 1, "lrkernels.", op, ": kernel must have shape (out_features / b, in_features / b, b) ",
                    "with block size b >= 1, got ", shape_str(kernel.sizes()));
  TORCH_CHECK_VALUE(in % b == 0, "lrkernels.", op, ": the block size b = kernel.size(2) = ", b,
                    " must divide in_features = x.size(-1) = ", in, " (kernel has shape ",
                    shape_str(kernel.sizes()), ")");
  if (out_features >= 0) {
    TORCH_CHECK_VALUE(out_features % b == 0, "lrkernels.", op, ": the block size b = kernel.size(2) = ", b,
                      " must divide out_features = weight.size(0) = ", out_features, " (kernel has shape ",
                      shape_str(kernel.sizes()), ")");
    check_shape(kernel, {out_features / b, in / b, b}, op, "kernel", "(out_features / b, in_features / b, b)");
  } else {
    check_shape(kernel, {kernel.size(0), in / b, b}, op, "kernel", "(out_features / b, in_features / b, b)");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "lrkernels.", op, ": scale must be finite, got ", scale);
  const int64_t tokens = leading_tokens(x);
  const int64_t n_out = kernel.size(0);
  return C3AShapes{tokens, in, n_out * b, b, in / b, n_out, b / 2 + 1};
}

// The forward's kernel_fft output, passed back to the backward ops.
inline void check_kernel_fft(const char* op, const at::Tensor& kernel_fft, const at::Tensor& x,
                             const C3AShapes& sh) {
  TORCH_CHECK_VALUE(kernel_fft.device() == x.device(), "lrkernels.", op, ": kernel_fft is on ", kernel_fft.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(kernel_fft.scalar_type() == c3a_spectrum_dtype(x), "lrkernels.", op, ": kernel_fft must be ",
                   c3a_spectrum_dtype(x), " (the forward's second output), got ", kernel_fft.scalar_type());
  check_shape(kernel_fft, {sh.n_out, sh.n_in, sh.freqs}, op, "kernel_fft", "(out_features / b, in_features / b, b / 2 + 1)");
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const C3AShapes& sh) {
  check_like(grad_out, x, op, "grad_out", "x");
  check_shape(grad_out, c3a_out_shape(x, sh.out_features), op, "grad_out", "(..., out_features)");
}

}  // namespace lrkernels
