// Shared input validation for every op. Messages name the op, the argument and what was
// expected, e.g. "lrkernels.lora_linear: lora_b must have shape (out_features, r) =
// (4096, 16), got (16, 4096)". Shape problems raise ValueError, dtype problems TypeError.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace lrkernels {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// Floating-point dtypes each backend implements.
inline bool dtype_supported(const at::Tensor& t) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
  return st == at::kFloat || st == at::kDouble || st == at::kBFloat16;
}

inline const char* supported_dtypes_str(const at::Tensor& t) {
  return t.is_cuda() ? "float32, float16 or bfloat16" : "float32, float64 or bfloat16";
}

// A floating tensor of a supported dtype.
inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "lrkernels.", op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(dtype_supported(t), "lrkernels.", op, ": ", name, " must be ",
                   supported_dtypes_str(t), " on ", t.device().type(), ", got ", t.scalar_type());
}

// Same dtype and device as the reference argument (usually x).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "lrkernels.", op, ": ", name, " is on ", t.device(),
                    " but ", ref_name, " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "lrkernels.", op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; mixed dtypes are not supported");
}

// The mixed-precision rule shared by every adapter family. The compute tensors (x, the frozen
// base weight and its bias) share one dtype; an adapter tensor (trainable low-rank factors,
// gates, scales, blocks) has that dtype, or float32 when x is float16/bfloat16 (PEFT keeps
// adapters in float32 on a low-precision base: `autocast_adapter_dtype`). Low-rank arithmetic
// accumulates in float32 (float64 for float64), outputs have x's dtype and every gradient comes
// back in its own tensor's dtype.
inline bool is_low_precision(at::ScalarType st) { return st == at::kHalf || st == at::kBFloat16; }

inline void check_adapter_param(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "lrkernels.", op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device() == x.device(), "lrkernels.", op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device(), "; all tensors must be on one device");
  const bool ok = t.scalar_type() == x.scalar_type() ||
                  (t.scalar_type() == at::kFloat && is_low_precision(x.scalar_type()));
  TORCH_CHECK_TYPE(ok, "lrkernels.", op, ": ", name, " has dtype ", t.scalar_type(), " but x has dtype ",
                   x.scalar_type(), "; ", name, " must have x's dtype",
                   is_low_precision(x.scalar_type()) ? " or float32 (an adapter kept in float32 on a low-precision base)"
                                                     : "");
}

inline void check_shape(const at::Tensor& t, c10::IntArrayRef expected, const char* op, const char* name,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "lrkernels.", op, ": ", name, " must have shape ", what, " = ",
                    shape_str(expected), ", got ", shape_str(t.sizes()));
}

// x's shape with its last dimension replaced: the (..., n) shape of an op's output.
inline std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == dim, "lrkernels.", op, ": ", name, " must be ", dim, "-D ", what, ", got shape ",
                    shape_str(t.sizes()));
}

// The activations every op takes: x (..., in_features) of a supported floating dtype.
inline void check_x(const char* op, const at::Tensor& x) {
  check_float_input(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "lrkernels.", op, ": x must have shape (..., in_features), got a 0-D tensor");
}

// T = the product of x's leading dims.
inline int64_t leading_tokens(const at::Tensor& x) {
  int64_t t = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) t *= x.size(i);
  return t;
}

struct LinearBaseShapes {
  int64_t tokens, in_features, out_features;
};

// The base layer an adapter op fuses with: x (..., in_features), weight (out_features,
// in_features) and bias (out_features,) or None, all of x's dtype and on x's device. The one
// validator of (x, weight, bias) for LoRA, multi-LoRA, C³A and MiSS.
inline LinearBaseShapes check_linear_base(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias) {
  check_x(op, x);
  TORCH_CHECK_TYPE(weight.defined(), "lrkernels.", op, ": weight is undefined");
  check_dim(weight, 2, op, "weight", "(out_features, in_features)");
  check_like(weight, x, op, "weight", "x");
  const int64_t in = x.size(-1), out = weight.size(0);
  check_shape(weight, {out, in}, op, "weight", "(out_features, in_features)");
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, x, op, "bias", "x");
    check_shape(*bias, {out}, op, "bias", "(out_features,)");
  }
  return LinearBaseShapes{leading_tokens(x), in, out};
}

}  // namespace lrkernels
