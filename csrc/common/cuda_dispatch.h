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

#include <c10/cuda/CUDAFunctions.h>

#include <atomic>

#include "common/cuda_kernels.h"

namespace lrkernels {

// The __CUDA_ARCH__ (800, 900, ...) the GPU's loaded image of one kernel was compiled for:
// the virtual arch of its SASS, or of the PTX the driver JIT-compiled (cudaFuncAttributes::
// ptxVersion), so it says whether the kernel's `__CUDA_ARCH__ >= N` bodies exist on this
// GPU, whatever the build's arch list. 0 when the GPU has no image for it. Queried once per
// device (cudaFuncGetAttributes: no stream work, no synchronisation), then cached.
class KernelImageArch {
 public:
  explicit KernelImageArch(const void* kernel) : kernel_(kernel) {
    for (auto& a : arch_) a.store(-1, std::memory_order_relaxed);
  }

  // For the current device (the caller holds a device guard).
  int get() {
    const int device = c10::cuda::current_device();
    if (device < 0 || device >= kMaxDevices) return query();
    int a = arch_[device].load(std::memory_order_relaxed);
    if (a < 0) {
      a = query();
      arch_[device].store(a, std::memory_order_relaxed);
    }
    return a;
  }

 private:
  static constexpr int kMaxDevices = 64;
  int query() const {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel_) != cudaSuccess) {
      (void)cudaGetLastError();  // not the op's error: the caller falls back to SIMT
      return 0;
    }
    return attr.ptxVersion * 10;
  }
  const void* kernel_;
  std::atomic<int> arch_[kMaxDevices];
};

// The path for one call (kernel_select.h): the family's setting, the dtypes, the loaded image
// and the shape. A forced "tensor_core" setting with no sm_80+ image raises.
inline bool use_tensor_cores(CudaFamily family, KernelImageArch& image, bool tc_dtypes, bool shape_pays,
                             const char* op) {
  const CudaKernels mode = cuda_kernels(family);
  if (mode == CudaKernels::kSimt || !tc_dtypes) return false;
  const int arch = image.get();
  record_tensor_core_image_arch(family, arch);
  const TensorCorePath path = choose_tensor_cores(mode, tc_dtypes, arch, shape_pays);
  TORCH_CHECK(path != TensorCorePath::kUnavailable, "lrkernels.", op,
              ": set_cuda_kernels('tensor_core') but this GPU runs no sm_80+ code of the tensor-core kernels "
              "(loaded image compiled for __CUDA_ARCH__ ", arch,
              "); rebuild with TORCH_CUDA_ARCH_LIST covering this GPU, or use 'auto'");
  return path == TensorCorePath::kTensorCore;
}

}  // namespace lrkernels
