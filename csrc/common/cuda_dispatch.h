// CUDA-side helpers for the torch bindings: dtype dispatch to the CUDA storage types the
// kernels are templated on, and launch checking.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Runs the lambda with `cuda_t` = float, __half or __nv_bfloat16 for the given dtype.
#define LRK_DISPATCH_CUDA_FLOAT(DTYPE, OP, ...)                                                      \
  [&] {                                                                                              \
    switch (DTYPE) {                                                                                 \
      case at::kFloat: {                                                                             \
        using cuda_t = float;                                                                        \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::kHalf: {                                                                              \
        using cuda_t = __half;                                                                       \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case at::kBFloat16: {                                                                          \
        using cuda_t = __nv_bfloat16;                                                                \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      default:                                                                                       \
        TORCH_CHECK_TYPE(false, "lrkernels.", OP, ": CUDA kernels take float32, float16 or bfloat16, got ", \
                         DTYPE);                                                                     \
    }                                                                                                \
  }()

// Turns a launcher's cudaError_t into a Python RuntimeError naming the op and kernel.
#define LRK_CUDA_CHECK_LAUNCH(OP, WHAT, EXPR)                                                        \
  do {                                                                                               \
    const cudaError_t lrk_err__ = (EXPR);                                                            \
    TORCH_CHECK(lrk_err__ == cudaSuccess, "lrkernels.", OP, ": CUDA ", WHAT, " kernel failed: ",    \
                cudaGetErrorString(lrk_err__));                                                      \
  } while (0)
