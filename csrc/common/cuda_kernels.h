// The CUDA kernel-path setting (lrkernels.set_cuda_kernels) and the launch counters that
// tell which path ran (lrkernels.cuda_kernel_launches). Plain host state, compiled in every
// build (a CPU-only build reports zero launches), read by the CUDA bindings once per call
// from an atomic: no environment lookups on the hot path. The environment switches of the
// first releases (LRKERNELS_LORA_SIMT_ONLY=1, LRKERNELS_MULTI_LORA_SIMT_ONLY=1) set the
// initial mode when the library loads.
#pragma once

#include <cstdint>

#include "lrkernels/common/kernel_select.h"

namespace lrkernels {

// The op families that have a tensor-core path, each with its own setting.
enum class CudaFamily : int { kLoraLinear = 0, kMultiLora = 1 };
constexpr int kCudaFamilies = 2;
const char* cuda_family_name(CudaFamily f);  // "lora_linear", "multi_lora"

CudaKernels cuda_kernels(CudaFamily f);
void set_cuda_kernels(CudaFamily f, CudaKernels mode);

// The kernels with two paths: the forward shrink and expand.
enum class CudaKernel : int { kShrink = 0, kExpand = 1 };
constexpr int kCudaKernels = 2;
const char* cuda_kernel_name(CudaKernel k);  // "shrink", "expand"

// Counted on the host when a launch is made (after it is checked), per family, kernel and path.
void count_cuda_launch(CudaFamily f, CudaKernel k, bool tensor_cores);
int64_t cuda_launch_count(CudaFamily f, CudaKernel k, bool tensor_cores);
void reset_cuda_launch_counts();

// The image arch (kernel_select.h) a family's binding last saw for its tensor-core kernels:
// -1 before any CUDA call, 0 when the GPU had no image for them.
void record_tensor_core_image_arch(CudaFamily f, int arch);
int tensor_core_image_arch(CudaFamily f);

}  // namespace lrkernels
