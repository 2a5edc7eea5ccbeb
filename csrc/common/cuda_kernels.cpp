#include "common/cuda_kernels.h"

#include <atomic>
#include <cstdlib>

namespace lrkernels {
namespace {

CudaKernels initial_mode(const char* env_simt_only) {
  return env_flag_on(std::getenv(env_simt_only)) ? CudaKernels::kSimt : CudaKernels::kAuto;
}

std::atomic<int> g_mode[kCudaFamilies] = {
    static_cast<int>(initial_mode("LRKERNELS_LORA_SIMT_ONLY")),
    static_cast<int>(initial_mode("LRKERNELS_MULTI_LORA_SIMT_ONLY")),
};
std::atomic<int64_t> g_launches[kCudaFamilies][kCudaKernels][2] = {};
std::atomic<int> g_image_arch[kCudaFamilies] = {-1, -1};

int idx(CudaFamily f) { return static_cast<int>(f); }

}  // namespace

const char* cuda_family_name(CudaFamily f) { return f == CudaFamily::kLoraLinear ? "lora_linear" : "multi_lora"; }
const char* cuda_kernel_name(CudaKernel k) { return k == CudaKernel::kShrink ? "shrink" : "expand"; }

CudaKernels cuda_kernels(CudaFamily f) { return static_cast<CudaKernels>(g_mode[idx(f)].load(std::memory_order_relaxed)); }
void set_cuda_kernels(CudaFamily f, CudaKernels mode) {
  g_mode[idx(f)].store(static_cast<int>(mode), std::memory_order_relaxed);
}

void count_cuda_launch(CudaFamily f, CudaKernel k, bool tensor_cores) {
  g_launches[idx(f)][static_cast<int>(k)][tensor_cores ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
}
int64_t cuda_launch_count(CudaFamily f, CudaKernel k, bool tensor_cores) {
  return g_launches[idx(f)][static_cast<int>(k)][tensor_cores ? 1 : 0].load(std::memory_order_relaxed);
}
void reset_cuda_launch_counts() {
  for (auto& family : g_launches)
    for (auto& kernel : family)
      for (auto& c : kernel) c.store(0, std::memory_order_relaxed);
}

void record_tensor_core_image_arch(CudaFamily f, int arch) { g_image_arch[idx(f)].store(arch, std::memory_order_relaxed); }
int tensor_core_image_arch(CudaFamily f) { return g_image_arch[idx(f)].load(std::memory_order_relaxed); }

}  // namespace lrkernels
