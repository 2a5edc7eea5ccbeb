// What the two CUDA bindings of the LoRA kernels share (csrc/lora/lora_cuda.cu: lora_linear, the
// one-adapter case; csrc/multi_lora/multi_lora_cuda.cu: the multi-LoRA ops): the adapter
// tensors' storage type for the kernels, the optional gains as kernel pointers, and the
// dispatch over (x's type, the adapters' type). Included by .cu files only.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

#include "common/cuda_dispatch.h"
#include "lora/lora_checks.h"

namespace lrkernels {

// The adapter tensors (A, B, rank_scale, out_scale) in one storage type for the kernels: float
// when any of them is float32 on a 16-bit x (check_adapter_param's rule; the others are
// converted, they are small), else x's dtype. Null or undefined entries are skipped. Gradients
// go back in each tensor's own dtype.
inline at::ScalarType lora_adapter_dtype(const at::Tensor& x, std::initializer_list<const at::Tensor*> adapters) {
  for (const at::Tensor* t : adapters)
    if (t != nullptr && t->defined() && t->scalar_type() == at::kFloat) return at::kFloat;
  return x.scalar_type();
}

// An optional gain (rank_scale, out_scale) in the adapters' storage type, as the kernels read
// it; `keep` holds the converted tensor alive for the launch. Null when absent.
inline const void* lora_gain_data(const std::optional<at::Tensor>& t, at::ScalarType dtype, at::Tensor& keep) {
  if (opt_ptr(t) == nullptr) return nullptr;
  keep = t->to(dtype).contiguous();
  return keep.data_ptr();
}

}  // namespace lrkernels

// Runs the lambda with cuda_t = x's storage type and adapter_t = the adapters' (cuda_t, or
// float for fp32 adapters on a 16-bit x).
#define LRK_DISPATCH_LORA_TYPES(X_DTYPE, ADAPTER_DTYPE, OP, ...)                 \
  LRK_DISPATCH_CUDA_FLOAT(X_DTYPE, OP, [&] {                                    \
    if ((ADAPTER_DTYPE) == at::kFloat) {                                        \
      using adapter_t = float;                                                  \
      return __VA_ARGS__();                                                     \
    }                                                                           \
    using adapter_t = cuda_t;                                                   \
    return __VA_ARGS__();                                                       \
  })
