// Which CUDA kernels an op runs, the SIMT ones or the tensor-core (WMMA) ones: the rule, as
// a plain host function so it is unit-tested without a GPU (tests/cpp/test_kernel_select.cpp).
//
// The tensor-core kernel bodies exist only in code compiled for sm_80+ (the `__CUDA_ARCH__ >=
// 800` guard; below that they trap). What runs on a GPU is the build's best image for it: its
// SASS of the same major version, or PTX JIT-compiled from an older virtual arch, so a build
// for "7.5+PTX" on an sm_90 GPU runs code compiled for compute_75. The binding therefore asks
// the CUDA runtime which virtual arch the loaded image of a tensor-core kernel was compiled
// for (cudaFuncAttributes::ptxVersion, once per device) and passes it here as `image_arch`
// (__CUDA_ARCH__ units: 800, 900; 0 when there is no image or the query failed).
#pragma once

namespace lrkernels {

// The process-wide setting of lrkernels.set_cuda_kernels().
enum class CudaKernels : int {
  kAuto = 0,        // tensor cores where the dtypes have them and the shape pays (see shape_pays)
  kSimt = 1,        // never the tensor cores
  kTensorCore = 2,  // the tensor cores wherever the dtypes have them, whatever the shape
};

// The lowest __CUDA_ARCH__ whose tensor-core kernel bodies are compiled (WMMA bf16 needs sm_80).
constexpr int kTensorCoreMinArch = 800;

enum class TensorCorePath : int {
  kSimt = 0,         // the SIMT kernels
  kTensorCore = 1,   // the tensor-core kernels
  kUnavailable = 2,  // kTensorCore forced, the dtypes have tensor-core kernels, but the loaded
                     // image has no bodies for them: the caller raises (never runs them)
};

// mode: the setting; tc_dtypes: the operands are fp16/bf16 throughout (x, weights and adapter
// tensors of one 16-bit dtype: the WMMA kernels take no fp32 operand); image_arch: see above;
// shape_pays: the shape fills the tensor-core tiles (each family's own heuristic).
constexpr TensorCorePath choose_tensor_cores(CudaKernels mode, bool tc_dtypes, int image_arch, bool shape_pays) {
  if (mode == CudaKernels::kSimt || !tc_dtypes) return TensorCorePath::kSimt;
  const bool have_code = image_arch >= kTensorCoreMinArch;
  if (mode == CudaKernels::kTensorCore) return have_code ? TensorCorePath::kTensorCore : TensorCorePath::kUnavailable;
  return (have_code && shape_pays) ? TensorCorePath::kTensorCore : TensorCorePath::kSimt;
}

// An environment switch of the first releases (LRKERNELS_LORA_SIMT_ONLY=1, ...): on when it
// starts with '1'. Read once, when the library loads.
constexpr bool env_flag_on(const char* value) { return value != nullptr && value[0] == '1'; }

}  // namespace lrkernels
