// Dropout arguments shared by every op with fused dropout: probability p in [0, 1) and a
// seed tensor (one int64 element on the op's device, read inside the kernel so that no
// host synchronisation is needed and CUDA graphs can replay with a fresh seed).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "lrkernels/common/philox.h"

namespace lrkernels {

inline DropoutParams make_dropout_params(double p, const std::optional<at::Tensor>& seed, const at::Tensor& x,
                                         const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "lrkernels.", op, ": dropout_p must be in [0, 1), got ", p);
  DropoutParams d;
  if (p == 0.0) return d;
  TORCH_CHECK_VALUE(seed.has_value() && seed->defined(), "lrkernels.", op,
                    ": dropout_p = ", p, " > 0 needs a seed tensor (one int64 element)");
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, "lrkernels.", op, ": seed must be int64, got ",
                   seed->scalar_type());
  TORCH_CHECK_VALUE(seed->numel() == 1, "lrkernels.", op, ": seed must have one element, got ", seed->numel());
  TORCH_CHECK_VALUE(seed->device() == x.device(), "lrkernels.", op, ": seed is on ", seed->device(),
                    " but x is on ", x.device());
  d.threshold = dropout_threshold(p);
  d.keep_scale = dropout_keep_scale(d.threshold);
  // data_ptr of a one-element tensor: a pointer, not a read, so no synchronisation.
  d.seed = seed->data_ptr<int64_t>();
  return d;
}

// The arguments of the dropout_mask op, on both backends: a (rows, cols) mask of a floating
// dtype the backend writes (float64 on CPU only).
inline void check_dropout_mask_args(int64_t rows, int64_t cols, at::ScalarType dtype, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "lrkernels.dropout_mask: rows and cols must be >= 0, got (", rows,
                    ", ", cols, ")");
  const bool ok = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  (dtype == at::kDouble && !seed.is_cuda());
  TORCH_CHECK_TYPE(ok, "lrkernels.dropout_mask: dtype must be ",
                   seed.is_cuda() ? "float32, float16 or bfloat16" : "float32, float64, float16 or bfloat16",
                   " on ", seed.device().type(), ", got ", dtype);
}

}  // namespace lrkernels
