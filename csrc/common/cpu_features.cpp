#include "common/cpu_features.h"

#include <atomic>

namespace lrkernels {

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

namespace {
std::atomic<int> g_mode{static_cast<int>(CpuKernels::kAuto)};
}

CpuKernels cpu_kernels() { return static_cast<CpuKernels>(g_mode.load(std::memory_order_relaxed)); }

void set_cpu_kernels(CpuKernels mode) { g_mode.store(static_cast<int>(mode), std::memory_order_relaxed); }

}  // namespace lrkernels
