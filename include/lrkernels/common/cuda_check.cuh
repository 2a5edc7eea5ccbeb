// Error checking for the torch-free CUDA layer: launchers return cudaError_t, and the
// torch binding turns a failure into a Python exception.
#pragma once

#include <cuda_runtime.h>

#define LRK_CUDA_RETURN_IF_ERROR(expr)         \
  do {                                         \
    const cudaError_t lrk_err__ = (expr);      \
    if (lrk_err__ != cudaSuccess) return lrk_err__; \
  } while (0)
